"""``--data_path`` entries -> record streams (:class:`Segment`) read in chunks, each record assigned to a split.

The streaming twin of :func:`easysft.data.sources.read_source`, with the same rules (hold-out, ``data_split``,
layout detected on the union of a stream's columns) but never holding a large source in memory:

- JSON Lines files are read line by line; only one chunk of lines is in memory (:meth:`Segment.chunks`);
- parquet/CSV files and Hugging Face datasets are Arrow tables, memory-mapped by ``datasets``; a chunk is a row
  range, sliced by whoever tokenizes it;
- a ``.json`` list file is parsed whole (JSON has no record boundaries to stream on; use JSON Lines for data
  larger than memory).

Each segment carries ``assign``: one int8 per record, 0 = not used (dropped by ``data_split``), 1 = train,
2 = eval. Computing it needs the record count, which a first pass (:func:`scan_jsonl_chunk`, run in the worker
pool for large files) provides together with the columns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from easysft.config import parse_data_split
from easysft.data.adapters import LAYOUTS, Layout, detect_layout
from easysft.data.readers import RawRecord, _load_table, open_hf_dataset, read_json_file
from easysft.data.sources import EVAL_SPLIT_NAMES, _split_files, hold_out_count, source_kind
from easysft.data.tokenize import Skip
from easysft.errors import DataError

TRAIN, EVAL = 1, 2
LAYOUTS_BY_NAME = {layout.name: layout for layout in LAYOUTS}


@dataclass
class Segment:
    """One stream of records: a JSON Lines file, an in-memory record list, or an Arrow dataset."""

    kind: str  # "jsonl" | "records" | "dataset"
    source: str  # the location prefix of its records (file path, or "name[split]" for datasets)
    fixed_split: int | None  # TRAIN/EVAL when the stream is one split; None when eval is held out of it
    records: list[RawRecord] | None = None
    dataset: Any = None
    num_records: int = 0
    columns: dict[str, None] = field(default_factory=dict)
    has_rows: bool = False
    layout: Layout | None = None
    assign: np.ndarray | None = None

    def chunks(self, rows: int) -> Iterator[tuple[int, int, Any]]:
        """``(first_record, end_record, payload)`` per chunk of at most ``rows`` records, in order.

        Payloads: jsonl -> ``[(line_number, raw_bytes), ...]`` (blank lines already dropped); records -> a list
        of :class:`RawRecord`; dataset -> ``(start, stop)``.
        """
        if self.kind == "records":
            for start in range(0, len(self.records), rows):
                chunk = self.records[start : start + rows]
                yield start, start + len(chunk), chunk
        elif self.kind == "dataset":
            for start in range(0, len(self.dataset), rows):
                stop = min(start + rows, len(self.dataset))
                yield start, stop, (start, stop)
        else:
            for start, lines in _jsonl_chunks(self.source, rows):
                yield start, start + len(lines), lines


def _jsonl_chunks(path: str, rows: int) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    index, chunk = 0, []
    try:
        handle = open(path, "rb")  # noqa: SIM115 -- closed below; a generator spans many reads
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror}).") from None
    with handle:
        # Binary iteration splits on b"\n" only (a raw U+2028 inside a JSON string never splits a record).
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            chunk.append((number, raw))
            if len(chunk) >= rows:
                yield index, chunk
                index += len(chunk)
                chunk = []
    if chunk:
        yield index, chunk


def scan_jsonl_chunk(lines: list[tuple[int, bytes]]) -> tuple[list[str], bool]:
    """The columns (first-seen order) and whether any line is an object, for layout detection."""
    columns: dict[str, None] = {}
    has_rows = False
    for _, raw in lines:
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue  # counted as an invalid line when the rows are read
        if isinstance(value, dict):
            has_rows = True
            columns.update(dict.fromkeys(value))
    return list(columns), has_rows


def _records_segment(records: list[RawRecord], source: str, fixed_split: int | None) -> Segment:
    columns: dict[str, None] = {}
    for record in records:
        if isinstance(record.value, dict):
            columns.update(dict.fromkeys(record.value))
    has_rows = any(isinstance(r.value, dict) for r in records)
    return Segment("records", source, fixed_split, records=records, num_records=len(records),
                   columns=columns, has_rows=has_rows)


def _file_segment(path: str, fixed_split: int | None) -> Segment:
    lower = path.lower()
    if lower.endswith(".jsonl"):
        return Segment("jsonl", path, fixed_split)  # counted and scanned later, possibly in parallel
    if lower.endswith(".json"):
        return _records_segment(read_json_file(path), path, fixed_split)
    return _dataset_segment(_load_table(path), path, fixed_split)


def _dataset_segment(dataset, source: str, fixed_split: int | None) -> Segment:
    segment = Segment("dataset", source, fixed_split, dataset=dataset, num_records=len(dataset),
                      columns=dict.fromkeys(dataset.column_names), has_rows=True)
    segment.layout = detect_layout(dataset.column_names, source)  # a dataset always has a layout
    return segment


@dataclass
class SourcePlan:
    """One ``--data_path`` entry: its segments and where its eval rows come from."""

    name: str
    segments: list[Segment]
    eval_origin: str = ""

    @property
    def layout_name(self) -> str:
        layouts = [s.layout for s in self.segments if s.layout is not None]
        return layouts[0].name if layouts else "none"


def open_source(path: str) -> SourcePlan:
    """Recognise a ``--data_path`` entry and open its streams (no JSON Lines line is parsed yet)."""
    kind = source_kind(path)
    if kind == "folder":
        files = _split_files(path)
        segments = [_file_segment(files["train"], TRAIN if "eval" in files else None)]
        if "eval" in files:
            segments.append(_file_segment(files["eval"], EVAL))
        return SourcePlan(path, segments)
    if kind == "file":
        return SourcePlan(path, [_file_segment(path, None)])
    splits = open_hf_dataset(path)
    if "train" in splits:
        train_name = "train"
    elif len(splits) == 1:
        train_name = next(iter(splits))
    else:
        raise DataError(f"--data_path {path}: no 'train' split (splits found: {', '.join(splits)}); "
                        "save the training rows as a split named 'train'.")
    eval_name = next((n for n in EVAL_SPLIT_NAMES if n in splits and n != train_name), None)
    segments = [_dataset_segment(splits[train_name], f"{path}[{train_name}]", TRAIN if eval_name else None)]
    if eval_name:
        segments.append(_dataset_segment(splits[eval_name], f"{path}[{eval_name}]", EVAL))
    return SourcePlan(path, segments)


def finish_scan(segment: Segment, scans: Iterator[tuple[int, list[str], bool]]) -> None:
    """Fold per-chunk ``(records, columns, has_rows)`` of a JSON Lines segment into its count and layout."""
    for count, columns, has_rows in scans:
        segment.num_records += count
        segment.columns.update(dict.fromkeys(columns))
        segment.has_rows |= has_rows


def assign_splits(plan: SourcePlan, *, eval_fraction: float, seed: int, data_split: str) -> None:
    """Layouts and per-record split assignments of every segment (the rules of ``sources.read_source``)."""
    share = parse_data_split(data_split)[0]
    for segment in plan.segments:
        if segment.layout is None and segment.has_rows:
            segment.layout = detect_layout(list(segment.columns), segment.source)
        n = segment.num_records
        assign = np.zeros(n, dtype=np.int8)
        if segment.fixed_split is None:
            n_eval = hold_out_count(n, eval_fraction)
            held = np.zeros(n, dtype=bool)
            held[_seeded_order(n, seed, 1)[:n_eval]] = True
            train_pos, eval_pos = np.flatnonzero(~held), np.flatnonzero(held)
            plan.eval_origin = f"held out {n_eval} of {n} rows (eval_fraction {eval_fraction:g})"
        else:
            positions = np.arange(n)
            empty = np.zeros(0, dtype=np.int64)
            train_pos, eval_pos = (positions, empty) if segment.fixed_split == TRAIN else (empty, positions)
            plan.eval_origin = "eval split"
        assign[train_pos[_kept(len(train_pos), share, seed, 2)]] = TRAIN
        assign[eval_pos[_kept(len(eval_pos), share, seed, 3)]] = EVAL
        segment.assign = assign


def _seeded_order(count: int, seed: int, tag: int) -> np.ndarray:
    # The same streams as sources._seeded_order, so both readers pick the same rows.
    return np.random.default_rng([seed, tag]).permutation(count)


def _kept(count: int, share: float, seed: int, tag: int) -> np.ndarray:
    """Positions kept by the SFT share of ``data_split`` (sources._take_share, as indices)."""
    if share >= 1.0 or count == 0:
        return np.arange(count)
    keep = max(1, round(count * share))
    return np.sort(_seeded_order(count, seed, tag)[:keep])


def dataset_rows(dataset, start: int, stop: int, source: str) -> list[RawRecord]:
    """Rows ``start:stop`` of an Arrow dataset as records located ``source row i``."""
    columns = dataset[start:stop]
    names = list(columns)
    return [RawRecord({name: columns[name][k] for name in names}, source, f"row {start + k}")
            for k in range(stop - start)]


def segment_records(segment: Segment, payload) -> list[RawRecord]:
    """The records of one chunk payload of ``segment`` (JSON Lines are parsed here)."""
    if segment.kind == "records":
        return payload
    if segment.kind == "dataset":
        return dataset_rows(segment.dataset, payload[0], payload[1], segment.source)
    return [_parse_line(segment.source, number, raw) for number, raw in payload]


def _parse_line(path: str, number: int, raw: bytes) -> RawRecord:
    try:
        return RawRecord(json.loads(raw.decode("utf-8")), path, number)
    except UnicodeDecodeError:
        return RawRecord(Skip("invalid_json_line", "not UTF-8 text"), path, number)
    except json.JSONDecodeError as exc:
        return RawRecord(Skip("invalid_json_line", f"column {exc.colno}: {exc.msg}"), path, number)
    except RecursionError:  # json's decoder recurses once per nesting level
        return RawRecord(Skip("invalid_json_line", "nested too deeply to read"), path, number)


def plan_source(path: str, *, eval_fraction: float, seed: int, data_split: str,
                chunk_rows: int = 1024) -> SourcePlan:
    """Open, scan (in this process) and assign one source: ready for :meth:`Segment.chunks`."""
    plan = open_source(path)
    for segment in plan.segments:
        if segment.kind == "jsonl":
            finish_scan(segment, ((len(lines), *scan_jsonl_chunk(lines))
                                  for _, _, lines in segment.chunks(chunk_rows)))
    assign_splits(plan, eval_fraction=eval_fraction, seed=seed, data_split=data_split)
    return plan


def iter_split_records(path: str, split: str, *, eval_fraction: float, seed: int, data_split: str,
                       chunk_rows: int = 1024) -> Iterator[tuple[RawRecord, Layout | None]]:
    """The records of one split of one source, in file order, with their layout, read chunk by chunk
    (what ``sources.load_examples`` and so ``easysft infer`` use; the same rows as ``read_source``)."""
    plan = plan_source(path, eval_fraction=eval_fraction, seed=seed, data_split=data_split, chunk_rows=chunk_rows)
    want = TRAIN if split == "train" else EVAL
    for segment in plan.segments:
        for start, stop, payload in segment.chunks(chunk_rows):
            assign = segment.assign[start:stop]
            if not (assign == want).any():
                continue
            for k, record in enumerate(segment_records(segment, payload)):
                if assign[k] == want:
                    yield record, segment.layout


def local_size_bytes(paths: list[str]) -> int:
    """Bytes of the local files behind ``paths`` (0 for hub names): decides whether a worker pool pays off."""
    total = 0
    for path in paths:
        if os.path.isfile(path):
            total += os.path.getsize(path)
        elif os.path.isdir(path):
            for folder, _, files in os.walk(path):
                total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total
