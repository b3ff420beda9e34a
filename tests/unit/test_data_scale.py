"""Data at scale: chunked == one-shot caches, --num_proc byte-identical, memory-mapped samples, weighted mixing."""

import json
import os

import numpy as np
import pytest

from easysft.config import DataConfig
from easysft.data import build, pieces
from easysft.data.batching import plan_epoch, plan_packed_epoch
from easysft.data.dataset import prepare_data
from easysft.data.mixing import MixPlan
from easysft.data.samples import SampleView
from easysft.errors import ConfigError, DataError


def _rows(n, seed, tag):
    rng = np.random.default_rng(seed)
    words = "red green blue amber cedar river stone cloud maple quartz".split()
    return [{"prompt": f"{tag} " + " ".join(rng.choice(words, rng.integers(1, 30))),
             "answer": " ".join(rng.choice(words, rng.integers(1, 12)))} for _ in range(n)]


def jsonl_source(folder) -> str:
    """A 40-row JSONL file with a broken line, a blank line and an empty answer (also used by
    tests/integration/test_data_mixing_train.py)."""
    lines = [json.dumps(r) for r in _rows(40, 1, "jsonl")]
    lines[5] = "{not json"
    lines[9] = json.dumps({"prompt": "x", "answer": ""})
    lines.insert(12, "")
    jsonl = folder / "a.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(jsonl)


@pytest.fixture
def sources(tmp_path):
    """A JSONL file (with a broken line, a blank line, an empty answer), a parquet file and a saved dataset."""
    from datasets import Dataset

    jsonl = jsonl_source(tmp_path)
    parquet = tmp_path / "b.parquet"
    Dataset.from_list(_rows(30, 2, "parquet")).to_parquet(str(parquet))
    saved = tmp_path / "c"
    Dataset.from_list(_rows(25, 3, "saved")).save_to_disk(str(saved))
    return [jsonl, str(parquet), str(saved)]


def _entry(data, root):
    folder = data.report["cache"]["path"]
    files = {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
             if name.endswith(".bin") or name == "report.json"}
    return files


@pytest.mark.parametrize("extra", [{}, {"max_train_rows": 50, "max_eval_rows": 3, "data_split": "7,3,0"}])
def test_chunked_equals_one_shot_and_num_proc_2_is_byte_identical(tokenizer, sources, tmp_path, monkeypatch,
                                                                  extra):
    results = {}
    for name, chunk, num_proc in (("one-shot", 100_000, 1), ("chunked", 4, 1), ("two procs", 4, 2)):
        monkeypatch.setattr(pieces, "CHUNK_ROWS", chunk)
        cfg = DataConfig(data_path=sources, cache_dir=str(tmp_path / name), num_proc=num_proc, **extra)
        data = prepare_data(cfg, tokenizer)
        results[name] = (_entry(data, tmp_path / name), data)
    one_shot, data = results["one-shot"]
    assert results["chunked"][0] == one_shot
    assert results["two procs"][0] == one_shot
    report = data.report
    assert report["train"]["skipped"]["invalid_json_line"] == (1 if not extra else report["train"]["skipped"]
                                                                ["invalid_json_line"])
    assert [s["train"]["rows"] for s in report["sources"]][0] > 0
    if extra:
        assert report["train"]["rows"] == 50 and report["eval"]["rows"] == 3
    else:
        assert report["train"]["rows"] + report["eval"]["rows"] == 40 + 30 + 25  # the blank line is no row
    assert isinstance(data.train, SampleView) and len(data.train) == report["train"]["kept"]


def test_report_percentiles_are_exact_from_histograms(tokenizer, sources, tmp_path):
    from easysft.data.report import percentiles

    data = prepare_data(DataConfig(data_path=sources, cache_dir=str(tmp_path / "c")), tokenizer)
    lengths = data.train.lengths.tolist()
    assert data.report["train"]["sample_tokens"] == percentiles(lengths)
    assert data.report["train"]["num_tokens"] == sum(lengths)
    assert percentiles([3, 1, 2, 2]) == {"p50": 2, "p90": 3, "p99": 3, "max": 3}


def test_strict_error_is_the_same_chunked(tokenizer, sources, tmp_path, monkeypatch):
    messages = []
    for chunk in (100_000, 3):
        monkeypatch.setattr(pieces, "CHUNK_ROWS", chunk)
        with pytest.raises(DataError) as info:
            prepare_data(DataConfig(data_path=sources, strict=True, cache_dir=str(tmp_path / str(chunk))),
                         tokenizer)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "a.jsonl:6: invalid_json_line" in messages[0]


