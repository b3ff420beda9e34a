"""The tokenized-data cache: hits, misses on every input change, atomic writes, and ranks waiting on rank 0."""

import json
import os
import threading
import time

import pytest

from easysft.config import DataConfig
from easysft.data import cache, pieces
from easysft.data.dataset import prepare_data
from easysft.errors import DataError


@pytest.fixture
def count_tokenize(monkeypatch):
    """Counts the rows prepare_data tokenizes (through the batched tokenize_examples)."""
    calls = {"n": 0}
    real = pieces.tokenize_examples

    def counting(tokenizer, rows, **kwargs):
        calls["n"] += len(rows)
        return real(tokenizer, rows, **kwargs)

    monkeypatch.setattr(pieces, "tokenize_examples", counting)
    return calls


def cfg(paths, **kw):
    return DataConfig(data_path=[paths] if isinstance(paths, str) else list(paths), **kw)


def test_second_run_is_a_hit_without_tokenization(tokenizer, qa_data_dir, count_tokenize):
    first = prepare_data(cfg(qa_data_dir), tokenizer)
    assert count_tokenize["n"] == 12 and first.report["cache"]["hit"] is False
    second = prepare_data(cfg(qa_data_dir), tokenizer)
    assert count_tokenize["n"] == 12, "a cache hit must not tokenize"
    assert second.report["cache"]["hit"] is True
    assert second.train == first.train and second.eval == first.eval
    strip = lambda r: {k: v for k, v in r.items() if k != "cache"}  # noqa: E731
    assert strip(second.report) == strip(first.report)
    assert second.report["cache"]["path"].startswith(os.environ["EASYSFT_DATA_CACHE"])


@pytest.mark.parametrize(
    "change",
    [
        {"max_prompt_len": 64},
        {"max_ans_len": 64},
        {"template": "chat"},
        {"template": "### Q:\n{prompt}\n### A:\n"},
        {"data_split": "5,5,0"},
        {"eval_fraction": 0.2},
        {"max_train_rows": 3},
        {"max_eval_rows": 2},
        {"multi_turn": True},
        {"strict": True},
    ],
)
def test_any_flag_change_is_a_miss(tokenizer, qa_data_dir, count_tokenize, change):
    prepare_data(cfg(qa_data_dir), tokenizer)
    before = count_tokenize["n"]
    changed = prepare_data(cfg(qa_data_dir, **change), tokenizer)
    assert changed.report["cache"]["hit"] is False and count_tokenize["n"] > before


def test_seed_and_debug_change_the_key(tokenizer, qa_data_dir):
    base = prepare_data(cfg(qa_data_dir), tokenizer).report["cache"]["key"]
    assert prepare_data(cfg(qa_data_dir), tokenizer, seed=1).report["cache"]["key"] != base
    assert prepare_data(cfg(qa_data_dir), tokenizer, debug=True).report["cache"]["key"] != base


def test_data_bytes_change_is_a_miss(tokenizer, qa_data_dir):
    first = prepare_data(cfg(qa_data_dir), tokenizer)
    path = os.path.join(qa_data_dir, "train.json")
    rows = json.load(open(path, encoding="utf-8"))
    rows[0]["answer"] = "changed"
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    second = prepare_data(cfg(qa_data_dir), tokenizer)
    assert second.report["cache"]["key"] != first.report["cache"]["key"]
    assert second.report["cache"]["hit"] is False


def test_tokenizer_change_is_a_miss(tokenizer, qa_data_dir):
    import copy

    first = prepare_data(cfg(qa_data_dir), tokenizer)
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ 'changed' }}"
    assert cache.tokenizer_fingerprint(other) != cache.tokenizer_fingerprint(tokenizer)
    assert prepare_data(cfg(qa_data_dir), other).report["cache"]["key"] != first.report["cache"]["key"]


def test_saved_dataset_fingerprint_changes_with_content(tmp_path):
    from datasets import Dataset

    from easysft.data.sources import source_fingerprint

    Dataset.from_list([{"prompt": "a", "answer": "b"}]).save_to_disk(str(tmp_path / "one"))
    Dataset.from_list([{"prompt": "a", "answer": "c"}]).save_to_disk(str(tmp_path / "two"))
    assert source_fingerprint(str(tmp_path / "one")) == source_fingerprint(str(tmp_path / "one"))
    assert source_fingerprint(str(tmp_path / "one")) != source_fingerprint(str(tmp_path / "two"))


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("EASYSFT_DATA_CACHE", str(tmp_path / "env"))
    assert cache.cache_root(str(tmp_path / "flag")) == str(tmp_path / "flag")  # the flag wins
    assert cache.cache_root(None) == str(tmp_path / "env")
    monkeypatch.delenv("EASYSFT_DATA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root(None) == str(tmp_path / "home" / ".cache" / "easysft" / "data")


def test_cache_dir_flag_is_used(tokenizer, qa_data_dir, tmp_path):
    data = prepare_data(cfg(qa_data_dir, cache_dir=str(tmp_path / "mine")), tokenizer)
    assert data.report["cache"]["path"].startswith(str(tmp_path / "mine"))


def test_crash_during_write_leaves_no_loadable_entry(tokenizer, qa_data_dir, monkeypatch, count_tokenize):
    from easysft.data.samples import SplitWriter

    real = SplitWriter.append

    def crash_on_eval(self, ids, mask, lengths):
        if self._ids.name.endswith("eval_ids.bin") and len(lengths):
            raise KeyboardInterrupt  # as if the process died half way
        real(self, ids, mask, lengths)

    monkeypatch.setattr(SplitWriter, "append", crash_on_eval)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg(qa_data_dir), tokenizer)
    root = os.environ["EASYSFT_DATA_CACHE"]
    assert os.listdir(root) == []  # neither an entry nor a temp folder is left
    monkeypatch.setattr(SplitWriter, "append", real)
    again = prepare_data(cfg(qa_data_dir), tokenizer)
    assert again.report["cache"]["hit"] is False and len(again.train) == 8


