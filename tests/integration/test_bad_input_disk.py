"""A full disk, SIGTERM and used targets, for every command that writes (hunt 3: DF1-DF5, C10, X11, X13, I8).

The contract: a write that meets a full disk is ONE `easysft: error: ...` line with the command's exit code, the
previous good state is kept, and nothing half-written (no temporary file or folder) is left; SIGTERM removes the
temporaries too, and the temporaries of a process that died anyway are swept by the next command. Full disks are
real: small tmpfs mounts (needs root, as in CI; skipped with the reason otherwise), so the exceptions are the
libraries' own (safetensors' SafetensorError, torch.save's RuntimeError, numpy's OSError without errno).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from easysft import checkpoint
from easysft.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG, DATA, TRAINING = 2, 3, 6
TERMINATED = 128 + 15


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a fresh tmpfs of ``size`` (e.g. "3m"); unmounted after the test."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill up ({done.stderr.strip() or done.returncode}); needs root")
        mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize(disk: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def one_line_error(code, capsys, expected_code, pattern) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith("easysft: error: "), lines[-3:]
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (hidden, with 'tmp' in the name) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(".") and "tmp" in p.name)


def train(model_dir, data_dir, out, *extra):
    return main(["train", "--data_path", str(data_dir), "--model_name_or_path", str(model_dir), "--output_dir",
                 str(out), "--per_device_train_batch_size", "2", "--max_steps", "1", "--tensorboard", "false",
                 "--max_prompt_len", "32", "--max_ans_len", "16", *extra])


def infer(model_dir, data_path, target, *extra):
    return main(["infer", "--model_name_or_path", str(model_dir), "--data_path", str(data_path), "--split", "train",
                 "--eval_fraction", "0", "--max_train_rows", "2", "--max_new_tokens", "1", "--max_prompt_len", "32",
                 "--inference_output_path", str(target), *extra])


def status_of(out: Path) -> str:
    return json.loads((out / "run_status.json").read_text())["state"]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---- 1. a full disk: one line, the previous good state kept, nothing half-written ---------------------------------

def test_df1_full_disk_at_the_final_save_keeps_the_finished_run(tiny_model_dir, qa_data_dir, small_disk, capsys):
    """DF1: safetensors' SafetensorError (not an OSError) at the final save. A LoRA run: the adapter's checkpoint
    fits where the model folder (adapter + a 3.4 MB tokenizer) does not; --resume writes it once there is room."""
    disk = small_disk("2m")
    out = disk / "run"
    code = train(tiny_model_dir, qa_data_dir, out, "--lora_dim", "4", "--max_steps", "2")
    one_line_error(code, capsys, TRAINING, r"cannot write the model into .*\(No space left on device\); the finished "
                                           r"run is saved in .*step-2: free space, then rerun the same command with "
                                           r"--resume")
    assert [(step, done) for step, _, done in checkpoint.list_checkpoints(out)] == [(2, True)]
    assert leftovers(out) == [] and not (out / "adapter_config.json").exists()
    assert status_of(out) == "failed"
    resize(disk, "30m")
    assert train(tiny_model_dir, qa_data_dir, out, "--lora_dim", "4", "--max_steps", "2", "--resume") == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert status_of(out) == "finished"


def test_df1_full_disk_with_no_room_for_a_checkpoint_is_one_line_and_leaves_nothing_half_written(
        tiny_model_dir, qa_data_dir, small_disk, capsys):
    """DF1, the hunt's own command: a full fine-tune whose model (6 MB) exceeds a 5 MB disk, so neither the model
    nor a checkpoint fits: one line saying so, exit 6, no half checkpoint, no temporary folder."""
    out = small_disk("5m") / "run"
    code = train(tiny_model_dir, qa_data_dir, out)
    one_line_error(code, capsys, TRAINING, r"cannot write the model into .*\(No space left on device\) and no "
                                           r"checkpoint could be saved")
    assert checkpoint.list_checkpoints(out) == [] and leftovers(out) == []
    assert status_of(out) == "failed"


def test_df2_full_disk_at_a_mid_run_checkpoint(tiny_model_dir, qa_data_dir, small_disk, capsys):
    """DF2: torch.save's RuntimeError ('unexpected pos') at step 2's checkpoint: one line, exit 6, step-1 kept,
    no half step-2, and run_status.json says failed (not running)."""
    out = small_disk("30m") / "run"
    code = train(tiny_model_dir, qa_data_dir, out, "--max_steps", "3", "--save_steps", "1")
    one_line_error(code, capsys, TRAINING, r"cannot write checkpoint .*step-2 \(No space left on device\); the last "
                                           r"complete checkpoint .*step-1 is kept")
    assert [(step, done) for step, _, done in checkpoint.list_checkpoints(out)] == [(1, True)]
    assert leftovers(out) == []
    assert status_of(out) == "failed"


def big_rows(folder: Path, rows: int, words: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "big.jsonl"
    text = " ".join(f"word{i % 97}" for i in range(words))
    path.write_text("".join(json.dumps({"prompt": f"{k} {text}", "answer": "yes"}) + "\n" for k in range(rows)))
    return path


def test_df3_full_disk_during_prepare_leaves_no_partial_entry(tiny_model_dir, tmp_path, small_disk, capsys):
    """DF3: the cache entry's buffered flush raises ENOSPC again when the abandoned entry is closed; the partial
    .tmp entry must still be removed (it kept the disk at 100%)."""
    data = big_rows(tmp_path / "data", rows=300, words=400)
    cache = small_disk("512k") / "cache"
    code = main(["prepare", "--model_name_or_path", tiny_model_dir, "--data_path", str(data), "--cache_dir",
                 str(cache), "--max_prompt_len", "1024", "--eval_fraction", "0"])
    one_line_error(code, capsys, DATA, r"cannot write the data cache .*\(No space left on device\)")
    assert leftovers(cache) == [], "the partial entry stayed"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".failed")] == []


def test_df4_full_disk_during_export_gguf(tiny_model_dir, small_disk, capsys):
    """DF4: numpy's 'N requested and M written' OSError (no errno) from the GGUF writer: one line, no file."""
    out = small_disk("3m") / "g"
    code = main(["export", "--model_name_or_path", tiny_model_dir, "--format", "gguf", "--gguf_type", "f32",
                 "--output_dir", str(out)])
    one_line_error(code, capsys, CONFIG, r"--output_dir .*g: cannot write the export \(No space left on device\)")
    assert not out.exists() or sorted(os.listdir(out)) == []


