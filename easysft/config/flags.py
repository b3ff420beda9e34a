"""Flag plumbing: dataclass fields -> argparse flags, YAML keys -> dataclass fields, configs -> JSON."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import fields
from typing import Any

from easysft.config.fields import RESUME_SENSITIVE
from easysft.errors import ConfigError


def parse_bool(text: str | bool) -> bool:
    """Accept true/false/1/0/yes/no so that `--do_sample false` reads as written."""
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(f: dataclasses.Field) -> str:
    return str(f.type).replace(" ", "")


def add_dataclass_flags(parser: argparse.ArgumentParser, *config_classes: type, title: str | None = None) -> None:
    """Add one ``--name`` flag per dataclass field (defaults are left to the dataclass: argparse gives None)."""
    seen = {action.dest for action in parser._actions}
    for cls in config_classes:
        group = parser.add_argument_group(title or cls.__name__)
        for f in fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            meta = dict(f.metadata)
            meta.pop(RESUME_SENSITIVE, None)
            help_text = meta.pop("help", None)
            # argparse %-formats help texts: a literal '%' ("45% less memory") would crash `--help`.
            kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%") if help_text else help_text,
                                      "default": argparse.SUPPRESS}
            ftype = _field_type(f)
            if ftype.startswith("bool"):
                kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
            elif ftype.startswith("int"):
                kwargs["type"] = int
            elif ftype.startswith("float"):
                kwargs["type"] = float
            elif ftype.startswith("list"):
                kwargs["nargs"] = "+"
            kwargs.update(meta)
            flag = "--" + f.name
            aliases = [flag]
            if f.name == "local_rank":
                aliases.append("--local-rank")  # torch.distributed.launch spells it with a dash
            group.add_argument(*aliases, dest=f.name, **kwargs)


def pick_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``values`` that names fields of the dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def from_flat_dict(cls: type, values: dict[str, Any]):
    """Build ``cls`` from the subset of ``values`` that names its fields."""
    return cls(**pick_fields(cls, values))


def load_yaml_config(path: str, valid_keys: set[str]) -> dict[str, Any]:
    """Read ``--config run.yaml``; keys are flag names; an unknown key is an error listing the valid ones."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file.")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}).") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of flag names to values.")
    unknown = sorted(set(values) - valid_keys)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(sorted(valid_keys))}."
        )
    return values


def to_jsonable(*configs: Any) -> dict[str, Any]:
    """Flatten several config dataclasses into one JSON-ready dict (for train_config.json)."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return merged
