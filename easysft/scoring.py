"""Generation metrics: predictions against references, built-in scores and a user's own metric function.

Built-in (always computed; nothing is downloaded at run time):

- ``exact_match``: fraction of predictions equal to their reference after whitespace normalisation (runs of
  whitespace -> one space, ends stripped); case and punctuation count;
- ``rouge_l``: mean ROUGE-L F1 (``rouge-score``), on lower-cased whitespace tokens, so any script scores (the
  package's default tokenizer drops everything but ``[a-z0-9]``); fraction 0..1;
- ``chrf``: corpus chrF (``sacrebleu``), 0..100;
- ``bleu``: corpus BLEU (``sacrebleu``, its default 13a tokenizer), 0..100.

A user metric (``--eval_metric path/to/file.py:function`` or ``package.module:function``) is called as
``function(predictions, references, prompts)`` and returns ``{name: float}``; its names are logged as
``eval_<name>``. :func:`load_user_metric` imports it and calls it once on a dry sample, so a broken metric fails
before training starts, as one line naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import re
from collections.abc import Callable
from pathlib import Path

from easysft.config.values import finite_number
from easysft.errors import ConfigError

BUILTIN_METRICS = ("exact_match", "rouge_l", "chrf", "bleu")
# Metrics where a smaller value is better; every other metric (generation scores, user metrics) is "higher wins".
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "nll", "kl")

UserMetric = Callable[[list[str], list[str], list[str]], dict]


def normalise(text: str) -> str:
    """Whitespace-normalised text: ``"  a \\n b "`` -> ``"a b"``."""
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not predictions:
        return float("nan")
    hits = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


class _WhitespaceTokenizer:
    """rouge-score tokenizer protocol: lower-cased whitespace tokens (keeps non-Latin scripts)."""

    def tokenize(self, text: str) -> list[str]:
        return text.lower().split()


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 over the pairs (0 for a pair where either side is empty, 1 when both are)."""
    if not predictions:
        return float("nan")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    total = 0.0
    for prediction, reference in zip(predictions, references, strict=True):
        if not prediction.split() and not reference.split():
            total += 1.0
        else:
            total += scorer.score(reference, prediction)["rougeL"].fmeasure
    return total / len(predictions)


def chrf(predictions: list[str], references: list[str]) -> float:
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(predictions, [references]).score) if predictions else float("nan")


def bleu(predictions: list[str], references: list[str]) -> float:
    from sacrebleu.metrics import BLEU

    return float(BLEU().corpus_score(predictions, [references]).score) if predictions else float("nan")


def score(predictions: list[str], references: list[str], prompts: list[str],
          user_metric: UserMetric | None = None, user_metric_name: str = "--eval_metric") -> dict[str, float]:
    """Every built-in metric, plus the user metric's values; keys without the ``eval_`` prefix."""
    if len(predictions) != len(references) or len(predictions) != len(prompts):
        raise ValueError("predictions, references and prompts must have the same length")
    result = {"exact_match": exact_match(predictions, references), "rouge_l": rouge_l(predictions, references),
              "chrf": chrf(predictions, references), "bleu": bleu(predictions, references)}
    if user_metric is not None:
        result.update(call_user_metric(user_metric, predictions, references, prompts, user_metric_name))
    return result


def call_user_metric(function: UserMetric, predictions: list[str], references: list[str], prompts: list[str],
                     name: str) -> dict[str, float]:
    """``function(...)``, checked: a dict of metric names to numbers; any failure is one ConfigError line."""
    try:
        values = function(list(predictions), list(references), list(prompts))
    except Exception as exc:  # the user's code: any failure becomes one line naming it
        raise ConfigError(f"--eval_metric {name} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"--eval_metric {name} must return a non-empty dict {{name: float}}, got {values!r:.80}.")
    checked = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key.replace("_", "").isalnum():
            raise ConfigError(f"--eval_metric {name} returned the name {key!r}; use letters, digits and '_'.")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
            raise ConfigError(f"--eval_metric {name} returned {key}={value!r:.40}; each value must be a number.")
        # The config values' own check: NaN or inf would be logged as non-JSON and could never rank an eval.
        checked[key] = finite_number(f"--eval_metric {name}: the value of {key!r}", value)
    return checked


def load_user_metric(spec: str) -> UserMetric:
    """Import ``path/to/file.py:function`` or ``module:function`` and check it on a dry sample (one line on error)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"--eval_metric {spec}: expected 'path/to/file.py:function' or 'module:function'.")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise ConfigError(f"--eval_metric {spec}: no such file {path}.")
            module_spec = importlib.util.spec_from_file_location(f"easysft_user_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:  # syntax errors, missing imports inside the user's file...
        raise ConfigError(f"--eval_metric {spec}: cannot import {target}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"--eval_metric {spec}: {target} has no function {attr!r}.")
    call_user_metric(function, ["a dry run"], ["a dry run"], ["a prompt"], spec)  # fail now, not after training
    return function


def greater_is_better(metric: str) -> bool:
    """Direction of ``metric`` (``eval_loss`` -> False, ``eval_exact_match`` -> True, ``probe_kl`` -> False)."""
    name = metric.removeprefix("eval_").removeprefix("probe_")
    return name not in LOWER_IS_BETTER


def is_improvement(value: float, best: float | None, *, greater: bool, threshold: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``threshold`` (absolute) in the metric's direction; NaN never
    improves, and the first finite value always does."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + threshold if greater else value < best - threshold


# ------------------------------------------------------------------------------------------------------
# Tool calls

TOOL_CALL_METRICS = ("tool_call_name", "tool_call_exact")
_THINK_PREFIX = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def strip_reasoning(text: str) -> str:
    """``text`` without a leading ``<think>...</think>`` block (answers are scored without their reasoning)."""
    return _THINK_PREFIX.sub("", text, count=1)


def parse_tool_calls(text: str) -> list[dict]:
    """The tool calls written in generated ``text``, as ``[{"name", "arguments"}]`` in order.

    Template-independent: every JSON object in the text (alone, in a list, or inside tags such as
    ``<tool_call>...</tool_call>``) that has a string ``name`` and an object ``arguments`` (or ``parameters``, the
    Llama 3 spelling; arguments given as a JSON string are parsed) is a call. Text that is not JSON is ignored.
    """
    decoder = json.JSONDecoder()
    calls, position = [], 0
    while True:
        start = min((i for i in (text.find("{", position), text.find("[", position)) if i >= 0), default=-1)
        if start < 0:
            return calls
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            position = start + 1
            continue
        for item in value if isinstance(value, list) else [value]:
            call = _as_call(item)
            if call is not None:
                calls.append(call)
        position = end


def _as_call(item) -> dict | None:
    if not isinstance(item, dict):
        return None
    item = item.get("function", item) if isinstance(item.get("function"), dict) else item
    name, arguments = item.get("name"), item.get("arguments", item.get("parameters"))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return {"name": name, "arguments": arguments}


def tool_call_scores(predicted: list[list[dict]], references: list[list[dict]]) -> dict[str, float]:
    """Over turns whose reference is a tool call: ``tool_call_name`` = fraction whose predicted call names equal
    the reference's (in order), ``tool_call_exact`` = fraction whose names AND arguments are equal (as JSON
    values: key order and spacing do not matter)."""
    if not references:
        return {}
    names = sum([c["name"] for c in p] == [c["name"] for c in r] for p, r in zip(predicted, references, strict=True))
    exact = sum(p == r for p, r in zip(predicted, references, strict=True))
    return {"tool_call_name": names / len(references), "tool_call_exact": exact / len(references)}
