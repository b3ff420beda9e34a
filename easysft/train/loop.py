"""``train(...)``: set-up, then one readable loop (micro-batches, backward, clip, step, log, eval, save).

Read it top to bottom. Each feature is an explicit line behind a flag; there are no callbacks.

Loss math (ARCHITECTURE rule 3): every micro-batch contributes ``loss_sum / step_tokens`` where ``step_tokens``
is the number of supervised tokens in the WHOLE optimizer step (all micro-batches, all ranks), so the update does
not depend on how the step is split into micro-batches or ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from easysft import checkpoint, signals
from easysft.config import DataConfig, GenerateConfig, LoraConfig, ModelConfig, TrainConfig, to_jsonable
from easysft.data.batching import materialise, plan_epoch, plan_packed_epoch
from easysft.data.collate import collate, count_supervised, count_tokens, pack
from easysft.data.dataset import prepare_data
from easysft.data.tokenize import IGNORE_INDEX
from easysft.distributed import DistInfo, all_reduce_sum, barrier, print0
from easysft.engines import choose_engine, make_engine
from easysft.engines.base import autocast_context
from easysft.errors import ConfigError, NotAvailableYet, TrainingError
from easysft.evaluate import EvalResult, evaluate
from easysft.metrics import MetricsLogger, plot_losses
from easysft.models.load import load_model, load_tokenizer, resolve_model_path
from easysft.models.save import save_model_folder, write_json_atomic
from easysft.train.faults import maybe_fail
from easysft.train.lean_ops import apply_lean_ops
from easysft.train.loss import supervised_loss_sum
from easysft.train.memory import release_freed_memory

DEBUG_MAX_STEPS = 8


@dataclass
class TrainResult:
    """What a run produced: where, how many optimizer steps, each step's loss, the eval history."""

    output_dir: str
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)
    final_eval: EvalResult | None = None
    num_trainable_params: int = 0


