"""Build one cache entry: sources -> chunks -> tokenized pieces -> the entry's files and the data report.

Memory stays bounded whatever the number of rows: a chunk of :data:`~easysft.data.pieces.CHUNK_ROWS` records is
read, tokenized (here or in one of ``--num_proc`` forked workers) and appended to the entry's files, and the
report keeps counters and length histograms only. What grows with the data is one byte per record (its split
assignment) while a source is read.

Steps: open every source (:func:`~easysft.data.segments.open_source`); count and scan the JSON Lines files for
their columns (in the pool); detect layouts and assign every record to train, eval or neither (hold-out and
``data_split``); then tokenize chunk by chunk in ``--data_path`` order, train and eval of a chunk together.
Row limits (``--max_train_rows``/``--max_eval_rows``/debug) keep the FIRST rows in ``--data_path`` order;
``--strict`` raises on the first skipped row (a source's train rows before its eval rows, each in file order).
"""

from __future__ import annotations

import os
import sys

from easysft.config.inputs import conversation_max_len
from easysft.data import pieces
from easysft.data.chat_render import ChatRenderer, ConversationOptions
from easysft.data.pieces import Context, Runner, scan_task, tokenize_task
from easysft.data.readers import format_location
from easysft.data.report import SourceStats, build_report
from easysft.data.segments import EVAL, TRAIN, assign_splits, finish_scan, local_size_bytes, open_source
from easysft.data.sources import SkippedRow, strict_error

MAX_DEFAULT_PROC = 8
# Below this many bytes of local data a worker pool costs more to start than it saves.
PARALLEL_MIN_BYTES = 8 << 20
# Preparations with fewer rows than this finish in seconds: no progress bar.
PROGRESS_MIN_ROWS = 50_000
SPLIT_NAMES = {TRAIN: "train", EVAL: "eval"}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_num_proc(data_cfg) -> int:
    """``--num_proc``, or by default the cores available (at most 8), or 1 for small local data."""
    if data_cfg.num_proc is not None:
        return data_cfg.num_proc
    if local_size_bytes(data_cfg.data_path) < PARALLEL_MIN_BYTES and all(os.path.exists(p)
                                                                         for p in data_cfg.data_path):
        return 1
    return max(1, min(available_cores(), MAX_DEFAULT_PROC))


def build_entry(writer, data_cfg, tokenizer, template, *, seed: int, limits: tuple[int | None, int | None],
                progress: bool = False) -> dict:
    """Tokenize every source into ``writer`` (a :class:`~easysft.data.cache.EntryWriter`); return the report."""
    plans = [open_source(path) for path in data_cfg.data_path]
    segments = [segment for plan in plans for segment in plan.segments]
    renderer = None
    if template.kind == "chat":
        renderer = ChatRenderer(tokenizer, ConversationOptions(data_cfg.train_on, data_cfg.reasoning,
                                                               conversation_max_len(data_cfg)))
    pieces.set_context(Context(tokenizer, template, data_cfg.max_prompt_len, data_cfg.max_ans_len,
                               data_cfg.multi_turn, segments, renderer))
    try:
        with Runner(resolve_num_proc(data_cfg)) as runner:
            for index, segment in enumerate(segments):
                if segment.kind == "jsonl":
                    tasks = ((index, lines) for _, _, lines in segment.chunks(pieces.CHUNK_ROWS))
                    finish_scan(segment, runner.map(scan_task, tasks))
            for plan in plans:
                assign_splits(plan, eval_fraction=data_cfg.eval_fraction, seed=seed, data_split=data_cfg.data_split)
            stats = _tokenize_sources(runner, plans, segments, writer, data_cfg, dict(zip((TRAIN, EVAL), limits,
                                                                                          strict=True)), progress)
    finally:
        pieces.set_context(None)
    return build_report(stats, template=template.name, max_prompt_len=data_cfg.max_prompt_len,
                        max_ans_len=data_cfg.max_ans_len)


def _progress_bar(segments, limits: dict, enabled: bool):
    totals = {split: sum(int((s.assign == split).sum()) for s in segments) for split in (TRAIN, EVAL)}
    total = sum(min(n, limits[split]) if limits[split] is not None else n for split, n in totals.items())
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc="tokenizing", file=sys.stderr, mininterval=1.0,
                dynamic_ncols=True, disable=not enabled or total < PROGRESS_MIN_ROWS)


def _tokenize_sources(runner: Runner, plans, segments, writer, data_cfg, limits: dict, progress: bool):
    used = {TRAIN: 0, EVAL: 0}  # rows taken so far, across sources (row limits count across sources)

    def full(split: int) -> bool:
        return limits[split] is not None and used[split] >= limits[split]

    def tasks(index: int, segment):
        layout = segment.layout.name if segment.layout else None
        for start, stop, payload in segment.chunks(pieces.CHUNK_ROWS):
            if full(TRAIN) and full(EVAL):
                return
            assign = segment.assign[start:stop]
            if assign.any():
                yield index, payload, assign, layout

    all_stats = []
    bar = _progress_bar(segments, limits, progress)
    try:
        for plan in plans:
            stats = SourceStats(plan.name, plan.layout_name, plan.eval_origin)
            eval_error = None  # --strict: an eval skip is raised after the source's train rows
            for segment in plan.segments:
                index = segments.index(segment)
                for result in runner.map(tokenize_task, tasks(index, segment)):
                    for split in (TRAIN, EVAL):
                        error = _add_piece(result[split], split, stats, used, limits, writer, data_cfg.strict)
                        if error is not None and split == TRAIN:
                            raise error
                        eval_error = eval_error or error
                    bar.update(result[TRAIN].num_records + result[EVAL].num_records)
            if eval_error is not None:
                raise eval_error
            all_stats.append(stats)
    finally:
        bar.close()
    return all_stats


def _add_piece(piece, split: int, stats: SourceStats, used: dict, limits: dict, writer, strict: bool):
    """Count and write one piece after the row limit; return the --strict error of its first skip, if any."""
    if limits[split] is not None:
        piece = piece.head(max(0, limits[split] - used[split]))
    used[split] += piece.num_records
    split_stats = stats.train if split == TRAIN else stats.eval
    for _, reason, detail, source, row in piece.skips:
        if strict:
            return strict_error(SkippedRow(reason, detail, source, row))
        split_stats.add_skip(reason, format_location(source, row), detail)
    split_stats.add_piece(piece)
    writer.splits[SPLIT_NAMES[split]].append(piece.ids, piece.mask, piece.sample_lens)
    return None
