"""``setup(...) -> Run``: everything a training run needs before its first step, in the order it happens.

Order matters and is explained where it matters: the engine first (it may start torch.distributed, which every
later collective needs), the output folder before any load (a bad folder fails in a second, not after minutes of
tokenization), the data before the model (data errors are the common ones), the model patches before the engine
wraps the model, and the resume last (it needs the engine's optimizer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from easysft import checkpoint
from easysft.config import DataConfig, GenerateConfig, LoraConfig, ModelConfig, TrainConfig, to_jsonable
from easysft.config.generation import model_generation_defaults
from easysft.config.paths import check_output_folder, output_folder_lock
from easysft.data.batching import materialise, plan_epoch, plan_packed_epoch
from easysft.data.collate import collate, pack
from easysft.data.dataset import PreparedData, prepare_data
from easysft.data.mixing import format_mixing
from easysft.data.samples import sample_lengths
from easysft.data.tokenize import IGNORE_INDEX
from easysft.distributed import DistInfo, barrier, print0
from easysft.dtypes import dtype_for_device
from easysft.engines import choose_engine, make_engine
from easysft.errors import ConfigError
from easysft.evaluation import EvalResult
from easysft.files import write_json_atomic
from easysft.metrics import MetricsLogger
from easysft.models.load import load_model, load_tokenizer, resolve_model_path
from easysft.testing_hooks import TestingHooks, testing_hooks
from easysft.training.eval_extras import check_user_metric, prepare_eval_extras
from easysft.training.memory_check import check_memory_flags, check_run_memory
from easysft.training.selection import Selection

DEBUG_MAX_STEPS = 8
DEFAULT_OUTPUT_DIR = "easysft-output"


@dataclass
class TrainResult:
    """What a run produced: where, how many optimizer steps, each step's loss, the eval history."""

    output_dir: str
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)
    final_eval: EvalResult | None = None
    num_trainable_params: int = 0


@dataclass
class Position:
    """Where the loop stands: after optimizer step ``step``, in ``epoch``, at micro-batch ``next_micro_batch`` of
    that epoch's plan (the plan is recomputed from (seed, epoch), so this index is all a resume needs)."""

    step: int = 0
    epoch: int = 0
    next_micro_batch: int = 0
    nonfinite_in_a_row: int = 0


@dataclass
class Run:
    """One training run between :func:`setup` and the final save. The loop reads it; only the loop mutates
    ``position`` and ``result``."""

    model_cfg: ModelConfig
    data_cfg: DataConfig
    train_cfg: TrainConfig
    lora_cfg: LoraConfig
    gen_cfg: GenerateConfig
    dist: DistInfo
    engine: object
    tokenizer: object
    data: PreparedData
    output_dir: str
    total_steps: int
    run_config: dict
    metrics: MetricsLogger
    hooks: TestingHooks
    result: TrainResult
    position: Position
    resumed_from: Path | None = None
    extras: object = None  # EvalExtras (training/eval_extras.py): generation eval, probe
    selection: object = None  # Selection (training/selection.py): best model, early stopping

    def epoch_plan(self, epoch: int):
        """The seeded micro-batch plan of ``epoch`` for this rank (see easysft/data/batching.py).

        --packing: each micro-batch is ONE padding-free row. Without --packing_max_tokens the row holds exactly
        the samples an unpacked micro-batch would (same steps, same sample weighting, no padding); with a token
        budget the rows are best-fit bins, which pack tighter but group samples by length.
        """
        cfg, dist = self.train_cfg, self.dist
        mixing = getattr(self.data, "mixing", None)
        population = mixing.population(cfg.seed, epoch) if mixing is not None else None  # --data_weights
        if cfg.packing and cfg.packing_max_tokens:
            return plan_packed_epoch(sample_lengths(self.data.train), max_tokens=cfg.packing_max_tokens,
                                     seed=cfg.seed, epoch=epoch, rank=dist.rank, world_size=dist.world_size,
                                     population=population)
        lengths = sample_lengths(self.data.train) if cfg.group_by_length else None
        return plan_epoch(len(self.data.train), micro_batch_size=cfg.per_device_train_batch_size, seed=cfg.seed,
                          epoch=epoch, rank=dist.rank, world_size=dist.world_size, lengths=lengths,
                          population=population)

    def make_batch(self, indices) -> dict[str, torch.Tensor]:
        samples = materialise(indices, self.data.train)
        return pack(samples) if self.train_cfg.packing else collate(samples, self.tokenizer.pad_token_id)

    def model_meta(self) -> dict:
        """easysft.json: what eval/infer/chat need to reproduce the training prompt exactly."""
        from easysft import __version__

        # The settings generation eval measured with (unset flags filled from the model's generation_config).
        generation = dataclasses.asdict(self.gen_cfg.filled(model_generation_defaults(self.engine.unwrapped_model())))
        if generation.get("max_new_tokens") is None:
            generation["max_new_tokens"] = self.data_cfg.max_ans_len
        return {
            "easysft_version": __version__,
            "template": self.data.template.to_dict(),
            "max_prompt_len": self.data_cfg.max_prompt_len,
            "max_ans_len": self.data_cfg.max_ans_len,
            "generation": generation,
            "base_model": self.model_cfg.model_name_or_path,
        } | ({"best_model": self.selection.meta()} if self.selection is not None else {})


