"""Read raw records from files and datasets, keeping where each one came from.

A reader returns :class:`RawRecord` objects: the record (normally a dict of columns) and its location, or a
:class:`~easysft.data.tokenize.Skip` for a record that cannot even be read (an invalid JSON Lines line).
Nothing here knows about prompts and answers; :mod:`easysft.data.adapters` maps columns to examples.

Contracts:

- JSON (``.json``): one top-level list of objects. Each record's location is ``file:line`` (the line where the
  object starts). A file whose top level is not a list, or that is not valid JSON, raises :class:`DataError`
  naming ``file:line:column`` -- one broken object makes the rest of a JSON list unreadable, so it cannot be
  skipped. A ``.json`` file holding JSON Lines (one object per line) is read as JSON Lines.
- JSON Lines (``.jsonl``): one object per line; blank lines are ignored; a line that does not parse (or is not
  UTF-8) becomes a ``Skip("invalid_json_line")`` located at ``file:line``.
- Both accept a UTF-8 byte-order mark and CRLF line ends. Lines are split on ``\\n`` only, so a raw U+2028
  inside a JSON string (valid JSON) never splits a record.
- ``.parquet`` and ``.csv`` are read with :func:`datasets.load_dataset`; CSV cells are read as strings (an
  empty cell is ``""``, ``42`` stays the text ``"42"``) because CSV has no types.
- Hugging Face datasets: :func:`open_hf_dataset` gives ``{split: Dataset}``; locations are ``name[split] row i``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from easysft.data.tokenize import Skip
from easysft.errors import DataError
from easysft.files import read_utf8

_BOM = "\ufeff"
_JSON_WS = " \t\n\r"


@dataclass(frozen=True)
class RawRecord:
    """One record as read: ``value`` is the parsed record (or a Skip); ``source``/``row`` locate it.

    ``row`` is an int line number for JSON/JSONL files (location ``file:line``) and a string such as
    ``"row 12"`` for tables and datasets (location ``source row 12``).
    """

    value: Any
    source: str
    row: int | str

    @property
    def location(self) -> str:
        return format_location(self.source, self.row)


def format_location(source: str, row: int | str) -> str:
    """``file:line`` for text files, ``source row i`` for tables and datasets."""
    return f"{source}:{row}" if isinstance(row, int) else f"{source} {row}"


# ------------------------------------------------------------------------------------------------------
# JSON and JSON Lines


def read_text_file(path: str) -> str:
    """The whole file as text (BOM removed); one-line DataError naming ``file:line`` when it cannot be read or is
    not UTF-8 (every text file a flag names is read through here or the JSON Lines reader)."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise DataError(f"{path}: not a regular file (a device or pipe); give a real text file.")
    return _read_text(path)


def _read_text(path: str) -> str:
    """The whole file as text (BOM removed); one-line DataError when it is missing or not UTF-8."""
    return read_utf8(path, DataError)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_WS:
        pos += 1
    return pos


def _json_error(path: str, exc: json.JSONDecodeError, what: str = "invalid JSON") -> DataError:
    return DataError(
        f"{path}:{exc.lineno}:{exc.colno}: {what} ({exc.msg}); fix the file (a .json file must hold one list "
        "of objects; use .jsonl for one object per line)."
    )


def read_json_file(path: str) -> list[RawRecord]:
    """Records of a JSON file (a top-level list), each located at the line where it starts."""
    try:
        return _read_json_records(path)
    except RecursionError:  # json's decoder recurses once per nesting level
        raise too_deeply_nested(path) from None


def too_deeply_nested(where: str) -> DataError:
    return DataError(f"{where}: JSON nested too deeply to read (thousands of levels); a row must be a flat "
                     'object such as {"prompt": "...", "answer": "..."}.')