def train(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    lora_cfg: LoraConfig | None = None,
    gen_cfg: GenerateConfig | None = None,
) -> TrainResult:
    """Fine-tune ``model_cfg``'s model on ``data_cfg``'s data; write the model and logs to ``output_dir``."""
    lora_cfg = lora_cfg or LoraConfig()
    gen_cfg = gen_cfg or GenerateConfig()
    _reject_unavailable(train_cfg, lora_cfg)
    dist = DistInfo.from_env()
    engine = make_engine(choose_engine(train_cfg, dist), dist)  # initialises torch.distributed if launched
    if train_cfg.dtype == "fp16" and dist.device.type != "cuda":
        raise ConfigError("--dtype fp16 needs a CUDA device; use --dtype bf16 or fp32 on CPU.")
    output_dir = _prepare_output_dir(train_cfg, dist)
    checkpoint.require_support(engine, train_cfg)
    resume_path = checkpoint.find_resume_checkpoint(train_cfg.resume, output_dir) if train_cfg.resume else None

    # ---- model, tokenizer, data -------------------------------------------------------------------------------
    from transformers import set_seed

    set_seed(train_cfg.seed)
    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code)
    data = prepare_data(data_cfg, tokenizer, seed=train_cfg.seed, debug=train_cfg.debug, is_main=dist.is_main)
    if dist.is_main and train_cfg.debug and data.train:
        print0(render_sample(tokenizer, data.train[0]))
    model = load_model(resolved.path, dtype="fp32", trust_remote_code=model_cfg.trust_remote_code,
                       adapter_path=resolved.adapter_path, adapter_trainable=True)
    if lora_cfg.enabled:
        from easysft.lora import apply_lora, describe_lora

        model = apply_lora(model, lora_cfg)
        print0(describe_lora(model, lora_cfg))  # says what trains besides the adapters
    if train_cfg.lean_activations and engine.name in ("single", "ddp"):
        # ZeRO-3 / FSDP gather weights in module hooks, which the fused MLP tail bypasses; DDP reduces gradients
        # as autograd accumulates them (no deferred head gradient); hooks and callbacks stay out of torch.compile.
        apply_lean_ops(model, recompute_norm_outputs=not train_cfg.torch_compile,
                       defer_head_weight_grad=engine.name == "single" and not train_cfg.torch_compile)
    if train_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_total = sum(p.numel() for p in model.parameters())
    print0(f"trainable parameters: {num_trainable:,} of {num_total:,} ({100 * num_trainable / num_total:.2f}%)")
    if train_cfg.torch_compile:
        model = torch.compile(model)

    # ---- schedule ------------------------------------------------------------------------------------------------
    mbs, gas = train_cfg.per_device_train_batch_size, train_cfg.gradient_accumulation_steps
    lengths = [len(s["input_ids"]) for s in data.train] if train_cfg.group_by_length else None
    # --packing: each micro-batch is ONE padding-free row. Without --packing_max_tokens the row holds exactly the
    # samples an unpacked micro-batch would (same steps, same sample weighting, no padding); with a token budget
    # the rows are best-fit bins, which pack tighter but group samples by length.
    pack_tokens = train_cfg.packing_max_tokens
    sample_lengths = [len(s["input_ids"]) for s in data.train]

    def epoch_plan(epoch: int):
        if train_cfg.packing and pack_tokens:
            return plan_packed_epoch(sample_lengths, max_tokens=pack_tokens,
                                     seed=train_cfg.seed, epoch=epoch, rank=dist.rank, world_size=dist.world_size)
        return plan_epoch(len(data.train), micro_batch_size=mbs, seed=train_cfg.seed, epoch=epoch,
                          rank=dist.rank, world_size=dist.world_size, lengths=lengths)

    def make_batch(indices):
        samples = materialise(indices, data.train)
        return pack(samples) if train_cfg.packing else collate(samples, tokenizer.pad_token_id)

    steps_per_epoch = math.ceil(len(epoch_plan(0).batches) / gas)
    total_steps = train_cfg.max_steps or math.ceil(train_cfg.num_train_epochs * steps_per_epoch)
    if train_cfg.debug:
        total_steps = min(total_steps, DEBUG_MAX_STEPS)
    engine.setup(model, train_cfg=train_cfg, num_training_steps=total_steps)
    if train_cfg.release_cpu_memory and dist.device.type == "cpu" and engine.name in ("single", "ddp"):
        release_freed_memory(model)  # FSDP2 and DeepSpeed manage their own gradient buffers
    run_config = (to_jsonable(model_cfg, data_cfg, train_cfg, lora_cfg, gen_cfg)
                  | {"world_size": dist.world_size, "engine": engine.name, "total_steps": total_steps})
    # --resume: weights, optimizer, scheduler and data position back; metrics.jsonl cut back to that step.
    resumed = checkpoint.resume(resume_path, output_dir, engine, dist, run_config) if resume_path else None

    # ---- run files (rank 0) -------------------------------------------------------------------------------------
    meta = model_meta(data, data_cfg, gen_cfg, model_cfg)
    if dist.is_main:
        write_json_atomic(Path(output_dir) / "train_config.json", run_config)
        write_json_atomic(Path(output_dir) / "data_report.json", data.report)
    metrics = MetricsLogger(output_dir, enabled=dist.is_main, tensorboard=train_cfg.tensorboard)
    result = TrainResult(output_dir=str(output_dir), steps=0, num_trainable_params=num_trainable)
    if resumed:
        result.losses, result.eval_history = resumed.losses, resumed.eval_history

    def run_eval(step: int, epoch: float) -> None:
        if not data.eval:
            return
        ev = evaluate(engine.model, data.eval, batch_size=train_cfg.per_device_eval_batch_size,
                      pad_token_id=tokenizer.pad_token_id, rank=dist.rank, world_size=dist.world_size,
                      device=dist.device, autocast_dtype=_autocast_dtype(train_cfg.dtype))
        record = {"step": step, "epoch": round(epoch, 4), "eval_loss": ev.loss, "eval_ppl": ev.perplexity,
                  "eval_num_tokens": ev.num_tokens}
        metrics.log(record)
        result.eval_history.append(record)
        result.final_eval = ev
        print0(f"eval step {step}: loss {ev.loss:.4f} ppl {ev.perplexity:.3f} ({ev.num_tokens} tokens)")

    # ---- the loop -----------------------------------------------------------------------------------------------
    from tqdm import tqdm

    if resumed is None:
        run_eval(0, 0.0)
    step, epoch, skip_micro_batches = 0, 0, 0
    nonfinite_in_a_row = 0
    if resumed:  # the epoch's plan is recomputed from (seed, epoch); consumed micro-batches are skipped by index
        state = resumed.state
        step, epoch, skip_micro_batches = state.step, state.epoch, state.next_micro_batch
        nonfinite_in_a_row = state.nonfinite_in_a_row
        checkpoint.restore_rng(resumed.path, dist)  # last: nothing may draw random numbers before the loop
    stopper = signals.StopSignals()  # SIGTERM/SIGINT: finish the step, checkpoint, exit (see signals.py)
    progress = tqdm(total=total_steps, initial=step, disable=not dist.is_main, dynamic_ncols=True, desc="train")
    started = time.perf_counter()
    while step < total_steps:
        plan = epoch_plan(epoch)
        for first in range(skip_micro_batches, len(plan.batches), gas):
            if step >= total_steps:
                break
            step_started = time.perf_counter()
            batches = [make_batch(idx) for idx in plan.batches[first : first + gas]]
            # All-reduce the step's supervised-token count BEFORE any backward: it is the loss denominator.
            local = [sum(count_supervised(b) for b in batches), sum(count_tokens(b) for b in batches)]
            step_tokens, step_total_tokens = (int(x) for x in all_reduce_sum(torch.tensor(local)))
            step_loss_sum = torch.zeros((), dtype=torch.float64)
            engine.model.train()
            for i, batch in enumerate(batches):
                batch = {k: v.to(dist.device) for k, v in batch.items()}
                with engine.accumulate(i == len(batches) - 1), autocast_context(dist.device, train_cfg.dtype):
                    out = supervised_loss_sum(engine.model, batch)
                    if step + 1 in stopper.hooks.nan_steps:  # testing hook EASYSFT_INJECT_NAN_AT_STEP
                        out.loss_sum = out.loss_sum * float("nan")
                    loss = out.loss_sum / max(step_tokens, 1) * engine.grad_scale
                engine.backward(loss)
                step_loss_sum += out.loss_sum.detach().double().cpu()
            step_loss = float(all_reduce_sum(step_loss_sum)) / max(step_tokens, 1)
            lr = engine.current_lr()  # the LR this update uses (the scheduler moves on inside the step)
            grad_norm = engine.grad_norm_and_step(train_cfg.max_grad_norm, skip=not math.isfinite(step_loss))
            step += 1
            maybe_fail(step, dist.rank)  # testing hook (EASYSFT_FAIL_AT_STEP); a no-op otherwise
            epoch_progress = epoch + min(1.0, (first + gas) / len(plan.batches))

            # Non-finite guard: the update was skipped by the engine; count and stop after too many in a row.
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                nonfinite_in_a_row += 1
                metrics.log({"step": step, "event": "nonfinite_step_skipped", "loss": step_loss,
                             "grad_norm": grad_norm})
                print0(f"step {step}: non-finite loss/grad norm ({step_loss}, {grad_norm}); update skipped")
                if nonfinite_in_a_row >= train_cfg.max_nonfinite_steps:
                    # Skipped steps left the weights untouched: this checkpoint IS the last good state.
                    saved = checkpoint.save(output_dir, engine, checkpoint.TrainerState(
                        step, epoch, first + gas, reason="nonfinite"), run_config, dist) if train_cfg.output_dir else None
                    progress.close()  # before the error line, so the bar is not redrawn after it
                    raise TrainingError(
                        f"{nonfinite_in_a_row} non-finite steps in a row (last at step {step}); lower "
                        "--learning_rate, use --dtype fp32, or check the data."
                        + (f" Last good state saved in {saved}." if saved else "")
                    )
            else:
                nonfinite_in_a_row = 0

            elapsed = time.perf_counter() - step_started
            record = {"step": step, "epoch": round(epoch_progress, 4), "loss": step_loss, "lr": lr,
                      "grad_norm": grad_norm, "num_tokens": step_tokens, "total_tokens": step_total_tokens,
                      "tokens_per_s": step_total_tokens / max(elapsed, 1e-9),
                      "supervised_tokens_per_s": step_tokens / max(elapsed, 1e-9)}
            metrics.log(record)
            result.losses.append(step_loss)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            if train_cfg.print_loss:
                print0(f"epoch {epoch} step {step}: loss {step_loss:.6f}")
            if train_cfg.eval_steps and step % train_cfg.eval_steps == 0:
                run_eval(step, epoch_progress)
            # Checkpoint every --save_steps, and on SIGTERM/SIGINT (then exit with the preemption code).
            stop_reason = stopper.should_stop(step)
            if stop_reason or (train_cfg.save_steps and step % train_cfg.save_steps == 0):
                saved = checkpoint.save(output_dir, engine, checkpoint.TrainerState(
                    step, epoch, first + gas, nonfinite_in_a_row, reason="preempted" if stop_reason else "save_steps"),
                    run_config, dist, train_cfg.save_total_limit)
                if stop_reason:
                    progress.close()
                    raise signals.Preempted(signals.stopped_message(stop_reason, step, saved))
        epoch += 1
        skip_micro_batches = 0
        if step < total_steps and result.eval_history and result.eval_history[-1]["step"] != step:
            run_eval(step, float(epoch))  # end of a full epoch
    if not result.eval_history or result.eval_history[-1]["step"] != step:
        run_eval(step, epoch_progress)
    progress.close()
    stopper.restore()
    result.steps = step
    print0(f"trained {step} steps in {time.perf_counter() - started:.1f}s")

    # ---- final save: gathering shards is a collective every rank joins; only rank 0 writes -----------------
    state_dict = engine.full_state_dict()
    if dist.is_main:
        save_model_folder(engine.unwrapped_model(), tokenizer, output_dir, meta=meta,
                          state_dict=state_dict if getattr(engine, "gathers_state_dict", False) else None,
                          # base weights trained too: the adapter alone would not be the model, save merged
                          merge_lora=lora_cfg.enabled and not lora_cfg.only_optimize_lora)
        metrics.close()
        plot_losses(Path(output_dir) / "metrics.jsonl", Path(output_dir) / "loss.png")
        print0(f"saved the model to {output_dir}")
    barrier()
    return result