def test_progress_bar_on_stderr_for_long_preparations(tokenizer, sources, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "PROGRESS_MIN_ROWS", 1)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    prepare_data(DataConfig(data_path=sources, cache_dir=str(tmp_path / "c")), tokenizer)
    err = capsys.readouterr().err
    assert "tokenizing" in err and "rows" in err


# ------------------------------------------------------------------------------------------------ memory maps

def test_sample_view_behaves_like_the_list_it_replaced(tmp_path):
    from easysft.data import cache

    samples = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [9], "labels": [9]},
               {"input_ids": [5, 6], "labels": [-100, 6]}]
    cache.save_entry(str(tmp_path), "k", samples, [], {}, {})
    view = cache.load_entry(str(tmp_path), "k").train
    assert isinstance(view._ids, np.memmap)
    assert len(view) == 3 and view[0] == samples[0] and view[-1] == samples[2] and view[1:] == samples[1:]
    assert list(view) == samples and view == samples and view == SampleView.from_samples(samples)
    assert view.lengths.tolist() == [4, 1, 2] and bool(view) and not cache.load_entry(str(tmp_path), "k").eval
    with pytest.raises(IndexError):
        view[3]


def test_training_plans_and_eval_read_views_like_lists(tokenizer, qa_data_dir, tiny_model):
    from easysft.data.batching import materialise
    from easysft.evaluation import evaluate

    data = prepare_data(DataConfig(data_path=[qa_data_dir]), tokenizer)
    as_list = list(data.train)
    assert materialise([2, None, 0], data.train) == materialise([2, None, 0], as_list)
    lengths = data.train.lengths
    plan = plan_epoch(len(data.train), micro_batch_size=3, seed=1, epoch=0, lengths=lengths)
    assert plan == plan_epoch(len(as_list), micro_batch_size=3, seed=1, epoch=0,
                              lengths=[len(s["input_ids"]) for s in as_list])
    assert plan_packed_epoch(lengths, max_tokens=64, seed=1, epoch=0).batches
    view_eval = evaluate(tiny_model, data.eval, batch_size=2, pad_token_id=tokenizer.pad_token_id)
    list_eval = evaluate(tiny_model, list(data.eval), batch_size=2, pad_token_id=tokenizer.pad_token_id)
    assert view_eval == list_eval


# ------------------------------------------------------------------------------------------------ mixing

def _plan(sizes, weights, mode):
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return MixPlan(tuple(f"s{k}" for k in range(len(sizes))), tuple(zip(starts[:-1], starts[1:], strict=True)),
                   tuple(w / sum(weights) for w in weights), mode)


@pytest.mark.parametrize("mode", ["downsample", "upsample"])
def test_mixing_proportions_repetition_and_determinism(mode):
    plan = _plan([3000, 500, 1200], [0.5, 0.3, 0.2], mode)
    population = plan.population(seed=7, epoch=0)
    source = np.searchsorted([3000, 3500, 4700], population, side="right")
    shares = np.bincount(source, minlength=3) / len(population)
    assert np.all(np.abs(shares - [0.5, 0.3, 0.2]) <= 0.01)
    counts = np.bincount(population, minlength=4700)
    assert len(population) == sum(plan.counts())
    if mode == "downsample":
        assert counts.max() == 1  # no sample twice in an epoch
        assert counts[3000:3500].min() == 1  # the limiting source is used whole
        # the larger sources give a different seeded subset every epoch
        assert not np.array_equal(population, plan.population(seed=7, epoch=1))
    else:
        assert counts.min() >= 1 and counts.max() - counts[3000:3500].min() <= 1  # every sample, even repeats
    assert np.array_equal(population, plan.population(seed=7, epoch=0))


