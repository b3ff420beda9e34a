"""easysft/checkpoint.py and easysft/signals.py in-process: atomic layout, retention, verification, security."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from easysft import checkpoint
from easysft import testing_hooks as faults
from easysft.checkpoint import TrainerState
from easysft.config import TrainConfig
from easysft.distributed import DistInfo
from easysft.engines.single import SingleEngine
from easysft.errors import CheckpointError
from easysft.metrics import rewind_metrics
from easysft.training import signals as easysft_signals
from tests.conftest import make_tiny_model

DIST = DistInfo()


def make_engine(tokenizer, seed=0, steps=1):
    """A SingleEngine on a tiny model after ``steps`` optimizer steps (so the optimizer has state)."""
    engine = SingleEngine(DIST)
    engine.setup(make_tiny_model(tokenizer, seed=seed), train_cfg=TrainConfig(learning_rate=1e-2),
                 num_training_steps=10)
    for _ in range(steps):
        ids = torch.tensor([[5, 6, 7, 8]])
        engine.model(input_ids=ids, labels=ids).loss.backward()
        engine.grad_norm_and_step(1.0)
    return engine


def save(out, engine, step, limit=None):
    return checkpoint.save(out, engine, TrainerState(step, 0, step), {"seed": 1}, DIST, save_total_limit=limit)


def test_save_then_resume_restores_weights_optimizer_scheduler(tokenizer, tmp_path):
    engine = make_engine(tokenizer, steps=2)
    path = save(tmp_path, engine, 2)
    assert checkpoint.is_complete(path)
    marker = json.loads((path / checkpoint.COMPLETE).read_text())
    assert marker["step"] == 2 and {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng-rank0.pt",
                                     "trainer_state.json", "train_config.json"} <= set(marker["files"])
    other = make_engine(tokenizer, seed=1, steps=0)
    resumed = checkpoint.resume(path, tmp_path, other, DIST)
    assert resumed.state.step == 2 and resumed.state.next_micro_batch == 2
    for (name, a), b in zip(engine.model.named_parameters(), other.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert other.scheduler.state_dict() == engine.scheduler.state_dict()
    sa, sb = engine.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key])


def test_saving_the_same_step_twice_is_a_no_op(tokenizer, tmp_path):
    engine = make_engine(tokenizer)
    path = save(tmp_path, engine, 1)
    stamp = (path / checkpoint.COMPLETE).stat().st_mtime_ns
    assert save(tmp_path, engine, 1) == path
    assert (path / checkpoint.COMPLETE).stat().st_mtime_ns == stamp


def test_retention_keeps_the_newest_complete_and_cleans_incomplete(tokenizer, tmp_path):
    engine = make_engine(tokenizer)
    broken = checkpoint.step_dir(tmp_path, 9)
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"half")
    for step in (1, 2, 3, 4):
        save(tmp_path, engine, step, limit=2)
    assert [(s, done) for s, _, done in checkpoint.list_checkpoints(tmp_path)] == [(3, True), (4, True)]


def test_incomplete_checkpoint_is_never_resumed(tokenizer, tmp_path):
    engine = make_engine(tokenizer)
    save(tmp_path, engine, 1)
    partial = checkpoint.step_dir(tmp_path, 2)
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.find_resume_checkpoint("latest", tmp_path) == checkpoint.step_dir(tmp_path, 1)
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        checkpoint.find_resume_checkpoint(str(partial), tmp_path)
    # A run folder means its newest complete checkpoint.
    assert checkpoint.find_resume_checkpoint(str(tmp_path), tmp_path / "elsewhere") == checkpoint.step_dir(tmp_path, 1)


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint") as info:
        checkpoint.find_resume_checkpoint("latest", tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        checkpoint.find_resume_checkpoint(str(tmp_path / "nope"), tmp_path)


def test_truncated_safetensors_is_a_checkpoint_error_naming_the_file(tokenizer, tmp_path):
    engine = make_engine(tokenizer)
    path = save(tmp_path, engine, 1)
    weights = path / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is \d+ bytes, expected \d+"):
        checkpoint.resume(path, tmp_path, make_engine(tokenizer, steps=0), DIST)
    # Without the marker's sizes (a file damaged some other way), the reader still names it.
    with pytest.raises(CheckpointError, match=rf"checkpoint file {weights} is corrupted"):
        checkpoint.load_tensors(path)


def test_sharded_weights_round_trip(tmp_path):
    tensors = {f"w{i}": torch.full((64,), float(i)) for i in range(5)}
    checkpoint.save_tensors(tensors, tmp_path, max_shard_bytes=600)
    index = json.loads((tmp_path / checkpoint.WEIGHTS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = checkpoint.load_tensors(tmp_path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_shard_index_pointing_outside_the_folder_is_refused(tmp_path, target):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    if target == "link.safetensors":
        os.symlink(tmp_path / "outside.safetensors", folder / target)
    (folder / checkpoint.WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"w": target}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder; refused"):
        checkpoint.load_tensors(folder)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_torch_state_files_never_unpickle_code(tmp_path):
    torch.save({"state": _Boom()}, tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="not a weights-only file"):
        checkpoint.load_torch_state(tmp_path / "optimizer.pt")


def test_rng_states_round_trip(tmp_path):
    checkpoint.save_torch_state(checkpoint.rng_state(), tmp_path / "rng-rank0.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    checkpoint.restore_rng(tmp_path, DIST)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_rewind_metrics_drops_later_records_and_a_torn_line(tmp_path):
    lines = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.0}, {"step": 2, "event": "nonfinite_step_skipped",
             "loss": float("nan")}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 1.0}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    losses, evals = rewind_metrics(tmp_path, 2, DIST)
    assert losses[0] == 2.0 and np.isnan(losses[1]) and len(losses) == 2
    assert evals == [{"step": 0, "eval_loss": 3.0}]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_every_registered_engine_can_checkpoint():
    """Every engine implements the checkpoint pair, so the loop needs no per-engine guard."""
    import importlib

    from easysft.engines import ENGINES

    for path in ENGINES.values():
        module, name = path.split(":")
        if module.endswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            continue
        engine_class = getattr(importlib.import_module(module), name)
        assert callable(engine_class.save_checkpoint) and callable(engine_class.load_checkpoint), path


def test_testing_hooks_parse(monkeypatch):
    assert faults._parse_steps("3,5-7") == {3, 5, 6, 7}
    for name in ("EASYSFT_INJECT_NAN_AT_STEP", "EASYSFT_PAUSE_BEFORE_COMPLETE", "EASYSFT_FAIL_AT_STEP",
                 "EASYSFT_FAIL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EASYSFT_STOP_AFTER_STEP", "4")
    hooks = faults.testing_hooks()
    assert hooks == faults.TestingHooks(stop_after_step=4)  # everything else off
    faults.maybe_fail(faults.testing_hooks(), 4, 0)  # no-op without EASYSFT_FAIL_AT_STEP
    monkeypatch.setenv("EASYSFT_FAIL_AT_STEP", "2")
    monkeypatch.setenv("EASYSFT_FAIL_RANK", "1")
    hooks = faults.testing_hooks()
    faults.maybe_fail(hooks, 2, 0)  # another rank
    with pytest.raises(faults.InjectedFailure, match="injected failure at step 2"):
        faults.maybe_fail(hooks, 2, 1)


def test_first_signal_only_requests_a_stop_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    stopper = easysft_signals.StopSignals(faults.testing_hooks())
    assert stopper.should_stop(1) is None
    os.kill(os.getpid(), signal.SIGTERM)  # handled in Python: sets the flag, does not kill the test process
    assert stopper.should_stop(2) == "SIGTERM"
    stopper.restore()
    assert signal.getsignal(signal.SIGTERM) is before


# ---- security defaults -------------------------------------------------------------------------------------------


def test_trust_remote_code_is_off_unless_asked():
    from easysft.cli import parse_values
    from easysft.commands.train import build_configs
    from easysft.config import ModelConfig

    assert ModelConfig().trust_remote_code is False
    model_cfg = build_configs(parse_values("train", ["--data_path", "x"]))[0]
    assert model_cfg.trust_remote_code is False


def test_every_torch_load_in_the_package_is_weights_only():
    import re
    from pathlib import Path

    import easysft

    calls = []
    for source in Path(easysft.__file__).parent.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            calls.append((source.name, match.group(1)))
    assert calls, "expected at least checkpoint.load_torch_state"
    assert all("weights_only=True" in args for _, args in calls), calls


def test_fsdp_dcp_metadata_is_read_without_running_code(tmp_path):
    """DCP's .metadata is a pickle: easysft's reader builds DCP's metadata classes and refuses anything else."""
    import io
    import pickle

    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    from easysft.engines.fsdp import _safe_unpickler

    chunk = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 3]))
    meta = Metadata(state_dict_metadata={"w": TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16),
                                                                    torch.Size([2, 3]), [chunk])})
    loaded = _safe_unpickler(io.BytesIO(pickle.dumps(meta))).load()
    assert loaded.state_dict_metadata["w"].properties.dtype == torch.bfloat16
    assert loaded.state_dict_metadata["w"].size == torch.Size([2, 3])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refused"):
        _safe_unpickler(io.BytesIO(pickle.dumps(Evil()))).load()


def test_a_checkpoint_holds_only_safetensors_json_and_weights_only_files(tokenizer, tmp_path):
    path = save(tmp_path, make_engine(tokenizer), 1)
    for file in path.iterdir():
        assert file.suffix in (".safetensors", ".json", ".pt") or file.name == checkpoint.COMPLETE, file.name
        if file.suffix == ".pt":
            torch.load(file, weights_only=True)  # raises on anything but tensors and plain containers
