"""Data sources (``--data_path``) -> train/eval rows of :class:`Example` (or :class:`SkippedRow`).

A ``--data_path`` entry is one of (checked in this order):

1. a folder holding ``train.json`` or ``train.jsonl`` (and optionally ``eval.json`` / ``eval.jsonl``): the
   original design's layout, JSON lists of ``{"prompt": str, "answer": str}``;
2. a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``);
3. a ``.json``, ``.jsonl``, ``.parquet`` or ``.csv`` file;
4. anything else that exists as a folder, or a hub name such as ``Anthropic/hh-rlhf``: ``datasets.load_dataset``.

Splits: the train split is ``train`` (a dataset with one split uses it whatever its name); the eval split is
the first of ``eval``, ``validation``, ``valid``, ``test`` that exists. A source with no eval split holds out
``eval_fraction`` of its rows (seeded; at least 1 row when ``eval_fraction > 0`` and the source has 2+ rows).
Then ``data_split`` (``"10,0,0"``, ``"2,4,4"``) keeps the first (SFT) share of each split's rows, chosen by
seed; kept rows stay in file order. Columns are mapped to prompt/answer by :mod:`easysft.data.adapters`.

Rows from several sources are concatenated in ``--data_path`` order; each row keeps its ``source`` and ``row``
(``file:line`` for JSON/JSONL, ``source row i`` for tables and datasets) for reports and ``--strict`` errors.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from easysft.data.adapters import Layout
from easysft.data.conversations import generation_turns, read_conversation
from easysft.data.readers import (
    RawRecord,
    format_location,
    open_hf_dataset,
)
from easysft.data.tokenize import Skip
from easysft.errors import ConfigError, DataError

FILE_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
EVAL_SPLIT_NAMES = ("eval", "validation", "valid", "test")
SPLITS = ("train", "eval")


@dataclass
class Example:
    """One prompt/answer pair. ``context``: earlier chat turns (role/content dicts) before ``prompt``.
    ``source`` and ``row`` locate the row for reports and --strict errors (``file:line`` or dataset index)."""

    prompt: object
    answer: object
    context: list[dict] = field(default_factory=list)
    source: str = ""
    row: int | str = 0
    # A turn of a conversation (--template chat): the normalised messages before it, the tools, and the
    # reference tool calls ([{"name", "arguments"}], None when the reference turn is text). Prompt ids then come
    # from the chat template's rendering of ``messages`` (easysft.data.chat_render).
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    reference_calls: list[dict] | None = None

    @property
    def location(self) -> str:
        return format_location(self.source, self.row)


@dataclass(frozen=True)
class SkippedRow:
    """A row that makes no example, and why (``reason`` is one of ``tokenize.SKIP_REASONS``)."""

    reason: str
    detail: str
    source: str
    row: int | str

    @property
    def location(self) -> str:
        return format_location(self.source, self.row)


@dataclass
class SourceSplit:
    """The raw records of one split of one source, and the layout detected on ALL of that split's records."""

    records: list[RawRecord]
    layout: Layout | None


@dataclass
class SourceRecords:
    """One ``--data_path`` entry after eval hold-out and ``data_split``; ``eval_origin`` says where eval came from."""

    name: str
    train: SourceSplit
    eval: SourceSplit
    eval_origin: str


# ------------------------------------------------------------------------------------------------------
# Recognising a --data_path entry


def _split_files(folder: str) -> dict[str, str] | None:
    """``{"train": path, "eval": path?}`` for a folder in the original layout, or None."""
    found: dict[str, str] = {}
    for split in SPLITS:
        for ext in (".json", ".jsonl"):
            _check_regular_file(os.path.join(folder, f"{split}{ext}"))
        names = [f"{split}{ext}" for ext in (".json", ".jsonl") if os.path.isfile(os.path.join(folder, f"{split}{ext}"))]
        if len(names) > 1:
            raise DataError(f"{folder}: holds both {names[0]} and {names[1]}; keep one of them.")
        if names:
            found[split] = os.path.join(folder, names[0])
    if "eval" in found and "train" not in found:
        # Loading this folder as a generic dataset would train on the eval rows.
        raise DataError(f"{folder}: holds {os.path.basename(found['eval'])} but no train.json or train.jsonl; add "
                        "the training rows as train.json (or pass a data file itself).")
    return found if "train" in found else None


def _check_regular_file(path: str) -> None:
    """DataError for a path that exists but is no regular file (a device such as /dev/zero, a pipe, a broken
    link): reading one would hang, never end, or fail late."""
    if os.path.lexists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        target = os.path.realpath(path)
        shown = f"{path} (-> {target})" if target != os.path.abspath(path) else path
        raise DataError(f"{shown}: not a regular file (a device, pipe or broken link); give a real data file.")


