"""`easysft prepare --show N`: what is trained, sample by sample, with the supervised spans marked.

Text form: each sample decoded run by run, the supervised runs wrapped in ``[[`` ... ``]]`` (or shown in green
on a terminal). JSON Lines form: ``{"sample": k, "input_ids": [...], "labels": [...]}`` (``-100`` where not
supervised), one object per line, for tools and tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from easysft.data.tokenize import IGNORE_INDEX

OPEN, CLOSE = "[[", "]]"
GREEN, RESET = "\x1b[32m", "\x1b[0m"


def supervised_runs(sample: dict) -> Iterator[tuple[bool, list[int]]]:
    """``(supervised, ids)`` for each maximal run of equally supervised tokens, in order."""
    run: list[int] = []
    state = None
    for token, label in zip(sample["input_ids"], sample["labels"], strict=True):
        supervised = label != IGNORE_INDEX
        if run and supervised != state:
            yield state, run
            run = []
        state = supervised
        run.append(token)
    if run:
        yield state, run


def format_sample(tokenizer, sample: dict, *, colour: bool = False) -> str:
    """The sample's text with its supervised runs marked (module docstring)."""
    parts = []
    for supervised, ids in supervised_runs(sample):
        text = tokenizer.decode(ids)
        if supervised:
            text = f"{GREEN}{text}{RESET}" if colour else f"{OPEN}{text}{CLOSE}"
        parts.append(text)
    return "".join(parts)


def show_samples(tokenizer, samples: Sequence[dict], count: int, *, fmt: str = "text",
                 colour: bool = False) -> Iterator[str]:
    """Lines to print for the first ``count`` samples (``fmt`` 'text' or 'jsonl')."""
    for k in range(min(count, len(samples))):
        sample = samples[k]
        if fmt == "jsonl":
            yield json.dumps({"sample": k, "input_ids": list(sample["input_ids"]), "labels": list(sample["labels"])})
        else:
            supervised = sum(1 for label in sample["labels"] if label != IGNORE_INDEX)
            yield (f"--- sample {k}: {len(sample['input_ids'])} tokens, {supervised} supervised "
                   f"({'green' if colour else OPEN + ' ' + CLOSE}) ---")
            yield format_sample(tokenizer, sample, colour=colour)
