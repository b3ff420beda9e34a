"""LoRA through PEFT: pick the linear layers, wrap the model, describe what trains, merge adapters into weights.

``--lora_module_name`` accepts three forms, all resolved here to an explicit set of ``nn.Linear`` modules
(the output projection, e.g. ``lm_head``, is never adapted: with tied embeddings it IS the input embedding):

- ``all-linear``: every linear layer.
- a comma list of module names, e.g. ``q_proj,v_proj``: every linear layer whose name ends with ``.q_proj`` ...
- a name pattern as in the original design, e.g. ``layers.`` or ``layers.0.``: every linear layer whose full
  name CONTAINS it. An item is read as a pattern only when no module is called that (so ``up_proj`` never
  also catches ``gate_up_proj``). Items can be mixed: ``layers.0.,o_proj``.

An item that selects no linear layer is a ConfigError listing some valid names. The resolved targets go to PEFT
as short leaf names (``["q_proj", "v_proj"]``) when those select exactly the same modules, otherwise as full
names, so ``adapter_config.json`` stays readable and re-applies the same adapters.

PEFT is imported inside the functions: it costs ~5 s and ``easysft --help`` must not pay for it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from easysft.config import LoraConfig
from easysft.errors import ConfigError

ALL_LINEAR = "all-linear"
ADAPTER_NAME = "default"  # PEFT's name for the single adapter we train


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` modules LoRA may adapt (the output projection excluded), in model order."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not output]


def resolve_target_modules(model: torch.nn.Module, lora_module_name: str) -> list[str]:
    """``--lora_module_name`` -> sorted full names of the linear modules to adapt (see module docstring)."""
    candidates = linear_module_names(model)
    if not candidates:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer for LoRA to adapt.")
    spec = (lora_module_name or "").strip()
    if spec == ALL_LINEAR:
        return sorted(candidates)
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--lora_module_name is empty; use {ALL_LINEAR!r}, a list like 'q_proj,v_proj' "
                          "or a name pattern like 'layers.'.")
    selected: set[str] = set()
    for item in items:
        by_name = [n for n in candidates if n == item or n.endswith("." + item)]
        matched = by_name or [n for n in candidates if item in n]  # original design: substring of the full name
        if not matched:
            raise ConfigError(
                f"--lora_module_name: {item!r} matches no linear layer; valid module names include "
                f"{', '.join(_examples(candidates))} (or use {ALL_LINEAR!r} or a name pattern such as 'layers.')."
            )
        selected.update(matched)
    return sorted(selected)


def _examples(candidates: list[str], limit: int = 8) -> list[str]:
    """Distinct leaf names first (q_proj, v_proj ...), then one full name so the pattern form is visible."""
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in candidates))[:limit]
    return leaves + [candidates[0]] if candidates[0] not in leaves else leaves


def _compact_targets(candidates: list[str], selected: list[str]) -> list[str]:
    """Leaf names when PEFT's suffix matching on them selects exactly ``selected``; else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in selected})
    again = {n for n in candidates if n.rsplit(".", 1)[-1] in leaves}
    return leaves if again == set(selected) else sorted(selected)


def portable_base_name(name_or_path: str) -> str:
    """What adapter_config.json's base_model_name_or_path should say so that the adapter folder reloads.

    The bundled model's cached checkpoint -> ``bundled`` (the cache path differs per user / $EASYSFT_CACHE);
    a local folder -> its absolute path (a relative one would resolve against whatever folder eval runs in);
    a hub id -> unchanged.
    """
    from easysft.models.bundled import BUNDLED_NAME, CHECKPOINT_NAME, cache_root

    if not name_or_path or name_or_path == BUNDLED_NAME:
        return name_or_path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path
    path = path.resolve()
    if path == (cache_root() / "models" / CHECKPOINT_NAME).resolve():
        return BUNDLED_NAME
    return str(path)


