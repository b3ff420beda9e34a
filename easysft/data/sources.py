"""Read rows from data sources into :class:`Example` objects (MINIMAL VERSION: local folder/json only;
the full set of sources is built under issue 2)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from easysft.errors import DataError


@dataclass
class Example:
    """One prompt/answer pair. ``context``: earlier chat turns (role/content dicts) before ``prompt``.
    ``source`` and ``row`` locate the row for reports and --strict errors (``file:line`` or dataset index)."""

    prompt: object
    answer: object
    context: list[dict] = field(default_factory=list)
    source: str = ""
    row: int | str = 0


def load_examples(data_path, split: str = "train", **options) -> list[Example]:
    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    out: list[Example] = []
    for path in paths:
        file = os.path.join(path, f"{split}.json")
        if not os.path.isfile(file):
            raise DataError(f"{file}: no such file")
        with open(file, encoding="utf-8") as handle:
            rows = json.load(handle)
        for i, row in enumerate(rows):
            out.append(Example(row.get("prompt"), row.get("answer"), [], file, i))
    return out
