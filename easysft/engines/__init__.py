"""Engine registry: name -> factory. The only code that knows DeepSpeed / FSDP / DDP lives in this package."""

from __future__ import annotations

import importlib

from easysft.errors import ConfigError

# Imported lazily: DeepSpeed alone costs seconds to import.
ENGINES = {
    "single": "easysft.engines.single:SingleEngine",
    "ddp": "easysft.engines.ddp:DDPEngine",
    "fsdp": "easysft.engines.fsdp:FSDPEngine",
    "deepspeed": "easysft.engines.deepspeed:DeepSpeedEngine",
}


def make_engine(name: str, dist_info):
    if name not in ENGINES:
        raise ConfigError(f"engine {name!r} is not available; choose one of: {', '.join(sorted(ENGINES))}.")
    module_name, class_name = ENGINES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(dist_info)


def choose_engine(train_cfg, dist_info) -> str:
    """--engine auto: deepspeed if --deepspeed/--zero_stage>0 was asked, ddp under a launcher, else single."""
    if train_cfg.engine != "auto":
        return train_cfg.engine
    if train_cfg.deepspeed or train_cfg.deepspeed_config or train_cfg.zero_stage > 0 or train_cfg.offload:
        return "deepspeed"
    return "ddp" if dist_info.is_distributed else "single"