# -------------------------------------------------------------------------------------------------------------------


def _autocast_dtype(dtype: str):
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _reject_unavailable(train_cfg: TrainConfig, lora_cfg: LoraConfig) -> None:
    """An engine name the registry does not know: a clear error before anything loads, never a silent fallback."""
    from easysft.engines import ENGINES

    wanted = choose_engine(train_cfg, DistInfo.from_env())
    if wanted not in ENGINES:
        raise NotAvailableYet(f"the {wanted!r} engine (--deepspeed/--zero_stage/--engine) is not available.")


def _prepare_output_dir(train_cfg: TrainConfig, dist: DistInfo) -> str:
    """Validate ``--output_dir``: not a file; a used folder only with --overwrite_output_dir or --resume."""
    output_dir = train_cfg.output_dir or "easysft-output"
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is a file; give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not (train_cfg.overwrite_output_dir or train_cfg.resume):
        raise ConfigError(
            f"--output_dir {output_dir} is not empty (another run's files?); pass --overwrite_output_dir to "
            "replace it or --resume to continue that run."
        )
    if dist.is_main:
        path.mkdir(parents=True, exist_ok=True)
        if train_cfg.overwrite_output_dir and not train_cfg.resume:
            # A fresh run must not append to the old run's metrics.
            for stale in ("metrics.jsonl",):
                if (path / stale).exists():
                    os.remove(path / stale)
            checkpoint.remove_all(path)  # the old run's checkpoints must never be resumed into this one
    barrier()
    return output_dir


