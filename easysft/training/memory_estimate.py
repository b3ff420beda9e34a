"""The expected peak memory of one device, from the model's config and the prepared data, before any weight loads.

``estimate_memory`` adds up, in bytes:

- **weights**: parameters counted on the meta device (no memory, no download), stored in fp32 (easysft keeps fp32
  master weights; ``--dtype bf16`` is autocast), in bf16 with ``--bf16_weights``, or under ``--quantization`` the
  decoder's linear layers at 4.5 / ~4.1 (double quant) / 8 bits and the rest in bf16; LoRA adapters in fp32.
  Sharded over ranks by FSDP2 and ZeRO-3.
- **gradients**: 4 bytes per trainable parameter, 2 with ``--bf16_weights`` (sharded by FSDP2, ZeRO-2/3); twice
  that under DDP, whose reducer keeps its own gradient buckets.
- **optimizer**: per trainable parameter 8 bytes for AdamW, ~2 for the 8-bit and ~1 for the 4-bit variants
  (engines/optimizers.py; sharded by FSDP2 and ZeRO-1/2/3); ``--bf16_weights`` adds the 4-byte fp32 master copy
  (its chunked step never holds all fp32 gradients at once: engines/optim.py).
- **activations** of the largest micro-batch the data can produce (the longest padded rows, or the fullest packed
  row): per token and decoder layer the tensors autograd keeps for a Llama-style block (7 hidden + 2 key/value + 4
  MLP-width values; 5 + 2 + 2 with ``--lean_activations``); with gradient checkpointing only each layer's input
  plus one layer recomputed; the LM head's fp32 logits over supervised positions (logits, their log-softmax and
  its gradient), at most one chunk of them where the chunked loss runs (easysft/chunked_ce.py: single process and
  DDP; a chunk is 256 MiB of fp32 logits on CUDA, 1 GiB on CPU); the packed rows' dense attention mask.
  ``--offload_activations`` moves the per-layer part to CPU memory (on CUDA it leaves the device; on CPU it
  stays in the same RAM).
- **runtime**: on CPU the process's resident memory when the estimate is made (interpreter, libraries,
  tokenizer, data: all already there); on CUDA the CUDA context (~0.5 GiB, not in torch's allocator figures).

It is an estimate of the peak, meant to tell "fits" from "clearly does not": the test holds it within 20% of the
measured peak resident memory of the bundled model's full and LoRA runs.
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from easysft.chunked_ce import default_chunk_tokens
from easysft.data.samples import sample_lengths, supervised_counts
from easysft.engines.optimizers import STATE_BYTES_PER_PARAM
from easysft.models.quantize import BITS_PER_WEIGHT, is_quantized

GiB = 2**30
CUDA_CONTEXT_BYTES = GiB // 2


@dataclass
class ParamCounts:
    """Parameter counts of a model built on the meta device."""

    total: int  # every parameter (tied weights once)
    quantizable: int  # the decoder's nn.Linear weights (bitsandbytes quantizes these)
    lora: int  # adapter parameters for the requested targets and rank (0 without LoRA)
    hidden: int
    intermediate: int
    kv_width: int  # key/value projection width (num_key_value_heads x head_dim)
    layers: int
    vocab: int


@dataclass
class StepShape:
    """The largest micro-batch the data can produce: rows x padded length, and its supervised tokens."""

    rows: int
    row_tokens: int
    supervised_tokens: int

    @property
    def tokens(self) -> int:
        return self.rows * self.row_tokens


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int
    step: StepShape

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    def describe(self, device: torch.device) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GiB:.2f}"
                          for name in ("weights", "gradients", "optimizer", "activations", "runtime"))
        return (f"memory estimate per device ({device.type}): {self.total / GiB:.2f} GiB peak = {parts} GiB "
                f"(largest micro-batch: {self.step.rows} x {self.step.row_tokens} tokens, "
                f"{self.step.supervised_tokens} supervised)")


def count_params(config, *, lora_rank: int = 0, lora_module_name: str = "all-linear") -> ParamCounts:
    """Parameter counts of ``config``'s causal LM, built on the meta device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    from easysft.models.lora import linear_module_names, resolve_target_modules

    modules = dict(model.named_modules())
    quantizable = sum(modules[n].weight.numel() for n in linear_module_names(model))
    lora = 0
    if lora_rank:
        for name in resolve_target_modules(model, lora_module_name):
            lora += lora_rank * (modules[name].in_features + modules[name].out_features)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1))
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_width = int(getattr(text, "num_key_value_heads", None) or heads) * head_dim
    return ParamCounts(total=sum(p.numel() for p in model.parameters()), quantizable=quantizable, lora=lora,
                       hidden=hidden, intermediate=int(getattr(text, "intermediate_size", 4 * hidden)),
                       kv_width=kv_width, layers=int(text.num_hidden_layers), vocab=int(text.vocab_size))


