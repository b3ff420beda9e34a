"""Flag plumbing: dataclass fields -> argparse flags, YAML keys -> dataclass fields, configs -> JSON."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import fields
from typing import Any

from easysft.config.fields import BOUNDS, RESUME_SENSITIVE
from easysft.errors import ConfigError
from easysft.files import read_utf8


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
            meta.pop(BOUNDS, None)
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
    """Read ``--config run.yaml``; keys are flag names. An unknown key is an error listing the valid ones; a key
    given twice in one mapping is an error naming ``file:line`` (YAML would silently keep the last); a file that
    is not UTF-8 text is an error naming ``file:line``."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file.")
    text = read_utf8(path, ConfigError, shown=f"--config {path}", fix="save the config as UTF-8")
    try:
        values = yaml.load(text, Loader=_unique_key_loader()) or {}  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}).") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read; the top level must be a mapping of flag names "
                          "to values.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of flag names to values.")
    unknown = sorted(set(map(str, values)) - valid_keys)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(sorted(valid_keys))}."
        )
    return values


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # '<<: *base' merges keys that the mapping's own keys may override
                    key = self.construct_object(key_node, deep=True)
                    try:
                        hash(key)
                    except TypeError:
                        continue  # SafeLoader reports an unhashable key itself
                    line = key_node.start_mark.line + 1
                    if key in first_line:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {key!r} is given twice (first on line {first_line[key]}); keep one",
                            key_node.start_mark)
                    first_line[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def to_jsonable(*configs: Any) -> dict[str, Any]:
    """Flatten several config dataclasses into one JSON-ready dict (for train_config.json)."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return merged