def test_corrupt_entry_is_rebuilt(tokenizer, qa_data_dir):
    first = prepare_data(cfg(qa_data_dir), tokenizer)
    os.remove(os.path.join(first.report["cache"]["path"], "train_ids.bin"))
    second = prepare_data(cfg(qa_data_dir), tokenizer)
    assert second.report["cache"]["hit"] is False and second.train == first.train
    assert prepare_data(cfg(qa_data_dir), tokenizer).report["cache"]["hit"] is True


def test_stored_samples_round_trip_exactly(tmp_path):
    train = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [9], "labels": [9]}]
    evals = []
    cache.save_entry(str(tmp_path), "k", train, evals, {"x": 1}, {})
    entry = cache.load_entry(str(tmp_path), "k")
    assert entry.train == train and entry.eval == [] and entry.report == {"x": 1}
    assert cache.load_entry(str(tmp_path), "other") is None


# ---------------------------------------------------------------------------------------------- ranks

def test_non_main_rank_loads_the_entry_and_never_tokenizes(tokenizer, qa_data_dir, monkeypatch):
    main = prepare_data(cfg(qa_data_dir), tokenizer)

    def forbidden(*args, **kwargs):
        raise AssertionError("a non-main rank must not tokenize")

    monkeypatch.setattr(pieces, "tokenize_examples", forbidden)
    other = prepare_data(cfg(qa_data_dir), tokenizer, is_main=False, wait_timeout_s=5)
    assert other.train == main.train and other.eval == main.eval


def test_waiter_polls_until_the_entry_appears(tmp_path):
    samples = [{"input_ids": [5, 6], "labels": [-100, 6]}]
    writer = threading.Timer(0.3, cache.save_entry, args=(str(tmp_path), "key1", samples, [], {}, {}))
    writer.start()
    started = time.time()
    entry = cache.wait_for_entry(str(tmp_path), "key1", timeout_s=10, poll_s=0.05)
    writer.join()
    assert entry.train == samples and time.time() - started >= 0.25


def test_waiter_times_out_with_a_clear_message(tmp_path):
    with pytest.raises(DataError) as info:
        cache.wait_for_entry(str(tmp_path), "never", timeout_s=0.1, poll_s=0.02)
    message = str(info.value)
    assert message.startswith("waited 0 s for the main rank") and "shared --cache_dir" in message
    assert "EASYSFT_DATA_WAIT_S" in message


def test_waiter_fails_fast_when_the_main_rank_failed(tokenizer, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": None}]))
    with pytest.raises(DataError, match="no training sample left"):
        prepare_data(cfg(str(path), eval_fraction=0.0), tokenizer)
    started = time.time()
    with pytest.raises(DataError, match="the main rank failed to prepare the data: .*no training sample left"):
        prepare_data(cfg(str(path), eval_fraction=0.0), tokenizer, is_main=False, wait_timeout_s=60)
    assert time.time() - started < 10


def test_successful_build_clears_an_old_failure_note(tmp_path):
    cache.write_failure(str(tmp_path), "k", "boom")
    cache.save_entry(str(tmp_path), "k", [{"input_ids": [1], "labels": [1]}], [], {}, {})
    assert not os.path.exists(tmp_path / "k.failed")


def test_supervised_counts_read_in_blocks_equal_counting_the_labels(tmp_path):
    """SampleView.supervised_counts reads the mask file in blocks (bounded memory on a million-sample split): any
    block size, including one smaller than a sample, gives the count of non -100 labels of every sample."""
    import random

    from easysft.data.samples import SampleView, supervised_counts

    rng = random.Random(0)
    train = []
    for _ in range(40):
        n = rng.randint(1, 30)
        train.append({"input_ids": list(range(n)), "labels": [t if rng.random() < 0.4 else -100 for t in range(n)]})
    cache.save_entry(str(tmp_path), "k", train, [], {}, {})
    view = cache.load_entry(str(tmp_path), "k").train
    assert isinstance(view, SampleView)
    expected = [sum(label != -100 for label in s["labels"]) for s in train]
    for block in (1, 7, 64, 1 << 22):
        assert view.supervised_counts(block_tokens=block).tolist() == expected
    assert list(supervised_counts(train)) == expected
    assert SampleView.from_samples(train).supervised_counts().tolist() == expected