def source_kind(path: str) -> str:
    """'folder' | 'file' | 'saved' | 'hub' (see the module docstring); DataError for a missing local path."""
    _check_regular_file(path)
    if os.path.isdir(path):
        if _split_files(path):
            return "folder"
        if any(os.path.isfile(os.path.join(path, n)) for n in ("dataset_dict.json", "state.json")):
            return "saved"
        return "hub"
    if os.path.isfile(path):
        if not path.lower().endswith(FILE_EXTENSIONS):
            raise DataError(
                f"--data_path {path}: unsupported file type; use one of {', '.join(FILE_EXTENSIONS)} "
                "(or a folder with train.json/eval.json, or a Hugging Face dataset)."
            )
        return "file"
    looks_local = path.startswith((".", "/", "~")) or path.lower().endswith(FILE_EXTENSIONS) or path.count("/") > 1
    if looks_local or not path.strip():
        raise DataError(
            f"--data_path {path}: no such file or folder; give a folder with train.json/eval.json, a "
            ".json/.jsonl/.parquet/.csv file, or a Hugging Face dataset name."
        )
    return "hub"


def source_fingerprint(path: str) -> str:
    """A hash that changes whenever the source's content changes: the bytes of its files (a local file or folder),
    or datasets' fingerprint of a hub dataset."""
    digest = hashlib.sha256()
    kind = source_kind(path)
    if kind == "folder":
        for split, file in sorted(_split_files(path).items()):
            digest.update(f"{split}:{os.path.basename(file)}:".encode())
            _hash_file(file, digest)
    elif kind == "file":
        _hash_file(path, digest)
    elif os.path.isdir(path):
        # A local folder read through datasets (load_from_disk or load_dataset): hash the bytes of the files it
        # holds. datasets' own fingerprint is no content hash here: for data files it sees paths and mtimes, and a
        # saved folder's state.json keeps its fingerprint when an .arrow file is changed in place.
        digest.update(f"{kind}:".encode())
        for relative, file in _folder_files(path):
            digest.update(f"{relative}\0{os.path.getsize(file)}\0".encode())
            _hash_file(file, digest)
    else:
        # A hub dataset: datasets' fingerprint follows the hub revision (content-addressed).
        for split, dataset in sorted(open_hf_dataset(path).items()):
            digest.update(f"{split}:{dataset._fingerprint}:{len(dataset)};".encode())
    return digest.hexdigest()


def _folder_files(folder: str) -> list[tuple[str, str]]:
    """``(relative path, path)`` of every regular file under ``folder``, sorted; hidden files and folders (a
    leading dot: .git, .cache, editor files) are skipped."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            file = os.path.join(parent, name)
            if not name.startswith(".") and os.path.isfile(file):
                found.append((os.path.relpath(file, folder).replace(os.sep, "/"), file))
    return sorted(found)


def _hash_file(path: str, digest) -> None:
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror}).") from None


# ------------------------------------------------------------------------------------------------------
# Reading records, holding out eval, applying data_split


def hold_out_count(num_rows: int, eval_fraction: float) -> int:
    """Rows held out for eval: ``round(n * eval_fraction)``, at least 1, and never every row."""
    if eval_fraction <= 0 or num_rows < 2:
        return 0
    return min(num_rows - 1, max(1, round(num_rows * eval_fraction)))


def read_source(path: str, *, eval_fraction: float = 0.05, seed: int = 1234,
                data_split: str = "10,0,0") -> SourceRecords:
    """Read one ``--data_path`` entry into train/eval records (eval held out when the source has none).

    Holds every record in memory (for tests and small data); preparation streams the same rows chunk by chunk
    through :mod:`easysft.data.segments`, which owns the rules (hold-out, ``data_split``, layouts)."""
    from easysft.data.segments import (  # segments builds on this module
        EVAL,
        TRAIN,
        plan_source,
        segment_records,
    )

    plan = plan_source(path, eval_fraction=eval_fraction, seed=seed, data_split=data_split)
    records: dict[int, list[RawRecord]] = {TRAIN: [], EVAL: []}
    layouts: dict[int, Layout | None] = {TRAIN: None, EVAL: None}
    for segment in plan.segments:
        for start, stop, payload in segment.chunks(1024):
            assign = segment.assign[start:stop]
            for k, record in enumerate(segment_records(segment, payload)):
                if assign[k]:
                    records[int(assign[k])].append(record)
        for split in (TRAIN, EVAL):
            if segment.fixed_split in (None, split):
                layouts[split] = layouts[split] or segment.layout
    return SourceRecords(path, SourceSplit(records[TRAIN], layouts[TRAIN]), SourceSplit(records[EVAL], layouts[EVAL]),
                         plan.eval_origin)


def to_rows(split: SourceSplit, multi_turn: bool = False) -> list[Example | SkippedRow]:
    """Records -> examples through the split's layout; unreadable or unmappable records become SkippedRow."""
    rows: list[Example | SkippedRow] = []
    for record in split.records:
        rows.extend(record_rows(record, split.layout, multi_turn))
    return rows


