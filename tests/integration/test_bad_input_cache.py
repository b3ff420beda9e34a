"""The prepared-data cache checks what it loads, and its key follows the data's bytes (hunt3 C1, C2, C3, M9).

C1/C2: an entry whose ``train_ids.bin`` is overwritten in place (same size) was trusted, and training failed in the
embedding; C3: ``train_offsets.bin`` reordered (same size) failed with a ValueError. Every .bin file's checksum is
now written into meta.json with the entry and checked before training: a mismatch rebuilds the entry, with one
``easysft: note:`` line. M9: a data folder read through ``datasets`` whose file changed at the same size and mtime
was a cache hit (datasets' fingerprint sees paths and mtimes); the key now hashes the folder's file bytes.
"""

import json
import os

import numpy as np
import pytest

from easysft.cli import main
from easysft.data import cache


def _prepare(data, model, cache_dir, out=None):
    argv = ["prepare", "--data_path", data, "--model_name_or_path", model, "--cache_dir", str(cache_dir),
            "--max_ans_len", "32"]
    if out is not None:
        argv += ["--output_dir", str(out)]
    return main(argv)


def _entry_folder(cache_dir) -> str:
    (name,) = [n for n in os.listdir(cache_dir) if not n.startswith(".") and not n.endswith(".failed")]
    return os.path.join(str(cache_dir), name)


def _note_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("easysft: note:") and "checksums" in line]


def _overwrite_ids(path):  # C1/C2: every id becomes -1 (0xff bytes), same size
    with open(path, "rb") as handle:
        size = len(handle.read())
    with open(path, "r+b") as handle:
        handle.write(b"\xff" * size)


def _reorder_offsets(path):  # C3: inner offsets reversed, first and last intact, same size
    offsets = np.fromfile(path, "<i8")
    offsets[1:-1] = offsets[1:-1][::-1].copy()
    offsets.tofile(path)


@pytest.mark.parametrize(("damage", "file"), [(_overwrite_ids, "train_ids.bin"),
                                              (_reorder_offsets, "train_offsets.bin")])
def test_changed_entry_is_rebuilt_before_training(tiny_model_dir, qa_data_dir, tmp_path, capsys, damage, file):
    cache_dir = tmp_path / "cA"
    assert _prepare(qa_data_dir, tiny_model_dir, cache_dir) == 0
    folder = _entry_folder(cache_dir)
    meta = json.loads(open(os.path.join(folder, "meta.json"), encoding="utf-8").read())
    assert set(meta["checksums"]["files"]) == {f"{s}_{p}.bin" for s in ("train", "eval")
                                               for p in ("ids", "offsets", "mask")}
    original = {name: open(os.path.join(folder, name), "rb").read() for name in meta["checksums"]["files"]}
    capsys.readouterr()
    damage(os.path.join(folder, file))
    assert os.path.getsize(os.path.join(folder, file)) == len(original[file])

    out = tmp_path / "o"
    assert main(["train", "--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir, "--cache_dir",
                 str(cache_dir), "--max_ans_len", "32", "--output_dir", str(out), "--max_steps", "1",
                 "--tensorboard", "false"]) == 0
    err = capsys.readouterr().err
    notes = _note_lines(err)
    assert len(notes) == 1 and file in notes[0] and "rebuilding" in notes[0], err
    # The rebuilt entry holds the original bytes again, and the run finished.
    assert _entry_folder(cache_dir) == folder
    for name, data in original.items():
        assert open(os.path.join(folder, name), "rb").read() == data, name
    assert json.loads((out / "run_status.json").read_text())["state"] == "finished"

    # The rebuilt entry is trusted again: a hit, without a note.
    assert _prepare(qa_data_dir, tiny_model_dir, cache_dir) == 0
    captured = capsys.readouterr()
    assert "cache: hit" in captured.out and not _note_lines(captured.err)


def test_entry_without_checksums_is_rebuilt(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    """An entry of an older format (no checksums in meta.json) is never trusted."""
    cache_dir = tmp_path / "cB"
    assert _prepare(qa_data_dir, tiny_model_dir, cache_dir) == 0
    folder = _entry_folder(cache_dir)
    meta_path = os.path.join(folder, "meta.json")
    meta = json.loads(open(meta_path, encoding="utf-8").read())
    del meta["checksums"]
    with open(meta_path, "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
    key = os.path.basename(folder)
    assert cache.load_entry(str(cache_dir), key) is None
    capsys.readouterr()
    assert _prepare(qa_data_dir, tiny_model_dir, cache_dir) == 0
    assert "cache: built" in capsys.readouterr().out
    assert cache.load_entry(str(cache_dir), key) is not None


ROWS = [{"prompt": f"Reverse the word {w}.", "answer": w[::-1]} for w in
        ("apple", "river", "stone", "cloud", "light", "train", "green", "paper")]


def test_datasets_folder_change_at_same_size_and_mtime_is_a_miss(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "dd"
    folder.mkdir()
    data = folder / "data.jsonl"  # not train.json: this folder is read through datasets.load_dataset
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (folder / ".notes").write_text("hidden files are not data")
    cache_dir = tmp_path / "cM"
    assert _prepare(str(folder), tiny_model_dir, cache_dir) == 0
    assert "cache: built" in capsys.readouterr().out
    stat = os.stat(data)
    changed = data.read_text(encoding="utf-8").replace("Reverse", "REVERSE")
    data.write_text(changed, encoding="utf-8")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(data).st_size == stat.st_size and os.stat(data).st_mtime_ns == stat.st_mtime_ns

    (folder / ".notes").write_text("a hidden file changes nothing")
    assert _prepare(str(folder), tiny_model_dir, cache_dir, out=tmp_path / "r1") == 0
    assert "cache: built" in capsys.readouterr().out
    # The right rows: the same samples as a fresh cache built from the changed file.
    fresh_dir = tmp_path / "fresh"
    assert _prepare(str(folder), tiny_model_dir, fresh_dir, out=tmp_path / "r2") == 0
    key = json.loads((tmp_path / "r1" / "data_report.json").read_text())["cache"]["key"]
    assert json.loads((tmp_path / "r2" / "data_report.json").read_text())["cache"]["key"] == key
    assert cache.load_entry(str(cache_dir), key).train == cache.load_entry(str(fresh_dir), key).train
    assert len([n for n in os.listdir(cache_dir) if not n.startswith(".")]) == 2  # old entry + new entry

    # A change to a hidden file alone is not a data change: a hit.
    (folder / ".notes").write_text("edited again")
    assert _prepare(str(folder), tiny_model_dir, cache_dir) == 0
    assert "cache: hit" in capsys.readouterr().out


def test_saved_dataset_arrow_changed_in_place_changes_the_key(tmp_path):
    from datasets import Dataset

    from easysft.data.sources import source_fingerprint

    saved = tmp_path / "saved"
    Dataset.from_list([{"prompt": "p", "answer": "answer-one"}]).save_to_disk(str(saved))
    before = source_fingerprint(str(saved))
    (arrow,) = [p for p in saved.iterdir() if p.suffix == ".arrow"]
    stat = os.stat(arrow)
    raw = arrow.read_bytes()
    assert raw.count(b"answer-one") == 1
    arrow.write_bytes(raw.replace(b"answer-one", b"answer-two"))  # state.json (its fingerprint) is unchanged
    os.utime(arrow, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source_fingerprint(str(saved)) != before