def largest_step(samples: Sequence[dict], *, batch_size: int, packing: bool,
                 packing_max_tokens: int | None) -> StepShape:
    """The largest micro-batch ``samples`` can make: padded rows of the longest samples, or the fullest packed row."""
    if not len(samples):
        return StepShape(0, 0, 0)
    # From the cache's offsets and mask, never sample by sample: a million-sample split stays two arrays.
    lengths = np.sort(np.asarray(sample_lengths(samples), dtype=np.int64))[::-1]
    supervised = np.sort(np.asarray(supervised_counts(samples), dtype=np.int64))[::-1]
    top = min(batch_size, len(lengths))
    total, total_supervised = int(lengths.sum()), int(supervised.sum())
    if packing and packing_max_tokens:
        row = max(int(lengths[0]), min(packing_max_tokens, total))
        share = row / max(total / len(lengths), 1)  # samples in a full bin, on average
        return StepShape(1, row, min(total_supervised, int(share * total_supervised / len(supervised)) + 1))
    if packing:
        return StepShape(1, int(lengths[:top].sum()), int(supervised[:top].sum()))
    return StepShape(top, int(lengths[0]), int(supervised[:top].sum()))


def _shards(engine: str, zero_stage: int, world: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) divisors for the engine's sharding."""
    if engine == "fsdp":
        return world, world, world
    if engine == "deepspeed":
        return (world if zero_stage >= 3 else 1, world if zero_stage >= 2 else 1, world if zero_stage >= 1 else 1)
    return 1, 1, 1


def activation_bytes(counts: ParamCounts, step: StepShape, *, lean: bool, checkpointing: bool, offload: bool,
                     device_type: str, bytes_per_value: float, chunked_loss: bool = True) -> int:
    """Activation memory of one micro-batch's forward+backward (see the module docstring); ``chunked_loss``: the
    LM head runs through easysft/chunked_ce.py (single process, DDP), so its fp32 logits never exceed one chunk."""
    h, kv, inter, layers = counts.hidden, counts.kv_width, counts.intermediate, counts.layers
    per_layer = (5 * h + 2 * kv + 2 * inter) if lean else (7 * h + 2 * kv + 4 * inter)
    per_layer *= step.tokens * bytes_per_value
    if checkpointing:
        kept = layers * step.tokens * h * bytes_per_value + per_layer  # layer inputs + one layer recomputed
    else:
        kept = layers * per_layer
    if offload and device_type == "cuda":
        kept = per_layer  # one layer's tensors on their way out / back
    head_tokens = step.supervised_tokens
    if chunked_loss:
        head_tokens = min(head_tokens, default_chunk_tokens(counts.vocab, device_type))
    head = 3 * head_tokens * counts.vocab * 4 + 2 * step.tokens * h * 4
    mask = step.row_tokens * step.row_tokens if step.rows == 1 and step.row_tokens > 1 else 0
    return int(kept + head + mask)


def estimate_memory(counts: ParamCounts, step: StepShape, *, lora: bool, only_optimize_lora: bool = True,
                    quantization: str = "none", double_quant: bool = False, optim: str = "adamw",
                    engine: str = "single", zero_stage: int = 0, world_size: int = 1, dtype: str = "fp32",
                    bf16_weights: bool = False, lean: bool = True, checkpointing: bool = False,
                    offload: bool = False, device: torch.device | None = None) -> MemoryEstimate:
    """The expected peak of one device (see the module docstring); ``device`` defaults to the CPU."""
    device = device if device is not None else torch.device("cpu")
    w_div, g_div, o_div = _shards(engine, zero_stage, world_size)
    if is_quantized(quantization):
        bits = BITS_PER_WEIGHT["4bit+double_quant" if double_quant else quantization]
        weights = counts.quantizable * bits / 8 + (counts.total - counts.quantizable) * 2 + counts.lora * 4
    else:
        weights = (counts.total + (counts.lora if lora else 0)) * (2 if bf16_weights else 4)
    trainable = counts.lora if lora and only_optimize_lora else counts.total + (counts.lora if lora else 0)
    state_bytes = STATE_BYTES_PER_PARAM[optim] + (4 if bf16_weights else 0)  # + the fp32 master copy
    grad_bytes = 2 if bf16_weights else 4
    bytes_per_value = 2.0 if is_quantized(quantization) or bf16_weights else (4.0 if dtype == "fp32" else 3.0)
    unsharded_head = engine in ("single", "ddp")  # lean ops and the chunked loss need the plain, unsharded modules
    activations = activation_bytes(counts, step, lean=lean and unsharded_head, checkpointing=checkpointing,
                                   offload=offload, device_type=device.type, bytes_per_value=bytes_per_value,
                                   chunked_loss=unsharded_head)
    runtime = current_rss_bytes() if device.type == "cpu" else CUDA_CONTEXT_BYTES
    grad_copies = 2 if engine == "ddp" else 1  # DDP's reducer buckets (no gradient_as_bucket_view)
    return MemoryEstimate(weights=int(weights / w_div), gradients=int(grad_copies * trainable * grad_bytes / g_div),
                          optimizer=int(trainable * state_bytes / o_div),
                          activations=activations, runtime=int(runtime), step=step)


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux /proc), or its peak so far elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            import os

            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_capacity_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes the run may use, what that is): CUDA total memory, or the CPU's available RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)} total"
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
        return info["MemAvailable"] + current_rss_bytes(), "available RAM"
    except (OSError, KeyError, ValueError):
        return 0, "unknown"
