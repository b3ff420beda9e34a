"""``--attn_implementation``: which attention kernel the training model runs, and easysft's variable-length one.

Packed rows (easysft/data/collate.py ``pack``) isolate their samples by restarting ``position_ids``. transformers
5 turns that into a DENSE block-diagonal (row x row) mask for ``sdpa`` and ``eager``: exact, fine for CPU rows of
a few hundred tokens, but on a GPU a row of 16 samples (~10 k tokens) pays attention and mask memory for the
square of the ROW. The other choices cost per sample:

- ``flash_attention_2``: transformers' flash-attn integration; with packed ``position_ids`` and no mask it derives
  ``cu_seq_lens_q/k`` itself and calls the variable-length kernel (needs the ``flash-attn`` package, CUDA, bf16).
- ``varlen`` (registered here through transformers' ``AttentionInterface`` as ``easysft_varlen``): the same
  ``cu_seqlens`` from the restarts of ``position_ids``, then torch's own ``torch.nn.attention.varlen.varlen_attn``
  on CUDA (flash kernels shipped with torch >= 2.10, no extra package), or one causal ``sdpa`` call per sample
  on CPU (exact, no mask at all). transformers builds no mask for a registered name it does not know.
- ``flex``: transformers' ``flex_attention`` with a document mask (block-sparse; any dtype, fp32 included; CUDA
  only for training: torch has no flex backward on CPU).

``auto`` picks, on CUDA, the fastest exact one installed: flash-attn 2 for bf16/fp16, else torch varlen for
bf16/fp16, else flex (fp32), else sdpa; on CPU sdpa, as before. Right-padded batches (eval, ``--packing false``)
stay exact with the variable-length kernels too: with a causal model no real token attends to the padding after
it, and padding positions restart at 0, so each pad is a sequence of its own that is never supervised.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch

from easysft.errors import ConfigError

VARLEN_NAME = "easysft_varlen"
# --attn_implementation value -> transformers' name for it.
TRANSFORMERS_NAMES = {"sdpa": "sdpa", "eager": "eager", "flex": "flex_attention",
                      "flash_attention_2": "flash_attention_2", "varlen": VARLEN_NAME}


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def torch_varlen_available() -> bool:
    return _has_module("torch.nn.attention.varlen")


def resolve_attn_implementation(requested: str, device_type: str, low_precision: bool) -> str:
    """The ``--attn_implementation`` choice to use: ``requested`` unless it is ``auto`` (see module docstring).

    ``low_precision``: the attention inputs are bf16/fp16 (autocast or bf16 weights), which flash kernels need.
    """
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "sdpa"
    if low_precision and _has_module("flash_attn"):
        return "flash_attention_2"
    if low_precision and torch_varlen_available():
        return "varlen"
    if _has_module("torch.nn.attention.flex_attention"):
        return "flex"
    return "sdpa"


def set_attn_implementation(model, choice: str, device_type: str) -> str:
    """Switch ``model`` (a transformers model) to ``choice`` (not ``auto``); returns transformers' name for it.
    A choice the machine cannot run is a ConfigError naming the flag and what to install or pick instead."""
    if choice == "flash_attention_2" and not _has_module("flash_attn"):
        raise ConfigError("--attn_implementation flash_attention_2 needs the flash-attn package (CUDA); install it "
                          "or use --attn_implementation auto.")
    if choice == "flash_attention_2" and device_type != "cuda":
        raise ConfigError("--attn_implementation flash_attention_2 needs a CUDA device; use auto, sdpa or varlen.")
    if choice == "flex" and not _has_module("torch.nn.attention.flex_attention"):
        raise ConfigError("--attn_implementation flex needs torch >= 2.5; use auto or sdpa.")
    if choice == "flex" and device_type != "cuda":  # torch: "FlexAttention does not support backward on CPU"
        raise ConfigError("--attn_implementation flex trains on CUDA only (torch has no flex backward on CPU); "
                          "use auto, sdpa or varlen.")
    name = TRANSFORMERS_NAMES[choice]
    if name == VARLEN_NAME:
        register_varlen_attention()
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"--attn_implementation {choice}: this model cannot use it "
                          f"({str(exc).splitlines()[0]}); use --attn_implementation auto.") from None
    return name


def register_varlen_attention() -> None:
    """Register :func:`varlen_attention_forward` as ``easysft_varlen`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_NAME, varlen_attention_forward)


_CU_SEQLENS_CACHE: dict = {}


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 (n+1,), max_len)`` of the sequences in the flattened ``(batch, seq)`` positions: a new
    sequence starts wherever the position is 0 (every row starts one). Worked example: positions
    ``[[0, 1, 2, 0, 1]]`` -> ``([0, 3, 5], 3)``. Cached for the tensor object a forward pass hands every layer."""
    key = (id(position_ids), position_ids.data_ptr(), position_ids.shape)
    cached = _CU_SEQLENS_CACHE.get(key)
    if cached is not None and cached[0] is position_ids:
        return cached[1], cached[2]
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    total = torch.tensor([flat.numel()], device=flat.device)
    cu_seqlens = torch.cat([starts, total]).to(torch.int32)
    max_len = int(cu_seqlens.diff().max())  # one host sync per forward, not per layer (cached)
    _CU_SEQLENS_CACHE.clear()
    _CU_SEQLENS_CACHE[key] = (position_ids, cu_seqlens, max_len)
    return cu_seqlens, max_len


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: causal attention within each sequence of a packed row.

    ``query (batch, heads, seq, dim)``, ``key/value (batch, kv_heads, seq, dim)``; returns ``(batch, seq, heads,
    dim)`` and no weights. A forward that is not a plain full-sequence pass (a KV cache, a 4-D mask) is handed
    to transformers' sdpa function unchanged.
    """
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[2] != key.shape[2] or (attention_mask is not None
                                                                  and attention_mask.dim() == 4):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, heads, seq, dim = query.shape
    cu_seqlens, max_len = cu_seqlens_from_position_ids(position_ids.expand(batch, seq))
    # (batch, heads, seq, dim) -> (tokens, heads, dim)
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value))
    if query.is_cuda:
        out = _torch_varlen(q, k, v, cu_seqlens, max_len, scaling, dropout if module.training else 0.0)
    else:
        out = _per_sequence_sdpa(q, k, v, cu_seqlens, scaling)
    return out.reshape(batch, seq, heads, dim), None


def _per_sequence_sdpa(q, k, v, cu_seqlens, scaling) -> torch.Tensor:
    """CPU: one causal sdpa call per sequence (no mask is ever built)."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, len, dim)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling)
                    .transpose(0, 1))
    return torch.cat(outs, 0)


def _torch_varlen(q, k, v, cu_seqlens, max_len, scaling, dropout) -> torch.Tensor:
    """CUDA: torch's flash-based ``varlen_attn`` in the autocast dtype (bf16 by default), output in q's dtype."""
    from torch.nn.attention.varlen import varlen_attn

    if dropout:
        raise ConfigError("--attn_implementation varlen has no attention dropout; use flash_attention_2 or sdpa.")
    target = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    if target not in (torch.bfloat16, torch.float16):
        target = torch.bfloat16  # flash kernels take bf16/fp16 only (auto picks varlen only for bf16/fp16 runs)
    params = inspect.signature(varlen_attn).parameters
    groups = q.shape[1] // k.shape[1]
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        raise ConfigError("--attn_implementation varlen: this torch's varlen_attn has no scale argument and the "
                          "model uses a non-default attention scale; use sdpa or flex.")
    if groups > 1 and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if "window_size" in params:  # torch > 2.10: causal is a window of (-1, 0)
        kwargs["window_size"] = (-1, 0)
    else:  # torch 2.10
        kwargs["is_causal"] = True
    out = varlen_attn(q.to(target), k.to(target), v.to(target), cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)
    return out.to(q.dtype)