def test_mixed_epoch_is_the_same_on_one_and_two_ranks():
    plan = _plan([300, 50], [0.7, 0.3], "upsample")
    population = plan.population(seed=3, epoch=2)
    kwargs = dict(seed=3, epoch=2, population=population)
    one = plan_epoch(350, micro_batch_size=4, **kwargs).batches
    ranks = [plan_epoch(350, micro_batch_size=2, rank=r, world_size=2, **kwargs).batches for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for step, batch in enumerate(one):
        assert sorted(batch) == sorted(i for r in ranks for i in r[step] if i is not None)
    assert sorted(i for b in one for i in b) == sorted(population.tolist())


def test_data_weights_in_report_and_start_up_lines(tokenizer, sources, tmp_path):
    from easysft.data.report import format_report

    cfg = DataConfig(data_path=sources[:2], data_weights=[0.25, 0.75], mixing="upsample",
                     cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, tokenizer)
    mixing = data.report["mixing"]
    kept = [s["train"]["kept"] for s in data.report["sources"]]
    assert [s["kept"] for s in mixing["sources"]] == kept and mixing["mode"] == "upsample"
    assert abs(mixing["sources"][1]["share"] - 0.75) <= 0.01 and data.mixing.counts()[0] == kept[0]
    assert "data mixing (upsample)" in format_report(data.report)
    # Weights only decide the epoch plan: the cache entry is shared with the unweighted run.
    plain = prepare_data(DataConfig(data_path=sources[:2], cache_dir=str(tmp_path / "c")), tokenizer)
    assert plain.report["cache"]["hit"] and plain.mixing is None


@pytest.mark.parametrize("weights, message", [
    ([0.0, 1.0], "--data_weights 0: every weight must be a positive number"),
    ([-1.0, 1.0], "--data_weights -1: every weight must be a positive number"),
    ([1.0], "--data_weights has 1 value(s) for 2 --data_path source(s)"),
    (["a", "b"], "--data_weights a b: give numbers"),
])
def test_bad_weights_are_one_line_config_errors(weights, message):
    with pytest.raises(ConfigError) as info:
        DataConfig(data_path=["a.jsonl", "b.jsonl"], data_weights=weights)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_bad_mixing_and_num_proc_flags(tiny_model_dir, qa_data_dir, capsys):
    from easysft.cli import main

    assert main(["prepare", "--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir,
                 "--data_weights", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("easysft: error: --data_weights 0:") and "\n" not in err
    with pytest.raises(ConfigError, match="--mixing must be"):
        DataConfig(data_path=["a"], mixing="sometimes")
    with pytest.raises(ConfigError, match="--num_proc must be at least 1"):
        DataConfig(data_path=["a"], num_proc=0)


# ------------------------------------------------------------------------------------------------ --num_proc workers

def test_num_proc_2_tokenizes_in_forked_worker_processes(tokenizer, sources, tmp_path, monkeypatch):
    """With --num_proc 2 the chunks are tokenized in other processes than this one (each call of the split
    tokenizer appends its pid to a file; workers are forked after the spy is installed, so they run it); with
    --num_proc 1 every chunk is tokenized here."""
    log = tmp_path / "pids.txt"
    real = pieces._tokenize_split

    def spy(records, layout, ctx):
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        return real(records, layout, ctx)

    monkeypatch.setattr(pieces, "_tokenize_split", spy)
    monkeypatch.setattr(pieces, "CHUNK_ROWS", 4)  # ~25 tasks
    pids = {}
    for num_proc in (2, 1):
        log.write_text("")
        prepare_data(DataConfig(data_path=sources, cache_dir=str(tmp_path / f"np{num_proc}"), num_proc=num_proc),
                     tokenizer)
        pids[num_proc] = [int(line) for line in log.read_text().split()]
    assert pids[1] and set(pids[1]) == {os.getpid()}
    assert len(pids[2]) == len(pids[1])  # the same tasks (2 splits per chunk) ...
    assert os.getpid() not in pids[2]  # ... none tokenized in this process, all in forked workers


class _StubPool:
    """``apply_async`` stand-in: records how many tasks are submitted and not yet collected."""

    def __init__(self):
        self.in_flight = self.most_in_flight = 0
        self.submitted: list = []

    def apply_async(self, fn, args):
        self.submitted.append(args[0])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        pool = self

        class Handle:
            def get(self):
                pool.in_flight -= 1
                return fn(*args)

        return Handle()


@pytest.mark.parametrize("window", [1, 2, 4])
def test_ordered_results_keeps_at_most_window_tasks_in_flight(window):
    pool = _StubPool()
    read = []

    def tasks():
        for k in range(20):
            read.append(k)
            yield k

    results = pieces.ordered_results(pool, lambda k: k * 10, tasks(), window=window)
    first = next(results)
    assert first == 0 and len(read) <= window  # the task iterable is not read ahead beyond the window
    rest = list(results)
    assert [first, *rest] == [k * 10 for k in range(20)]  # task order
    assert pool.submitted == list(range(20)) and pool.in_flight == 0
    assert pool.most_in_flight == window


def test_runner_with_two_processes_reads_tasks_within_its_window():
    """The real pool: results in task order, and no more than 2 * num_proc tasks read but not yet returned."""
    read = []

    def tasks():
        for k in range(30):
            read.append(k)
            yield -k

    with pieces.Runner(2) as runner:
        assert runner._pool is not None
        results = []
        for value in runner.map(abs, tasks()):
            results.append(value)
            assert len(read) - len(results) <= 4 - 1  # at most 4 submitted; one of them just returned
    assert results == list(range(30))
