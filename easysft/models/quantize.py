"""``--quantization 4bit|8bit`` (QLoRA): the frozen base weights quantized by bitsandbytes at load time.

What happens: transformers loads the checkpoint with a ``BitsAndBytesConfig``; every ``nn.Linear`` of the decoder
becomes a bitsandbytes ``Linear4bit`` (NF4 weights in blocks of 64 with an fp32 scale each, or with
``--double_quant`` 8-bit scales in blocks of 256: ~0.4 bit/weight less) computing in bf16, or a ``Linear8bitLt``
(LLM.int8: int8 weights, one scale per row). The LM head and the embeddings stay unquantized, and like the norms
they are kept in bf16 (QLoRA's recipe: the model's frozen part is small and bf16 halves it). PEFT then wraps the
quantized layers with fp32 LoRA adapters, so only the adapters train and the saved adapter is an ordinary one:
it loads on the unquantized base and on the quantized one alike.

Where it runs: bitsandbytes 0.50 quantizes and computes on CPU (tests) and CUDA. Engines: single process and DDP
(every rank loads its own quantized copy). FSDP2 and DeepSpeed ZeRO shard parameters, which needs
bitsandbytes' ``quant_storage`` flat-parameter recipe that easysft does not implement: a one-line ConfigError.
"""

from __future__ import annotations

import torch

from easysft.errors import ConfigError

# Bits per quantized weight, block scales included (used by the memory estimate).
BITS_PER_WEIGHT = {"4bit": 4 + 32 / 64, "4bit+double_quant": 4 + 8 / 64 + 32 / (64 * 256), "8bit": 8 + 32 / 4096}
BASE_DTYPE = torch.bfloat16  # unquantized frozen weights (embeddings, LM head, norms) under --quantization


def is_quantized(quantization: str | None) -> bool:
    return bool(quantization) and quantization != "none"


def check_quantization(quantization: str, *, lora_enabled: bool, only_optimize_lora: bool, engine: str) -> None:
    """One-line ConfigError for a quantized run that cannot work (checked before any model loads)."""
    if not is_quantized(quantization):
        return
    if not lora_enabled:
        raise ConfigError(f"--quantization {quantization} freezes the base weights: add --lora_dim (e.g. 16) to "
                          "train LoRA adapters on them (QLoRA).")
    if not only_optimize_lora:
        raise ConfigError(f"--quantization {quantization} cannot train the quantized base weights: drop "
                          "--only_optimize_lora false.")
    require_package("bitsandbytes", f"--quantization {quantization}")
    if engine not in ("single", "ddp"):
        raise ConfigError(f"--quantization {quantization} runs with the single-process and DDP engines only (this "
                          f"run uses {engine}); launch with torchrun without --engine fsdp / DeepSpeed.")


def bnb_config(quantization: str, *, double_quant: bool = False):
    """The transformers ``BitsAndBytesConfig`` for ``--quantization``."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_storage=torch.uint8)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"bnb_config: unknown quantization {quantization!r}")


def quantized_load_kwargs(quantization: str, *, double_quant: bool, device: torch.device) -> dict:
    """Extra ``from_pretrained`` arguments: the config, bf16 for the unquantized rest, and the device the weights
    are quantized onto (bitsandbytes quantizes while loading; a quantized model cannot be moved by ``.to``)."""
    index = device.index if device.type == "cuda" and device.index is not None else None
    target = f"cuda:{index}" if index is not None else device.type
    return {"quantization_config": bnb_config(quantization, double_quant=double_quant), "dtype": BASE_DTYPE,
            "device_map": {"": target}}


def keep_trainable_layout(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` in the weight layout training uses; the number of layers.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` called in eval mode on an input without
    gradient (our causal probe at load time, every evaluation) repacks the layer's weight IN PLACE into an
    inference-only CPU layout (``_convert_weight_packed_for_cpu``, ``quant_state.packing_format_for_cpu``):
    - a layer whose in_features is not a multiple of the block size (64) crashes there ("shape '[32, 0]' is
      invalid for input of size 16" for a model with hidden size 32);
    - every later forward, in training too, goes through ``gemv_4bit``, which has no autograd formula: the
      gradient to the layer's input is silently dropped, so the LoRA adapters below it train on wrong gradients;
    - every ``state_dict()`` (PEFT loading or saving an adapter, a checkpoint) unpacks the layer first, and the
      inverse (``_convert_weight_packed_for_cpu_inverse``, bitsandbytes 0.49.2 to 0.50.2; 0.48 has no repack)
      leaves the block scales transposed in bf16 unless ``--double_quant``: the layer dequantizes with the wrong
      scale per block (weight error 0.24 of its norm instead of NF4's 0.09), and each unpack/repack scrambles
      it further.
    The layer decides once, at construction, from ``support_avx512bf16_for_cpu``; switching it off keeps the
    ordinary NF4 path (the one CUDA and CPUs without AVX512-BF16 always take), with the same results.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def count_quantized_layers(model: torch.nn.Module) -> int:
    """How many bitsandbytes 4-bit / 8-bit linear layers ``model`` holds (0 for an unquantized model)."""
    return sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))


def describe_quantization(model: torch.nn.Module, quantization: str, double_quant: bool) -> str:
    """The start-up line: how many layers are quantized, how, and the bytes the quantized weights take."""
    kind = "NF4 (bf16 compute" + (", double-quantized scales)" if double_quant else ")") if quantization == "4bit" \
        else "LLM.int8"
    nbytes = sum(p.numel() * p.element_size() for m in model.modules()
                 if type(m).__name__ in ("Linear4bit", "Linear8bitLt") for p in m.parameters(recurse=False))
    return (f"quantization: {count_quantized_layers(model)} linear layers in {kind} with bitsandbytes, "
            f"{nbytes / 2**20:.1f} MiB")


def require_package(name: str, flag: str) -> None:
    """ConfigError naming the install command when the library behind ``flag`` is missing."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ConfigError(f"{flag} needs the {name} package: pip install 'easysft[lowmem]'.")