def setup(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig, lora_cfg: LoraConfig,
          gen_cfg: GenerateConfig) -> Run:
    """Engine, output folder, tokenizer, data, model, schedule, resume and run files: a :class:`Run`."""
    user_metric, user_metric_names = check_user_metric(train_cfg)  # a broken --eval_metric fails first
    dist = DistInfo.from_env()
    # --dtype auto resolved for this machine (easysft/dtypes.py); everything after reads the result.
    train_cfg = dataclasses.replace(train_cfg, dtype=dtype_for_device(train_cfg.dtype, dist.device,
                                                                      bf16_weights=train_cfg.bf16_weights))
    engine = make_engine(choose_engine(train_cfg, dist), dist)  # initialises torch.distributed if launched
    if train_cfg.dtype == "fp16" and dist.device.type != "cuda":
        raise ConfigError("--dtype fp16 needs a CUDA device; use --dtype bf16 or fp32 on CPU.")
    check_memory_flags(train_cfg, lora_cfg, engine=engine.name, device=dist.device)
    output_dir = prepare_output_dir(train_cfg, dist)
    resume_path = checkpoint.find_resume_checkpoint(train_cfg.resume, output_dir) if train_cfg.resume else None

    seed_everything(train_cfg.seed)
    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code,
                               chat_template=model_cfg.chat_template)
    data = prepare_data(data_cfg, tokenizer, seed=train_cfg.seed, debug=train_cfg.debug, is_main=dist.is_main)
    if dist.is_main and train_cfg.debug and data.train:
        print0(render_sample(tokenizer, data.train[0]))
    if data.mixing is not None:
        print0("\n".join(format_mixing(data.report["mixing"])))
    if train_cfg.bf16_weights and engine.name not in ("single", "ddp"):
        raise ConfigError(f"--bf16_weights works with the single and ddp engines, not {engine.name}; with "
                          f"{engine.name} use --dtype bf16 alone (its own mixed precision).")
    check_run_memory(model_cfg, data_cfg, train_cfg, lora_cfg, resolved.path, run_data=data, engine=engine, dist=dist)
    model = load_model(resolved.path, dtype="bf16" if train_cfg.bf16_weights else "fp32",
                       trust_remote_code=model_cfg.trust_remote_code,
                       adapter_path=resolved.adapter_path, adapter_trainable=True,
                       quantization=train_cfg.quantization, double_quant=train_cfg.double_quant, device=dist.device)
    choose_attention(model, train_cfg, dist.device.type)
    if train_cfg.quantization != "none":
        from easysft.models.quantize import describe_quantization

        print0(describe_quantization(model, train_cfg.quantization, train_cfg.double_quant))
    if lora_cfg.enabled:
        from easysft.models.lora import apply_lora, describe_lora

        model = apply_lora(model, lora_cfg)
        print0(describe_lora(model, lora_cfg))  # says what trains besides the adapters
    model = engine.prepare_model(model, train_cfg)
    if train_cfg.offload_activations:
        from easysft.kernels.offload import offload_saved_activations

        offload_saved_activations(model, pin_memory=dist.device.type == "cuda")
    if train_cfg.gradient_checkpointing:
        # transformers 5.24 renamed gradient_checkpointing_enable (removed in v6); same behaviour.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_total = sum(p.numel() for p in model.parameters())
    print0(f"trainable parameters: {num_trainable:,} of {num_total:,} ({100 * num_trainable / num_total:.2f}%)")
    if train_cfg.torch_compile:
        # dynamic=True: every packed row has its own length; with static first shapes torch recompiled each
        # graph-broken frame per new length. Symbolic lengths from the first compile: one compile per frame.
        model = torch.compile(model, dynamic=True)

    run = Run(model_cfg, data_cfg, train_cfg, lora_cfg, gen_cfg, dist, engine, tokenizer, data, output_dir,
              total_steps=0, run_config={}, metrics=None, hooks=testing_hooks(),
              result=TrainResult(output_dir=str(output_dir), steps=0, num_trainable_params=num_trainable),
              position=Position())
    steps_per_epoch = math.ceil(len(run.epoch_plan(0).batches) / train_cfg.gradient_accumulation_steps)
    run.total_steps = train_cfg.max_steps or math.ceil(train_cfg.num_train_epochs * steps_per_epoch)
    if train_cfg.debug:
        run.total_steps = min(run.total_steps, DEBUG_MAX_STEPS)
    engine.setup(model, train_cfg=train_cfg, num_training_steps=run.total_steps)
    run.extras = prepare_eval_extras(run, user_metric, user_metric_names)  # before resume: the probe's start
    run.selection = Selection.from_config(train_cfg)
    run.run_config = (to_jsonable(model_cfg, data_cfg, train_cfg, lora_cfg, gen_cfg)
                      | {"world_size": dist.world_size, "engine": engine.name, "total_steps": run.total_steps})
    if resume_path:  # weights, optimizer, scheduler and data position back; metrics.jsonl cut back to that step
        resumed = checkpoint.resume(resume_path, output_dir, engine, dist, run.run_config)
        state = resumed.state
        run.position = Position(state.step, state.epoch, state.next_micro_batch, state.nonfinite_in_a_row)
        run.result.losses, run.result.eval_history = resumed.losses, resumed.eval_history
        run.resumed_from = resumed.path
        if run.selection is not None:
            run.selection.replay(run.result.eval_history, output_dir)
    if dist.is_main:
        write_json_atomic(Path(output_dir) / "train_config.json", run.run_config)
        write_json_atomic(Path(output_dir) / "data_report.json", data.report)
    run.metrics = MetricsLogger(output_dir, enabled=dist.is_main, tensorboard=train_cfg.tensorboard)
    return run


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and every CUDA device), as ``transformers.set_seed`` does; importing that
    one pulls in transformers' trainer and with it peft (5 s) before a data error could be reported."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def choose_attention(model, train_cfg: TrainConfig, device_type: str) -> None:
    """``--attn_implementation`` (easysft/models/attention.py): ``auto`` on CPU keeps the model's own choice."""
    from easysft.models.attention import resolve_attn_implementation, set_attn_implementation

    choice = resolve_attn_implementation(train_cfg.attn_implementation, device_type,
                                         low_precision=train_cfg.dtype != "fp32")
    if train_cfg.attn_implementation == "auto" and device_type != "cuda":
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = set_attn_implementation(base, choice, device_type)
    print0(f"attention: {choice} ({name})")