def _read_json_records(path: str) -> list[RawRecord]:
    text = _read_text(path)
    start = _skip_ws(text, 0)
    if start == len(text):
        raise DataError(f"{path}: the file is empty; it must hold a JSON list of objects such as "
                        '[{"prompt": "...", "answer": "..."}].')
    if text[start] == "{":
        return _read_object_file(path, text, start)
    if text[start] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc) from None
        raise DataError(
            f"{path}: the top level is a {_json_type(value)}; it must be a list of objects such as "
            '[{"prompt": "...", "answer": "..."}].'
        )
    return list(_iter_json_array(path, text, start))


def _read_object_file(path: str, text: str, start: int) -> list[RawRecord]:
    """A .json file starting with '{': several objects (JSON Lines under a .json name) or one object (an error)."""
    decoder = json.JSONDecoder()
    try:
        _, end = decoder.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc) from None
    if _skip_ws(text, end) == len(text):
        raise DataError(
            f"{path}: the top level is an object; it must be a list of objects such as "
            '[{"prompt": "...", "answer": "..."}] (or JSON Lines: one object per line).'
        )
    return list(_iter_json_lines(path, text.encode("utf-8").split(b"\n")))


def _iter_json_array(path: str, text: str, pos: int) -> Iterator[RawRecord]:
    """Walk a top-level JSON array element by element so each record knows its line number."""
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0
    pos = _skip_ws(text, pos + 1)  # past '['
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise _json_error(path, exc) from None
            line += text.count("\n", counted_to, pos)
            counted_to = pos
            yield RawRecord(value, path, line)
            pos = _skip_ws(text, end)
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            _raise_at(path, text, pos, "expected ',' or ']' after a list element")
    pos = _skip_ws(text, pos)
    if pos != len(text):
        _raise_at(path, text, pos, "extra data after the top-level list")


def _raise_at(path: str, text: str, pos: int, message: str) -> None:
    # JSONDecodeError computes line/column from the offset, exactly as json's own errors report them.
    raise _json_error(path, json.JSONDecodeError(message, text, pos)) from None


def read_jsonl_file(path: str) -> list[RawRecord]:
    """Records of a JSON Lines file; an unparseable line is a Skip located at ``file:line``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror}).") from None
    # Split on b"\n" only: str.splitlines would also split on U+2028/U+0085, which may appear raw in strings.
    return list(_iter_json_lines(path, data.split(b"\n")))


def _iter_json_lines(path: str, lines: list[bytes]) -> Iterator[RawRecord]:
    for number, raw in enumerate(lines, start=1):
        raw = raw.rstrip(b"\r")
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield RawRecord(Skip("invalid_json_line", "not UTF-8 text"), path, number)
            continue
        except json.JSONDecodeError as exc:
            yield RawRecord(Skip("invalid_json_line", f"column {exc.colno}: {exc.msg}"), path, number)
            continue
        yield RawRecord(value, path, number)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


# ------------------------------------------------------------------------------------------------------
# Tables (parquet, csv) and Hugging Face datasets, all through `datasets`


def read_table_file(path: str) -> list[RawRecord]:
    """Records of a .parquet or .csv file, located as ``file row i`` (0-based)."""
    dataset = _load_table(path)
    return dataset_records(dataset, path)


def _load_table(path: str):
    import datasets

    kind = "parquet" if path.lower().endswith(".parquet") else "csv"
    kwargs: dict[str, Any] = {}
    if kind == "csv":
        columns = _csv_header(path)
        # CSV has no types: read every cell as text so '42' stays a string and '' stays '' (not NaN/None).
        kwargs = {
            "features": datasets.Features({name: datasets.Value("string") for name in columns}),
            "keep_default_na": False,
        }
    elif _parquet_rows(path) == 0:
        # datasets fails on a table without rows ("An error occurred while generating the dataset"): give the
        # empty table itself, so the source reports "no training rows found" as an empty JSON Lines file does.
        return datasets.Dataset.from_dict({name: [] for name in _parquet_columns(path)})
    try:
        return datasets.load_dataset(kind, data_files=path, split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 -- pyarrow/pandas raise many types; we report one line
        raise DataError(
            f"{path}: cannot read it as {kind} ({_first_line(exc)}); check that it is a valid .{kind} file."
        ) from None


def _parquet_rows(path: str) -> int | None:
    """The row count in a parquet file's footer; None when the footer cannot be read (datasets then reports)."""
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 -- not parquet at all: the load below gives the one-line error
        return None


