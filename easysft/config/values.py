"""One place that turns every config value into its field's type and refuses what cannot be one.

Flags arrive typed by argparse, but a ``--config run.yaml`` and the Python API pass values as they are: PyYAML
reads ``learning_rate: 1e-4`` as the STRING "1e-4" (YAML 1.1 wants a dot in a float), ``max_steps: "2"`` is a
string, ``print_loss: "no"`` a non-empty (truthy) string, ``resume: true`` a bool. Every config dataclass calls
:func:`normalise_fields` first in ``__post_init__``, so a field declared ``float`` holds a finite float, ``int`` an
int (``1.5`` refused, never rounded), ``bool`` a bool, before any range check runs. A field whose metadata
carries ``bounds`` (an interval such as ``"(0, inf)"`` or ``"[0, 1)"``, see :func:`check_bounds`) is range-checked
here too, each item of a list field included. A bad value is a :class:`~easysft.errors.ConfigError` naming the
flag. A value from a user's function (``--eval_metric``) goes through the same :func:`finite_number`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from easysft.config.fields import BOUNDS
from easysft.errors import ConfigError

# numpy and torch accept seeds in [0, 2**32); a negative seed ends in a ValueError deep in numpy otherwise.
SEED_RANGE = (0, 2**32 - 1)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def normalise_fields(config: Any) -> None:
    """Convert each field of the dataclass instance ``config`` to its declared type, in place.

    ``None`` stays ``None`` (an optional field left unset). A ``str`` field whose flag has an argparse ``const``
    (``--resume`` alone means 'latest') reads YAML ``true`` as that const and ``false`` as unset. Raises
    ConfigError on a value that is not of the type, a non-finite float, or one outside the field's ``bounds``.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        kind = str(f.type).replace(" ", "").split("|")[0]
        value = convert_value(f.name, kind, value, const=f.metadata.get("const"))
        bounds = f.metadata.get(BOUNDS)
        if bounds is not None:
            for item in value if isinstance(value, list) else [value]:
                check_bounds(f"--{f.name}", item, bounds)
        setattr(config, f.name, value)


def convert_value(name: str, kind: str, value: Any, *, const: Any = None) -> Any:
    """``value`` as the type named ``kind`` ('bool', 'int', 'float', 'str', 'list[str]'); ConfigError if not."""
    flag = f"--{name}"
    if kind == "bool":
        return _to_bool(flag, value)
    if kind == "int":
        number = _to_int(flag, value)
        if name == "seed":
            check_seed(number, flag)
        return number
    if kind == "float":
        return _to_float(flag, value)
    if kind == "str":
        if isinstance(value, bool):
            if const is not None:
                return const if value else None
            raise ConfigError(f"{flag} takes a text value, got {value!r}.")
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{flag} takes a text value, got {type(value).__name__} {value!r}.")
        return value
    if kind.startswith("list"):
        items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, (str, int, float)) for i in items):
            raise ConfigError(f"{flag} takes one or more text values, got {value!r}.")
        if kind == "list[float]":
            numbers = []
            for item in items:
                try:
                    numbers.append(_to_float(flag, item))
                except ConfigError:
                    raise ConfigError(f"{flag} {' '.join(map(str, items))}: give numbers (finite; not {item!r}).") \
                        from None
            return numbers
        return [str(i) for i in items]
    return value


def check_bounds(flag: str, value: float, bounds: str) -> float:
    """``value`` if it lies in the interval ``bounds`` (``"(0, inf)"``, ``"[0, 1)"``, ``"[1, 65536]"``: a round
    bracket excludes its end, ``inf`` means no upper end); ConfigError naming ``flag`` otherwise."""
    low_text, high_text = (part.strip() for part in bounds[1:-1].split(","))
    low, high = float(low_text), float(high_text)
    low_ok = value > low if bounds[0] == "(" else value >= low
    high_ok = high == math.inf or (value < high if bounds[-1] == ")" else value <= high)
    if low_ok and high_ok:
        return value
    if high == math.inf:
        rule = f"greater than {low_text}" if bounds[0] == "(" else f"at least {low_text}"
    else:
        rule = f"in {bounds}"
    raise ConfigError(f"{flag} must be {rule}, got {value:g}.")


def finite_number(what: str, value: Any) -> float:
    """``value`` as a finite float: a flag, a YAML value or a number a user's function returned (``what`` names
    it); ConfigError on text, a bool, NaN or an infinity."""
    return _to_float(what, value)


def check_seed(value: int, flag: str = "--seed") -> int:
    """``value`` if it is a valid seed for Python, numpy and torch; ConfigError otherwise."""
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ConfigError(f"{flag} must be between {low} and {high} (2**32 - 1), got {value}.")
    return value


def _to_bool(flag: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ConfigError(f"{flag} must be true or false, got {value!r}.")


def _to_int(flag: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{flag} must be a whole number, got {value!r}.")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(f"{flag} must be a whole number, got {value!r}.")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            return _to_int(flag, float(value))
        except ValueError:
            pass
    raise ConfigError(f"{flag} must be a whole number, got {value!r}.")


def _to_float(flag: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{flag} must be a number, got {value!r}.")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be a number, got {value!r}.") from None
    except OverflowError:  # an int too large for a float (a YAML number with hundreds of digits)
        raise ConfigError(f"{flag} must be a finite number, got {value!r:.40}.") from None
    if not math.isfinite(number):
        raise ConfigError(f"{flag} must be a finite number, got {value!r:.40}.")
    return number