def test_df4_full_disk_during_export_hf(tiny_model_dir, small_disk, capsys):
    """The same class for `export --format hf` (safetensors' own error)."""
    out = small_disk("3m") / "hf"
    code = main(["export", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out)])
    one_line_error(code, capsys, CONFIG, r"cannot write the export \(No space left on device\)")
    assert not out.exists() or sorted(os.listdir(out)) == []


def test_df5_full_disk_during_infer_keeps_the_previous_predictions(tiny_model_dir, tmp_path, small_disk, capsys):
    """DF5: csv.writerows' ENOSPC: one line, the existing predictions file unchanged, no temporary."""
    data = tmp_path / "giant.jsonl"
    data.write_text(json.dumps({"prompt": "x" * 1_500_000, "answer": "y"}) + "\n")
    disk = small_disk("1m")
    target = disk / "p.csv"
    target.write_text("precious\n")
    code = infer(tiny_model_dir, data, target, "--overwrite_output_dir")
    one_line_error(code, capsys, CONFIG, r"--inference_output_path .*p\.csv: cannot write the predictions "
                                         r"\(No space left on device\)")
    assert target.read_text() == "precious\n"
    assert sorted(os.listdir(disk)) == ["p.csv"]


# ---- 2. output policy ------------------------------------------------------------------------------------------

