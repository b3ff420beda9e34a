"""Generation metrics on hand-made predictions, the best-model direction, and loading a user metric."""

from __future__ import annotations

import pytest

from easysft.errors import ConfigError
from easysft.scoring import (
    bleu,
    chrf,
    exact_match,
    greater_is_better,
    is_improvement,
    load_user_metric,
    rouge_l,
    score,
)


def test_exact_match_normalises_whitespace_only():
    refs = ["stone river apple", "Paris", "a b"]
    assert exact_match(["  stone  river\napple ", "Paris", "a b"], refs) == 1.0
    assert exact_match(["stone river apple", "paris", "a  b."], refs) == pytest.approx(1 / 3)  # case, punctuation


def test_rouge_l_f1_by_hand():
    # LCS("a b d", "a b c d") = 3: precision 3/3, recall 3/4, F1 = 2 * 1 * 0.75 / 1.75
    assert rouge_l(["a b d"], ["a b c d"]) == pytest.approx(2 * 0.75 / 1.75)
    assert rouge_l(["x y"], ["a b"]) == 0.0
    assert rouge_l(["Stone river"], ["stone RIVER"]) == 1.0  # lower-cased tokens
    assert rouge_l(["猫 犬"], ["猫 鳥"]) == pytest.approx(0.5)  # non-Latin words count (whitespace tokens)
    assert rouge_l(["a b d", "x"], ["a b c d", "x"]) == pytest.approx((2 * 0.75 / 1.75 + 1) / 2)  # mean of pairs


def test_chrf_and_bleu_bounds_and_order():
    refs = ["the cat sat on the mat today", "a quick brown fox jumps"]
    assert chrf(refs, refs) == pytest.approx(100.0)
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["zzz qqq", "vvv www"], refs) == pytest.approx(0.0)
    close = ["the cat sat on a mat today", "a quick brown fox jumped"]
    assert 0 < chrf(close, refs) < 100 and 0 < bleu(close, refs) < 100
    assert chrf(close, refs) > chrf(["dog", "slow"], refs)


def test_score_adds_user_metric_and_checks_lengths():
    got = score(["a"], ["a"], ["p"], lambda p, r, q: {"mine": 0.25})
    assert got["exact_match"] == 1.0 and got["mine"] == 0.25 and set(got) >= {"rouge_l", "chrf", "bleu"}
    with pytest.raises(ValueError):
        score(["a"], ["a", "b"], ["p"])


def test_direction_and_improvement():
    assert not greater_is_better("eval_loss") and not greater_is_better("probe_kl")
    assert greater_is_better("eval_exact_match") and greater_is_better("eval_my_score")
    assert is_improvement(0.5, None, greater=True)
    assert is_improvement(0.5, 0.4, greater=True) and not is_improvement(0.45, 0.4, greater=True, threshold=0.1)
    assert is_improvement(1.0, 2.0, greater=False) and not is_improvement(float("nan"), 2.0, greater=False)


def test_user_metric_from_file_and_module(tmp_path, monkeypatch):
    path = tmp_path / "my_metric.py"
    path.write_text("def f(predictions, references, prompts):\n"
                    "    return {'long': sum(len(p) > 3 for p in predictions) / len(predictions)}\n")
    function = load_user_metric(f"{path}:f")
    assert function(["abcd", "a"], ["", ""], ["", ""]) == {"long": 0.5}
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_user_metric("my_metric:f")(["abcd"], [""], [""]) == {"long": 1.0}


@pytest.mark.parametrize("body, message", [
    ("def f(p, r, q):\n    return 1 / 0\n", "ZeroDivisionError"),
    ("def f(p, r, q):\n    return [0.5]\n", "must return a non-empty dict"),
    ("def f(p, r, q):\n    return {'x': 'high'}\n", "each value must be a number"),
    ("def g(p, r, q):\n    return {'x': 1}\n", "has no function 'f'"),
    ("def f(p, r, q)\n", "SyntaxError"),
])
def test_broken_user_metric_is_one_line_naming_it(tmp_path, body, message):
    path = tmp_path / "bad.py"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_user_metric(f"{path}:f")
    text = str(info.value)
    assert message in text and f"{path}:f" in text and "\n" not in text
    with pytest.raises(ConfigError, match="expected 'path/to/file.py:function'"):
        load_user_metric("no_colon")
    with pytest.raises(ConfigError, match="no such file"):
        load_user_metric(f"{tmp_path}/missing.py:f")


def test_selection_threshold_direction_and_patience():
    from easysft.config import TrainConfig
    from easysft.training.selection import Selection

    cfg = TrainConfig(metric_for_best_model="scheduled", greater_is_better=False, early_stopping_patience=2,
                      early_stopping_threshold=0.1)
    selection = Selection.from_config(cfg)
    assert selection.metric == "eval_scheduled" and not selection.greater
    # lower is better: 0.5 beats 0.9; 0.45 and 0.42 are not better by more than 0.1 -> patience 2 spent
    stops = []
    for step, value in enumerate([0.9, 0.5, 0.45, 0.42, 0.1]):
        selection.update({"step": step, "eval_scheduled": value})
        stops.append(selection.should_stop)
    assert stops == [False, False, False, True, False] and (selection.best_step, selection.best_value) == (4, 0.1)
    default = Selection.from_config(TrainConfig(load_best_model_at_end=True))
    assert default.metric == "eval_loss" and not default.greater and default.keep_best
    assert Selection.from_config(TrainConfig()) is None
    replayed = Selection.from_config(TrainConfig(metric_for_best_model="eval_exact_match"))
    replayed.replay([{"step": 0, "eval_exact_match": 0.2}, {"step": 5, "eval_exact_match": 0.6},
                     {"step": 9, "eval_exact_match": 0.4}], "/nonexistent")
    assert (replayed.best_step, replayed.evals_without_improvement, replayed.best_path) == (5, 1, None)


def test_score_turns_scores_the_predictions_against_the_references():
    """The generation eval's scoring step (easysft/generate/scored.py): metrics are score(predictions,
    references, prompts) and the rows carry each prediction beside its reference."""
    from types import SimpleNamespace

    from easysft.generate.scored import score_turns

    examples = [SimpleNamespace(prompt=f"q{k}", answer=answer, messages=None, reference_calls=None, context=None)
                for k, answer in enumerate(["stone river apple", "Paris", "the cat sat on the mat"])]
    predictions = ["stone river apple", "London", "a dog sat on the mat"]
    metrics, rows = score_turns(examples, predictions)
    assert metrics == score(predictions, [e.answer for e in examples], [e.prompt for e in examples])
    assert metrics["exact_match"] == pytest.approx(1 / 3) and metrics["bleu"] < 100 and metrics["chrf"] < 100
    assert rows == [{"prompt": e.prompt, "reference": e.answer, "prediction": p}
                    for e, p in zip(examples, predictions, strict=True)]
