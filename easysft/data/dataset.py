"""Sources -> tokenized train/eval samples, with skip counts, the data report and the on-disk cache.

:func:`prepare_data` is what training, evaluation and ``easysft prepare`` call. Steps:

1. hash every input that can change the result (:func:`cache_key_parts`) and look the key up in the cache;
2. on a miss, on the main rank: read each source (:mod:`easysft.data.sources`), apply the row limits
   (``--max_train_rows`` / ``--max_eval_rows`` / debug: the FIRST rows in ``--data_path`` order), tokenize
   every example (:func:`~easysft.data.tokenize.tokenize_examples`, the only place that builds labels), count
   every skipped row by reason, build the report and save the entry atomically;
3. on a miss on any other rank: wait for the main rank's entry on the file system, then load it.

``--strict`` turns the first skipped row (train rows first, then eval, each in file order) into a DataError
naming ``file:line`` (or the dataset row) and the reason. No training sample at all is always a DataError that
says how many rows were skipped by which reason.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from easysft.data import cache
from easysft.data.report import SourceStats, SplitStats, build_report, data_notices
from easysft.data.sources import (
    SkippedRow,
    SourceSplit,
    read_source,
    source_fingerprint,
    strict_error,
    to_rows,
)
from easysft.data.templates import Template
from easysft.data.tokenize import Skip, tokenize_examples
from easysft.errors import ConfigError, DataError, EasySFTError

DEBUG_TRAIN_ROWS = 64
DEBUG_EVAL_ROWS = 32


@dataclass
class PreparedData:
    """Tokenized train and eval samples (dicts with input_ids/labels), the data report and the template."""

    train: list[dict]
    eval: list[dict]
    report: dict = field(default_factory=dict)
    template: Template | None = None


def _row_limits(data_cfg, debug: bool) -> tuple[int | None, int | None]:
    limits = []
    for configured, debug_limit in ((data_cfg.max_train_rows, DEBUG_TRAIN_ROWS),
                                    (data_cfg.max_eval_rows, DEBUG_EVAL_ROWS)):
        candidates = [v for v in (configured, debug_limit if debug else None) if v is not None]
        limits.append(min(candidates) if candidates else None)
    return limits[0], limits[1]


def cache_key_parts(data_cfg, tokenizer, template: Template, *, seed: int, debug: bool) -> dict:
    """Everything that can change the prepared data; the cache key is a hash of this dict."""
    max_train, max_eval = _row_limits(data_cfg, debug)
    return {
        "sources": [[os.path.abspath(p) if os.path.exists(p) else p, source_fingerprint(p)]
                    for p in data_cfg.data_path],
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "template": template.to_dict(),
        "max_prompt_len": data_cfg.max_prompt_len,
        "max_ans_len": data_cfg.max_ans_len,
        "data_split": data_cfg.data_split,
        "eval_fraction": data_cfg.eval_fraction,
        "seed": seed,
        "max_train_rows": max_train,
        "max_eval_rows": max_eval,
        "multi_turn": data_cfg.multi_turn,
        "strict": data_cfg.strict,
    }


# Rows per batched tokenizer call: large enough that per-call overhead vanishes, small enough to stay in cache.
TOKENIZE_CHUNK_ROWS = 1024


def _tokenize_split(split: SourceSplit, limit: int | None, stats: SplitStats, data_cfg, tokenizer,
                    template: Template) -> list[dict]:
    records = split.records if limit is None else split.records[:limit]
    stats.rows = len(records)
    samples: list[dict] = []
    pending = []  # rows waiting for the next batched tokenizer call, in file order

    def flush() -> None:
        outputs = tokenize_examples(tokenizer, [(row.prompt, row.answer, row.context) for row in pending],
                                    max_prompt_len=data_cfg.max_prompt_len, max_ans_len=data_cfg.max_ans_len,
                                    template=template)
        for row, out in zip(pending, outputs, strict=True):
            if isinstance(out, Skip):
                if data_cfg.strict:
                    raise strict_error(SkippedRow(out.reason, out.detail, row.source, row.row))
                stats.add_skip(out.reason, row.location, out.detail)
                continue
            stats.add_sample(out)
            # Only what batches need; the bookkeeping fields live in the report.
            samples.append({"input_ids": out["input_ids"], "labels": out["labels"]})
        pending.clear()

    for row in to_rows(SourceSplit(records, split.layout), data_cfg.multi_turn):
        if isinstance(row, SkippedRow):
            if data_cfg.strict:
                flush()  # an earlier row's skip is reported first
                raise strict_error(row)
            stats.add_skip(row.reason, row.location, row.detail)
            continue
        pending.append(row)
        if len(pending) >= TOKENIZE_CHUNK_ROWS:
            flush()
    flush()
    return samples


def build_data(data_cfg, tokenizer, template: Template, *, seed: int, debug: bool):
    """Read, tokenize and report (no cache): ``(train_samples, eval_samples, report)``."""
    sources = [read_source(p, eval_fraction=data_cfg.eval_fraction, seed=seed, data_split=data_cfg.data_split)
               for p in data_cfg.data_path]
    limits = dict(zip(("train", "eval"), _row_limits(data_cfg, debug), strict=True))
    samples: dict[str, list[dict]] = {"train": [], "eval": []}
    stats = []
    for source in sources:
        layout = source.train.layout or source.eval.layout
        source_stats = SourceStats(source.name, layout.name if layout else "none", source.eval_origin)
        for split in ("train", "eval"):
            limit = limits[split]
            # Row limits count across sources: the first `limit` rows in --data_path order.
            remaining = None if limit is None else max(0, limit - sum(getattr(s, split).rows for s in stats))
            samples[split] += _tokenize_split(getattr(source, split), remaining, getattr(source_stats, split),
                                              data_cfg, tokenizer, template)
        stats.append(source_stats)
    report = build_report(stats, template=template.name, max_prompt_len=data_cfg.max_prompt_len,
                          max_ans_len=data_cfg.max_ans_len)
    if not samples["train"]:
        raise DataError(_empty_message(data_cfg, report))
    return samples["train"], samples["eval"], report


def _empty_message(data_cfg, report: dict) -> str:
    train = report["train"]
    where = ", ".join(data_cfg.data_path)
    if train["rows"] == 0:
        return f"--data_path {where}: no training rows found; add rows (prompt/answer) to the training split."
    reasons = ", ".join(f"{r} {n}" for r, n in train["skipped"].items() if n)
    firsts = "; ".join(f"first {r}: {w}" for r, w in train["first_skipped"].items())
    return (f"--data_path {where}: no training sample left after filtering: {train['rows']} rows read, "
            f"{train['skipped_total']} skipped ({reasons}; {firsts}); fix the rows or the layout.")


def prepare_data(data_cfg, tokenizer, *, seed: int = 1234, debug: bool = False, is_main: bool = True,
                 wait_timeout_s: float | None = None) -> PreparedData:
    """Tokenized train/eval samples for ``data_cfg``, from the cache when the same inputs were prepared before.

    ``debug=True`` uses the first 64 train / 32 eval rows. With ``is_main=False`` (a non-zero rank) this never
    tokenizes: it waits on the file system for the main rank's cache entry (``wait_timeout_s``, default
    ``$EASYSFT_DATA_WAIT_S`` or 3600 s) and loads it. ``report["cache"]`` says whether the entry was a hit.
    """
    if not data_cfg.data_path:
        raise ConfigError("--data_path is required: give a data folder, file or Hugging Face dataset.")
    template = Template.from_name(data_cfg.template)
    root = cache.cache_root(data_cfg.cache_dir)
    parts = cache_key_parts(data_cfg, tokenizer, template, seed=seed, debug=debug)
    key = cache.make_key(parts)
    entry = cache.load_entry(root, key)
    hit = entry is not None
    if entry is None and not is_main:
        entry = cache.wait_for_entry(root, key, timeout_s=wait_timeout_s)
    if entry is None:
        try:
            train, evals, report = build_data(data_cfg, tokenizer, template, seed=seed, debug=debug)
        except EasySFTError as exc:
            cache.write_failure(root, key, str(exc))
            raise
        try:
            path = cache.save_entry(root, key, train, evals, report, {"inputs": parts})
        except OSError as exc:
            raise DataError(f"cannot write the data cache in {root} ({exc.strerror or exc}); "
                            "set --cache_dir (or $EASYSFT_DATA_CACHE) to a writable folder.") from None
        entry = cache.CacheEntry(train, evals, report, path)
    report = {**entry.report, "cache": {"hit": hit, "key": key, "path": entry.path}}
    if is_main:
        for notice in data_notices(report):
            print(notice, file=sys.stderr, flush=True)
    return PreparedData(entry.train, entry.eval, report, template)