def apply_lora(model: torch.nn.Module, lora_cfg: LoraConfig):
    """Wrap a plain HF causal LM in a PEFT ``PeftModel`` with LoRA adapters on the resolved linear layers.

    Contract: with ``only_optimize_lora`` (the default) only LoRA parameters have ``requires_grad``; without it
    every parameter trains (the base weights too). Adapter weights live in ``model.state_dict()`` like any
    other parameter, so optimizer state and checkpoints need nothing special. The returned model's
    ``save_pretrained`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` whose
    ``base_model_name_or_path`` resolves with ``easysft.models.load.resolve_model_path``.
    """
    if not lora_cfg.enabled:
        raise ValueError("apply_lora called with lora_dim == 0")
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ConfigError(
            "--model_name_or_path is already a LoRA adapter folder: drop --lora_dim to keep training that adapter, "
            "or `easysft export --merge` it first and train a new adapter on the merged model."
        )
    candidates = linear_module_names(model)
    selected = resolve_target_modules(model, lora_cfg.lora_module_name)
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.lora_dim,
        lora_alpha=lora_cfg.lora_alpha if lora_cfg.lora_alpha is not None else 2 * lora_cfg.lora_dim,
        lora_dropout=lora_cfg.lora_dropout,
        target_modules=_compact_targets(candidates, selected),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_cfg, adapter_name=ADAPTER_NAME)
    base_name = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = portable_base_name(base_name)
    if not lora_cfg.only_optimize_lora:
        for param in peft_model.parameters():
            param.requires_grad_(True)
    return peft_model


def lora_module_count(model: torch.nn.Module) -> int:
    """How many layers carry a LoRA adapter."""
    return sum(1 for _, module in model.named_modules() if hasattr(module, "lora_A") and ADAPTER_NAME in module.lora_A)


def describe_lora(model: torch.nn.Module, lora_cfg: LoraConfig) -> str:
    """The start-up line: rank, alpha, how many layers, which names, and whether the base weights train."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if hasattr(module, "lora_A") and ADAPTER_NAME in module.lora_A})
    alpha = lora_cfg.lora_alpha if lora_cfg.lora_alpha is not None else 2 * lora_cfg.lora_dim
    frozen = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    if lora_cfg.only_optimize_lora:
        rest = "base weights frozen"
    else:
        rest = (f"base weights also train ({frozen:,} parameters, --only_optimize_lora false); "
                "the final save is a merged full checkpoint")
    return (f"LoRA r={lora_cfg.lora_dim} alpha={alpha:g} dropout={lora_cfg.lora_dropout:g} on "
            f"{lora_module_count(model)} modules ({', '.join(leaves)}); {rest}")


def base_weights_train(model: torch.nn.Module) -> bool:
    """True for a PEFT model whose non-LoRA weights also have requires_grad (--only_optimize_lora false)."""
    return any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def merged_state_dict(peft_model, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Plain HF weights with every LoRA update folded in: ``W + (B @ A) * alpha / r`` per adapted layer.

    Works from a state dict rather than by mutating the model so that it also applies to weights gathered by a
    sharding engine (ZeRO-3, FSDP), whose local modules hold only shards. ``state_dict`` defaults to
    ``peft_model.state_dict()``; keys come back in the base model's names (``model.layers.0.self_attn.q_proj.weight``).
    Only plain LoRA is handled (no DoRA, no rsLoRA, no LoRA bias): that is all ``apply_lora`` creates.
    """
    cfg = peft_model.peft_config[ADAPTER_NAME]
    if getattr(cfg, "use_dora", False) or getattr(cfg, "use_rslora", False) or cfg.bias != "none":
        raise ValueError("merged_state_dict handles plain LoRA only")
    state_dict = peft_model.state_dict() if state_dict is None else state_dict
    suffix = f".{ADAPTER_NAME}.weight"
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        merged[name] = value
        if ".base_layer." in key and key.endswith(".weight"):
            layer = key[: -len(".base_layer.weight")]
            lora_a, lora_b = state_dict[f"{layer}.lora_A{suffix}"], state_dict[f"{layer}.lora_B{suffix}"]
            rank = lora_a.shape[0]
            scale = cfg.lora_alpha / rank
            # Fold in fp32 and cast back: a bf16 B @ A loses the small LoRA update to rounding.
            delta = (lora_b.float() @ lora_a.float()) * scale
            merged[name] = (value.float() + delta).to(value.dtype)
    return merged