def prepare_output_dir(train_cfg: TrainConfig, dist: DistInfo) -> str:
    """Validate ``--output_dir``: not a file; a used folder only with --overwrite_output_dir or --resume."""
    output_dir = train_cfg.output_dir or DEFAULT_OUTPUT_DIR
    if dist.is_main:
        # Rank 0 alone checks: another rank's writability probe file would make the folder look used. A refusal
        # ends rank 0, and the launcher then stops the ranks waiting at the barrier below.
        path = check_output_folder(output_dir, may_be_used=bool(train_cfg.overwrite_output_dir or train_cfg.resume),
                                   used_hint="pass --overwrite_output_dir to replace it or --resume to continue "
                                             "that run")
        path.mkdir(parents=True, exist_ok=True)
        if train_cfg.overwrite_output_dir and not train_cfg.resume:
            # A fresh run must not append to the old run's metrics nor resume the old run's checkpoints.
            if (path / "metrics.jsonl").exists():
                os.remove(path / "metrics.jsonl")
            checkpoint.remove_all(path)
    barrier()
    return output_dir


@contextlib.contextmanager
def output_lock(train_cfg: TrainConfig) -> Iterator[None]:
    """Rank 0 holds a lock on the output folder for the whole run (easysft/config/paths.py): a second run into
    the same folder fails at once instead of interleaving metrics and checkpoints. A folder this call created and
    the run left empty (it failed before writing) is removed again, so a bad input leaves nothing behind."""
    path = Path(train_cfg.output_dir or DEFAULT_OUTPUT_DIR).expanduser()
    if int(os.environ.get("RANK", "0")) != 0 or (path.exists() and not path.is_dir()):
        yield  # other ranks share rank 0's folder; a file is refused by prepare_output_dir with its own line
        return
    created = not path.exists()
    try:
        with output_folder_lock(path):
            yield
    finally:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def render_sample(tokenizer, sample: dict) -> str:
    """A sample as text with its supervised span marked ``[[...]]`` (the --debug view)."""
    prompt = [t for t, lab in zip(sample["input_ids"], sample["labels"], strict=True) if lab == IGNORE_INDEX]
    answer = [t for t, lab in zip(sample["input_ids"], sample["labels"], strict=True) if lab != IGNORE_INDEX]
    return ("sample 0 (supervised span in [[ ]]):\n" + tokenizer.decode(prompt) + "[[" + tokenizer.decode(answer)
            + "]]\n" + json.dumps({"prompt_tokens": len(prompt), "supervised_tokens": len(answer)}))
