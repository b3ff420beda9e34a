"""Memory gates of a training run: flag combinations that cannot run, the estimate before loading weights, and the
one-line report of an out-of-memory error during training.

All three name the same levers, so a user who hits any of them knows what to pull.
"""

from __future__ import annotations

import torch

from easysft.distributed import print0
from easysft.errors import ModelError, TrainingError
from easysft.training.memory_estimate import (
    GiB,
    MemoryEstimate,
    count_params,
    device_capacity_bytes,
    estimate_memory,
    largest_step,
)

# Refuse only when the estimate is this much over the device: the estimate is meant to be within ~20%.
REFUSE_FACTOR = 1.2
LEVERS = ("--lora_dim 16, --quantization 4bit (with LoRA), --optim adamw_8bit, --gradient_checkpointing, "
          "--offload_activations, a smaller --per_device_train_batch_size or --packing_max_tokens, shorter "
          "--max_prompt_len/--max_ans_len")


def check_memory_flags(train_cfg, lora_cfg, *, engine: str, device: torch.device) -> None:
    """One-line ConfigErrors for --quantization / --optim combinations that cannot run here."""
    from easysft.engines.optimizers import check_optim
    from easysft.models.quantize import check_quantization

    check_quantization(train_cfg.quantization, lora_enabled=lora_cfg.enabled,
                       only_optimize_lora=lora_cfg.only_optimize_lora, engine=engine)
    check_optim(train_cfg.optim, engine=engine, device_type=device.type)


def check_run_memory(model_cfg, data_cfg, train_cfg, lora_cfg, model_path: str, *, run_data, engine, dist) -> None:
    """Print the memory estimate of this run; refuse (TrainingError naming the levers) when it clearly cannot fit
    the device, unless --skip_memory_check. Reads the model's config only; nothing is loaded."""
    estimate = estimate_run_memory(model_cfg, train_cfg, lora_cfg, model_path, samples=run_data.train,
                                   engine_name=engine.name, world_size=dist.world_size, device=dist.device)
    print0(estimate.describe(dist.device))
    capacity, what = device_capacity_bytes(dist.device)
    if capacity and estimate.total > REFUSE_FACTOR * capacity and not train_cfg.skip_memory_check:
        raise TrainingError(
            f"this run needs about {estimate.total / GiB:.1f} GiB per device but the {what} is "
            f"{capacity / GiB:.1f} GiB; pull a lever: {LEVERS} (or --skip_memory_check to start anyway).")


def estimate_run_memory(model_cfg, train_cfg, lora_cfg, model_path: str, *, samples, engine_name: str,
                        world_size: int, device: torch.device) -> MemoryEstimate:
    """The estimate of a run of these configs on ``device`` (any device type: nothing runs there), from the
    model's config.json and the prepared training ``samples``; a ModelError when the config is not a causal LM."""
    from transformers import AutoConfig

    config = None
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        counts = count_params(config, lora_rank=lora_cfg.lora_dim, lora_module_name=lora_cfg.lora_module_name)
    except (OSError, ValueError) as exc:  # the same one line load_model gives, before minutes of loading
        model_type = getattr(config, "model_type", "?")
        raise ModelError(f"{model_path} ({model_type}) is not a causal language model that transformers can load: "
                         f"{str(exc).splitlines()[0]}") from None
    step = largest_step(samples, batch_size=train_cfg.per_device_train_batch_size,
                        packing=train_cfg.packing, packing_max_tokens=train_cfg.packing_max_tokens)
    return estimate_memory(
        counts, step, lora=lora_cfg.enabled, only_optimize_lora=lora_cfg.only_optimize_lora,
        quantization=train_cfg.quantization, double_quant=train_cfg.double_quant, optim=train_cfg.optim,
        engine=engine_name, zero_stage=train_cfg.zero_stage, world_size=world_size, dtype=train_cfg.dtype,
        bf16_weights=train_cfg.bf16_weights, lean=train_cfg.lean_activations,
        checkpointing=train_cfg.gradient_checkpointing, offload=train_cfg.offload_activations, device=device)


def peak_memory_bytes(device: torch.device) -> int:
    """The measured peak so far: torch's CUDA allocator peak, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def out_of_memory_error(step: int, row_tokens: int, rows: int, device: torch.device, last_checkpoint) -> TrainingError:
    """The one line that ends a run whose step ran out of device memory."""
    saved = f"the last checkpoint ({last_checkpoint}) is intact" if last_checkpoint else "no checkpoint was written"
    return TrainingError(
        f"out of memory on {device} at step {step} ({rows} row(s) of up to {row_tokens} tokens; measured peak "
        f"{peak_memory_bytes(device) / GiB:.2f} GiB); {saved}; pull a lever: {LEVERS}.")


def out_of_memory_at(run, micro_batches, step: int) -> TrainingError:
    """:func:`out_of_memory_error` for ``step`` of ``run`` (its micro-batches as sample-index lists)."""
    from easysft import checkpoint

    lengths = [[len(run.data.train[i]["input_ids"]) for i in indices] for indices in micro_batches]
    if run.train_cfg.packing:
        rows, row_tokens = 1, max(sum(batch) for batch in lengths)
    else:
        rows, row_tokens = max(len(batch) for batch in lengths), max(max(batch) for batch in lengths)
    complete = [path for _, path, done in checkpoint.list_checkpoints(run.output_dir) if done]
    return out_of_memory_error(step, row_tokens, rows, run.dist.device, complete[-1] if complete else None)
