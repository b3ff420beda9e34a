"""Chunks of records -> tokenized :class:`Piece` objects, in one process or a pool of worker processes.

A *task* is one chunk of one segment (:mod:`easysft.data.segments`). Workers are forked after the segments are
opened, so they inherit the tokenizer, the template and the memory-mapped datasets (:data:`_CONTEXT`); a task
carries only the chunk's payload, its split assignments and the layout's name. Results come back in task order
(:func:`ordered_results`), so the cache is byte-identical for any ``--num_proc``; at most ``2 * num_proc`` tasks
are in flight, which bounds memory whatever the size of the data.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from easysft.data.chat_render import CONVERSATION_COUNTERS, ChatRenderer
from easysft.data.conversations import read_conversation
from easysft.data.readers import RawRecord
from easysft.data.segments import (
    EVAL,
    LAYOUTS_BY_NAME,
    TRAIN,
    dataset_rows,
    scan_jsonl_chunk,
    segment_records,
)
from easysft.data.sources import CONVERSATION_COLUMNS, SkippedRow, record_rows
from easysft.data.tokenize import IGNORE_INDEX, Skip, tokenize_examples

# Records per task: large enough that the batched tokenizer call and the inter-process hop cost little per row,
# small enough that 2 * num_proc chunks in flight stay a few MB.
CHUNK_ROWS = 1024


@dataclass
class Piece:
    """The samples and skips of one split of one chunk, as arrays (cheap to pickle, ready to append to disk).

    ``record_ends[k]`` = samples made by records ``0..k`` (a record makes 0, 1 or, with ``--multi_turn``, more);
    ``skips`` = ``(record_position, reason, detail, source, row)`` in row order.
    """

    num_records: int = 0
    record_ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    mask: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    sample_lens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    prompt_lens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    answer_lens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    prompt_truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    answer_truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    skips: list[tuple] = field(default_factory=list)
    # Conversation samples: one row of CONVERSATION_COUNTERS per sample (zeros for prompt/answer samples).
    conversation: np.ndarray = field(default_factory=lambda: np.zeros((0, len(CONVERSATION_COUNTERS)), np.int64))

    def head(self, records: int) -> Piece:
        """Only the first ``records`` records (a row limit that ends inside this chunk)."""
        if records >= self.num_records:
            return self
        samples = int(self.record_ends[records - 1]) if records > 0 else 0
        tokens = int(self.sample_lens[:samples].sum())
        return Piece(records, self.record_ends[:records], self.ids[:tokens], self.mask[:tokens],
                     self.sample_lens[:samples], self.prompt_lens[:samples], self.answer_lens[:samples],
                     self.prompt_truncated[:samples], self.answer_truncated[:samples],
                     [s for s in self.skips if s[0] < records], self.conversation[:samples])


@dataclass
class Context:
    """What every worker needs, set before the pool forks."""

    tokenizer: object
    template: object
    max_prompt_len: int
    max_ans_len: int
    multi_turn: bool
    segments: list = field(default_factory=list)
    renderer: ChatRenderer | None = None  # conversations are one sample each (--template chat)


_CONTEXT: Context | None = None


def set_context(context: Context | None) -> None:
    global _CONTEXT
    _CONTEXT = context


def scan_task(task: tuple) -> tuple[int, list[str], bool]:
    """``(segment_index, lines)`` -> ``(records, columns, has_rows)`` of a JSON Lines chunk."""
    _, lines = task
    columns, has_rows = scan_jsonl_chunk(lines)
    return len(lines), columns, has_rows


def tokenize_task(task: tuple) -> dict[int, Piece]:
    """``(segment_index, payload, assign_slice, layout_name)`` -> ``{TRAIN: Piece, EVAL: Piece}``."""
    index, payload, assign, layout_name = task
    ctx = _CONTEXT
    segment = ctx.segments[index]
    layout = LAYOUTS_BY_NAME.get(layout_name)
    wanted = [k for k in range(len(assign)) if assign[k]]
    if segment.kind == "dataset" and wanted:
        # Slice only the rows in use (data_split may drop many), then map back to chunk positions.
        start = payload[0]
        rows = dataset_rows(segment.dataset, start + wanted[0], start + wanted[-1] + 1, segment.source)
        records = {k: rows[k - wanted[0]] for k in wanted}
    else:
        all_records = segment_records(segment, payload) if wanted else []
        records = {k: all_records[k] for k in wanted}
    return {split: _tokenize_split([records[k] for k in wanted if assign[k] == split], layout, ctx)
            for split in (TRAIN, EVAL)}


def _conversation_rows(record: RawRecord, layout, ctx: Context) -> list:
    """One record of a conversation layout -> ``[sample dict]`` or ``[SkippedRow]`` (one sample per
    conversation, labelled by :class:`~easysft.data.chat_render.ChatRenderer`)."""
    value = record.value
    if isinstance(value, Skip) or not isinstance(value, dict):
        return record_rows(record, layout, False)
    conversation = read_conversation(value, *CONVERSATION_COLUMNS[layout.name])
    out = conversation if isinstance(conversation, Skip) else ctx.renderer.tokenize(conversation)
    if isinstance(out, Skip):
        return [SkippedRow(out.reason, out.detail, record.source, record.row)]
    return [out]


def _tokenize_split(records: list[RawRecord], layout, ctx: Context) -> Piece:
    if ctx.renderer is not None and layout is not None and layout.name in CONVERSATION_COLUMNS:
        per_record = [_conversation_rows(record, layout, ctx) for record in records]
        return _collect(per_record, lambda row: row)
    per_record = [record_rows(record, layout, ctx.multi_turn) for record in records]
    examples = [row for rows in per_record for row in rows if not isinstance(row, SkippedRow)]
    outputs = iter(tokenize_examples(ctx.tokenizer, [(e.prompt, e.answer, e.context) for e in examples],
                                     max_prompt_len=ctx.max_prompt_len, max_ans_len=ctx.max_ans_len,
                                     template=ctx.template))
    return _collect(per_record, lambda row: row if isinstance(row, SkippedRow) else next(outputs))


def _collect(per_record: list[list], result) -> Piece:
    """The Piece of records whose rows are ``per_record``; ``result(row)`` is a row's sample dict, Skip or
    SkippedRow (called once per row, in order)."""
    samples, skips, ends = [], [], []
    for position, rows in enumerate(per_record):
        for row in rows:
            out = result(row)
            if isinstance(out, SkippedRow):
                skips.append((position, out.reason, out.detail, out.source, out.row))
            elif isinstance(out, Skip):
                skips.append((position, out.reason, out.detail, row.source, row.row))
            else:
                samples.append(out)
        ends.append(len(samples))
    return _piece(len(per_record), ends, samples, skips)


def _piece(num_records: int, ends: list[int], samples: list[dict], skips: list[tuple]) -> Piece:
    ids = np.fromiter((t for s in samples for t in s["input_ids"]), dtype=np.int32)
    labels = np.fromiter((t for s in samples for t in s["labels"]), dtype=np.int64, count=len(ids))
    return Piece(
        num_records=num_records,
        record_ends=np.array(ends, dtype=np.int64),
        ids=ids,
        mask=labels != IGNORE_INDEX,
        sample_lens=np.array([len(s["input_ids"]) for s in samples], dtype=np.int64),
        prompt_lens=np.array([s["num_prompt_tokens"] for s in samples], dtype=np.int64),
        answer_lens=np.array([s["num_answer_tokens"] for s in samples], dtype=np.int64),
        prompt_truncated=np.array([s["prompt_truncated"] for s in samples], dtype=bool),
        answer_truncated=np.array([s["answer_truncated"] for s in samples], dtype=bool),
        skips=skips,
        conversation=np.array([[s["conversation"][name] for name in CONVERSATION_COUNTERS] if "conversation" in s
                               else [0] * len(CONVERSATION_COUNTERS) for s in samples],
                              dtype=np.int64).reshape(len(samples), len(CONVERSATION_COUNTERS)),
    )


def _worker_init() -> None:
    # The tokenizers library warns (and may deadlock) when its own thread pool meets fork; one thread per
    # worker process is the parallelism we want anyway. Workers never touch torch (or a GPU).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class Runner:
    """Maps a task function over tasks in order: in this process (``num_proc`` 1) or in forked workers."""

    def __init__(self, num_proc: int):
        self.num_proc = num_proc
        self._pool = None
        if num_proc > 1:
            import multiprocessing

            self._pool = multiprocessing.get_context("fork").Pool(num_proc, initializer=_worker_init)

    def map(self, fn: Callable, tasks: Iterable) -> Iterator:
        if self._pool is None:
            return map(fn, tasks)
        return ordered_results(self._pool, fn, tasks, window=2 * self.num_proc)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ordered_results(pool, fn: Callable, tasks: Iterable, window: int) -> Iterator:
    """Results of ``fn`` over ``tasks`` in task order, with at most ``window`` tasks submitted and unfinished.

    (``Pool.imap`` would read the whole task iterable ahead, holding every chunk of a large file in memory.)
    """
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