def test_i8_infer_refuses_an_existing_file_without_overwrite_and_replaces_it_with(tiny_model_dir, qa_data_dir,
                                                                                 tmp_path, capsys):
    target = tmp_path / "p.csv"
    target.write_text("precious\n")
    code = infer(tiny_model_dir, qa_data_dir, target)
    one_line_error(code, capsys, CONFIG, r"--inference_output_path .*p\.csv already exists; pass "
                                         r"--overwrite_output_dir to replace it")
    assert target.read_text() == "precious\n"
    assert infer(tiny_model_dir, qa_data_dir, target, "--overwrite_output_dir") == 0
    assert target.read_text().splitlines()[0] == "prompt,answer,prediction" and "precious" not in target.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_x11_export_merge_refuses_the_adapters_base_folder(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    adapter = tmp_path / "lora"
    assert train(base, qa_data_dir, adapter, "--lora_dim", "4") == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    code = main(["export", "--model_name_or_path", str(adapter), "--merge", "--output_dir", str(base),
                 "--overwrite_output_dir"])
    one_line_error(code, capsys, CONFIG, r"--output_dir .*base is the adapter's base model .*which this command "
                                         r"reads")
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before
    # A symlinked spelling of the same folder is the same folder.
    link = tmp_path / "link"
    link.symlink_to(base)
    code = main(["export", "--model_name_or_path", str(adapter), "--merge", "--output_dir", str(link),
                 "--overwrite_output_dir"])
    one_line_error(code, capsys, CONFIG, r"is the adapter's base model")
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before


# ---- 3. temporaries: removed on SIGTERM, swept at the next start ------------------------------------------------

def test_c10_sigterm_during_prepare_removes_the_temporary_entry_and_stale_ones_are_swept(tiny_model_dir, tmp_path):
    """C10: SIGTERM while the entry is being written (deterministic: the build sends it to itself) -> exit 143,
    no .tmp-<key>-<pid>-<uuid> left; a stale one of a dead pid is swept by the next prepare."""
    data = big_rows(tmp_path / "data", rows=40, words=20)
    cache = tmp_path / "cache"
    done = run_python(f"""
        import os, signal, sys
        import easysft.data.dataset as dataset
        original = dataset.build_entry
        def build_then_terminated(writer, *args, **kwargs):
            assert os.path.isdir(writer.tmp)
            os.kill(os.getpid(), signal.SIGTERM)
            return original(writer, *args, **kwargs)
        dataset.build_entry = build_then_terminated
        from easysft.cli import main
        sys.exit(main(["prepare", "--model_name_or_path", {tiny_model_dir!r}, "--data_path", {str(data)!r},
                       "--cache_dir", {str(cache)!r}, "--num_proc", "2"]))
    """)
    assert done.returncode == TERMINATED, done.stderr[-3000:]
    assert cache.is_dir() and leftovers(cache) == [], "the temporary entry stayed"
    stale = cache / f".tmp-{'0' * 32}-{dead_pid()}-deadbeef"
    stale.mkdir()
    (stale / "train_ids.bin").write_bytes(b"\0" * 1000)
    assert main(["prepare", "--model_name_or_path", tiny_model_dir, "--data_path", str(data), "--cache_dir",
                 str(cache)]) == 0
    assert leftovers(cache) == []


def test_x13_sigterm_during_export_gguf_removes_the_temporary_and_the_rerun_works(tiny_model_dir, tmp_path, capsys):
    """X13: SIGTERM while model.gguf is written -> exit 143, no .model.gguf.tmp-<pid>; the same export then runs
    (it was refused as 'not empty'), also when a killed (SIGKILL) export's temporary is still there."""
    out = tmp_path / "exp"
    done = run_python(f"""
        import os, signal, sys
        import easysft.export.gguf as gguf_export
        original = gguf_export.converted_tensors
        def converted_then_terminated(*args, **kwargs):
            for k, item in enumerate(original(*args, **kwargs)):
                if k == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield item
        gguf_export.converted_tensors = converted_then_terminated
        from easysft.cli import main
        sys.exit(main(["export", "--model_name_or_path", {tiny_model_dir!r}, "--format", "gguf", "--gguf_type",
                       "f32", "--output_dir", {str(out)!r}]))
    """)
    assert done.returncode == TERMINATED, done.stderr[-3000:]
    assert sorted(os.listdir(out)) == [], "a temporary (or a half export) stayed"
    (out / f".model.gguf.tmp-{dead_pid()}").write_bytes(b"\0" * 1000)  # as a SIGKILL leaves it
    assert main(["export", "--model_name_or_path", tiny_model_dir, "--format", "gguf", "--gguf_type", "f32",
                 "--output_dir", str(out)]) == 0, capsys.readouterr().err[-2000:]
    assert sorted(os.listdir(out)) == ["Modelfile", "easysft.json", "model.gguf"]


def test_stale_temporaries_of_live_processes_are_left_alone(tmp_path):
    from easysft.files import sweep_stale_temporaries

    live = tmp_path / f".p.csv.tmp-{os.getpid()}"
    dead = tmp_path / f".p.csv.tmp-{dead_pid()}"
    other = tmp_path / ".hidden-user-file"
    for path in (live, dead, other):
        path.write_text("x")
    assert sweep_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and other.exists() and not dead.exists()


def test_disk_full_is_recognised_by_class_through_the_chain():
    import errno

    from easysft.files import disk_full_reason

    assert disk_full_reason(OSError(errno.ENOSPC, "x")) == os.strerror(errno.ENOSPC)
    assert disk_full_reason(OSError(errno.EDQUOT, "x")) == os.strerror(errno.EDQUOT)
    assert disk_full_reason(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5056 vs 4948"))
    assert disk_full_reason(OSError("1572864 requested and 343784 written"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full_reason(wrapped)
    assert disk_full_reason(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_full_reason(ValueError("bad value")) is None


@pytest.mark.parametrize("size", ["8k", "16k"])
def test_full_disk_at_any_write_of_train_is_one_line(tiny_model_dir, qa_data_dir, small_disk, capsys, size):
    """The class behind DF1/DF2: the run's first files (8k: data_report.json) or metrics.jsonl (16k) on a full
    disk, not only the model and checkpoints, end in one line with exit 6, and no temporary is left."""
    out = small_disk(size) / "run"
    code = train(tiny_model_dir, qa_data_dir, out)
    one_line_error(code, capsys, TRAINING, r"cannot write into .*run (at step 0 )?\(No space left on device\)")
    assert leftovers(out) == []