def _parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(path).schema_arrow.names)


def _csv_header(path: str) -> list[str]:
    """The header of a CSV file, after checking every row: a row with the wrong number of fields is a DataError
    naming ``file:line`` (pandas would report a generic parser error without the line), and so is a header with
    no row below it."""
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: the CSV file is empty; its first line must name the columns "
                                "(prompt,answer).")
            rows, line = 0, reader.line_num
            for row in reader:
                if row:  # a blank line is skipped, as pandas does
                    rows += 1
                    if len(row) != len(header):
                        raise DataError(
                            f"{path}:{line + 1}: {len(row)} field(s) but the header names {len(header)} "
                            f"({','.join(header)}); fix the line (quote a field holding a comma or a line break)."
                        )
                line = reader.line_num
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); re-save it as UTF-8.") from None
    except (OSError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read it as CSV ({exc}); check the file.") from None
    if not rows:
        raise DataError(f"{path}: the CSV file has a header ({','.join(header)}) but no rows; add rows below it.")
    return header


def open_hf_dataset(path: str) -> dict[str, Any]:
    """``{split_name: datasets.Dataset}`` from a saved dataset folder or a hub name / loadable folder."""
    import datasets

    saved = os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")
    )
    if os.path.isdir(path) and not saved:
        _check_one_format(path)
    try:
        loaded = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
    except Exception as exc:  # noqa: BLE001 -- hub/network/format errors of every kind become one line
        where = "saved dataset folder" if saved else "Hugging Face dataset"
        hint = (
            "check the folder (it should come from Dataset.save_to_disk)"
            if saved
            else "check the name or path; hub datasets need network access or a local copy (save_to_disk)"
        )
        raise DataError(f"--data_path {path}: cannot load it as a {where} ({_first_line(exc)}); {hint}.") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


# The data formats `datasets` loads a plain folder with, by builder: it picks ONE builder for a folder (the most
# common extension; parquet on a draw) and silently ignores the files of every other format.
_FOLDER_FORMATS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
                   ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}


def _check_one_format(folder: str) -> None:
    """DataError listing the files when a data folder holds data files of more than one format.

    Refused rather than read all: `datasets` would train on one format's files only, and reading every file would
    have to guess how a CSV's text cells, a parquet's typed columns and JSON rows combine and in which order. Each
    file given as its own --data_path is read exactly, reported per source, and can be weighted."""
    found: dict[str, list[str]] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            builder = _FOLDER_FORMATS.get(os.path.splitext(name)[1].lower())
            if builder and not name.startswith((".", "__")):
                found.setdefault(builder, []).append(os.path.relpath(os.path.join(root, name), folder))
    if len(found) > 1:
        files = [name for names in found.values() for name in names]
        shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        raise DataError(f"--data_path {folder}: holds data files of {len(found)} formats ({shown}), of which only "
                        "one format would be read; pass the files themselves instead of the folder (each is then "
                        "its own source), or keep one format in the folder.")


def dataset_records(dataset, source: str) -> list[RawRecord]:
    """Rows of a ``datasets.Dataset`` as records located ``source row i``."""
    # Column-wise conversion through Arrow is much faster than iterating the dataset row by row.
    columns = dataset.to_dict()
    names = list(columns)
    count = len(dataset)
    return [
        RawRecord({name: columns[name][i] for name in names}, source, f"row {i}") for i in range(count)
    ]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