CONVERSATION_COLUMNS = {"messages": ("messages", "role", "content"),
                        "sharegpt": ("conversations", "from", "value")}


def record_rows(record: RawRecord, layout: Layout | None, multi_turn: bool = False,
                conversation_turns: str | None = None) -> list[Example | SkippedRow]:
    """One record -> its examples (several with ``multi_turn``), or one SkippedRow saying why it makes none.
    ``conversation_turns`` ('all' | 'next', generation with --template chat): a ``messages``/``sharegpt`` record
    is read as a conversation and makes one example per turn to generate (``generation_turns``)."""
    value = record.value
    if isinstance(value, Skip):
        return [SkippedRow(value.reason, value.detail, record.source, record.row)]
    if not isinstance(value, dict):
        return [SkippedRow("missing_key", f"the row is a {type(value).__name__}, not an object",
                           record.source, record.row)]
    if conversation_turns and layout.name in CONVERSATION_COLUMNS:
        return _conversation_examples(record, layout, conversation_turns)
    out = layout.adapt(value, multi_turn)
    if isinstance(out, Skip):
        return [SkippedRow(out.reason, out.detail, record.source, record.row)]
    return [Example(t.prompt, t.answer, [dict(c) for c in t.context], record.source, record.row) for t in out]


def _conversation_examples(record: RawRecord, layout: Layout, which: str) -> list[Example | SkippedRow]:
    conversation = read_conversation(record.value, *CONVERSATION_COLUMNS[layout.name],
                                     require_assistant=which != "next")
    if isinstance(conversation, Skip):
        return [SkippedRow(conversation.reason, conversation.detail, record.source, record.row)]
    examples = []
    for before, turn in generation_turns(conversation, which):
        last = next((m["content"] for m in reversed(before) if m["role"] in ("user", "tool")), "")
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                 for c in (turn or {}).get("tool_calls", [])]
        examples.append(Example(last, turn["content"] if turn else "", [], record.source, record.row,
                                messages=before, tools=list(conversation.tools or []) or None,
                                reference_calls=calls or None))
    return examples or [SkippedRow("unparseable_dialogue", "no assistant turn to generate", record.source,
                                   record.row)]


def strict_error(skipped: SkippedRow) -> DataError:
    detail = f" ({skipped.detail})" if skipped.detail else ""
    return DataError(
        f"{skipped.location}: {skipped.reason}{detail}; fix or remove the row, or drop --strict to skip such rows."
    )


def load_examples(data_path, split: str = "train", *, eval_fraction: float = 0.05, seed: int = 1234,
                  data_split: str = "10,0,0", multi_turn: bool = False, strict: bool = False,
                  skipped: list[SkippedRow] | None = None, conversation_turns: str | None = None) -> list[Example]:
    """The examples of ``split`` ('train' or 'eval') of one or more sources, in ``data_path`` order.

    Rows that cannot make an example are dropped (``strict=True``: the first one raises DataError naming its
    ``file:line`` or dataset row and the reason). Values are not validated here: a null or numeric answer
    reaches :func:`~easysft.data.tokenize.tokenize_example`, which skips it. Dropped rows are appended to
    ``skipped`` when a list is given (so a caller can count and name them).
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is unknown; choose 'train' or 'eval'.")
    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    if not paths:
        raise ConfigError("--data_path is required: give a data folder, file or Hugging Face dataset.")
    from easysft.data.segments import iter_split_records  # segments builds on this module

    out: list[Example] = []
    for path in paths:
        # Read chunk by chunk: only the split's examples are kept, never the whole source's records.
        for record, layout in iter_split_records(path, split, eval_fraction=eval_fraction, seed=seed,
                                                 data_split=data_split):
            for row in record_rows(record, layout, multi_turn, conversation_turns):
                if isinstance(row, SkippedRow):
                    if strict:
                        raise strict_error(row)
                    if skipped is not None:
                        skipped.append(row)
                    continue
                out.append(row)
    return out