def model_meta(data, data_cfg: DataConfig, gen_cfg: GenerateConfig, model_cfg: ModelConfig) -> dict:
    """easysft.json: what eval/infer/chat need to reproduce the training prompt exactly."""
    from easysft import __version__

    generation = dataclasses.asdict(gen_cfg)
    if generation.get("max_new_tokens") is None:
        generation["max_new_tokens"] = data_cfg.max_ans_len
    return {
        "easysft_version": __version__,
        "template": data.template.to_dict(),
        "max_prompt_len": data_cfg.max_prompt_len,
        "max_ans_len": data_cfg.max_ans_len,
        "generation": generation,
        "base_model": model_cfg.model_name_or_path,
    }


def render_sample(tokenizer, sample: dict) -> str:
    """A sample as text with its supervised span marked ``[[...]]`` (the --debug view)."""
    prompt = [t for t, lab in zip(sample["input_ids"], sample["labels"], strict=True) if lab == IGNORE_INDEX]
    answer = [t for t, lab in zip(sample["input_ids"], sample["labels"], strict=True) if lab != IGNORE_INDEX]
    return ("sample 0 (supervised span in [[ ]]):\n" + tokenizer.decode(prompt) + "[[" + tokenizer.decode(answer)
            + "]]\n" + json.dumps({"prompt_tokens": len(prompt), "supervised_tokens": len(answer)}))
