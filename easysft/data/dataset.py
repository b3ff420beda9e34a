"""Sources -> tokenized train/eval samples, with skip counts, the data report and the on-disk cache.

:func:`prepare_data` is what training, evaluation and ``easysft prepare`` call. Steps:

1. hash every input that can change the result (:func:`cache_key_parts`) and look the key up in the cache;
2. on a miss, on the main rank: stream every source in chunks through :func:`easysft.data.build.build_entry`
   (row limits ``--max_train_rows`` / ``--max_eval_rows`` / debug keep the FIRST rows in ``--data_path``
   order; tokenization in ``--num_proc`` processes, byte-identical for any number; every skipped row counted
   by reason) straight into the entry's files, then commit the entry atomically;
3. on a miss on any other rank: wait for the main rank's entry on the file system;
4. open the entry as memory maps (:class:`~easysft.data.samples.SampleView`): ``train``/``eval`` behave like
   lists of ``{"input_ids", "labels"}`` dicts, and every rank on a machine shares one copy in the page cache;
5. with ``--data_weights``, attach the :class:`~easysft.data.mixing.MixPlan` (which samples make each epoch) and
   its lines in the report.

``--strict`` turns the first skipped row (train rows first, then eval, each in file order) into a DataError
naming ``file:line`` (or the dataset row) and the reason. No training sample at all is always a DataError that
says how many rows were skipped by which reason.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from easysft.config.inputs import conversation_max_len
from easysft.data import cache
from easysft.data.build import build_entry
from easysft.data.mixing import MixPlan
from easysft.data.report import data_notices
from easysft.data.sources import source_fingerprint
from easysft.data.templates import Template
from easysft.errors import ConfigError, DataError, EasySFTError

DEBUG_TRAIN_ROWS = 64
DEBUG_EVAL_ROWS = 32


@dataclass
class PreparedData:
    """Tokenized train and eval samples (sequences of dicts with input_ids/labels: memory-mapped
    :class:`~easysft.data.samples.SampleView` from :func:`prepare_data`), the data report, the template, and the mixing plan
    (``None``: every training sample once per epoch)."""

    train: Sequence[dict]
    eval: Sequence[dict]
    report: dict = field(default_factory=dict)
    template: Template | None = None
    mixing: MixPlan | None = None


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
        "train_on": data_cfg.train_on,
        "reasoning": data_cfg.reasoning,
        "max_seq_len": conversation_max_len(data_cfg),
        "strict": data_cfg.strict,
    }


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
    # Checked against its checksums: an entry changed since it was written is rebuilt (the main rank says so).
    entry = cache.load_entry(root, key, quiet=not is_main)
    hit = entry is not None
    if entry is None and not is_main:
        entry = cache.wait_for_entry(root, key, timeout_s=wait_timeout_s)
    if entry is None:
        report = _build_and_save(root, key, parts, data_cfg, tokenizer, template, seed=seed, debug=debug,
                                 progress=is_main)
        entry = cache.load_entry(root, key, verify=False)  # just written; its checksums hashed those bytes
        if entry is None:
            raise DataError(f"the data cache entry {os.path.join(root, key)} was written but cannot be read back; "
                            "check the disk, or set --cache_dir to another folder.")
    report = {**entry.report, "cache": {"hit": hit, "key": key, "path": entry.path}}
    if is_main:
        for notice in data_notices(report):
            print(notice, file=sys.stderr, flush=True)
    mixing = None
    if data_cfg.data_weights:
        mixing = MixPlan.from_report(entry.report, data_cfg.data_weights, data_cfg.mixing)
        report["mixing"] = mixing.to_report()
    return PreparedData(entry.train, entry.eval, report, template, mixing)


def _build_and_save(root: str, key: str, parts: dict, data_cfg, tokenizer, template: Template, *, seed: int,
                    debug: bool, progress: bool) -> dict:
    """Build the entry in a temporary folder and commit it; a failure leaves a note for waiting ranks."""
    try:
        with cache.EntryWriter(root, key) as writer:
            report = build_entry(writer, data_cfg, tokenizer, template, seed=seed,
                                 limits=_row_limits(data_cfg, debug), progress=progress)
            if report["train"]["kept"] == 0:
                raise DataError(_empty_message(data_cfg, report))
            writer.commit(report, {"inputs": parts})
    except EasySFTError as exc:
        cache.write_failure(root, key, str(exc))
        raise
    except OSError as exc:
        message = (f"cannot write the data cache in {root} ({exc.strerror or exc}); "
                   "set --cache_dir (or $EASYSFT_DATA_CACHE) to a writable folder.")
        cache.write_failure(root, key, message)
        raise DataError(message) from None
    return report
