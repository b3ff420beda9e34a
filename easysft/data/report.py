"""The data report: what was read, kept, skipped (by reason), truncated, and how long samples are.

:class:`SplitStats` accumulates one split of one source; :func:`build_report` assembles the JSON-ready dict
that ``prepare_data`` returns, the cache stores and ``easysft prepare`` prints (:func:`format_report`) and
writes (:func:`write_report`, ``data_report.json``).

Report shape (all counts are ints)::

    {"template": ..., "max_prompt_len": ..., "max_ans_len": ...,
     "train": STATS, "eval": STATS,
     "sources": [{"name": ..., "layout": ..., "eval_origin": ..., "train": STATS, "eval": STATS}, ...]}

    STATS = {"rows": rows read, "kept": samples kept, "skipped": {reason: count for every reason},
             "skipped_total": ..., "first_skipped": {reason: "file:line (detail)"},
             "truncated_prompts": ..., "truncated_answers": ...,
             "num_tokens": ..., "num_supervised_tokens": ..., "supervised_share": supervised / all tokens,
             "prompt_tokens" / "answer_tokens" / "sample_tokens": {"p50", "p90", "p99", "max"},
             "prompt_tokens_hist" / "answer_tokens_hist" / "sample_tokens_hist": {"edges", "counts"}}

Prompt and answer lengths are counted BEFORE truncation (so they show what ``--max_prompt_len`` and
``--max_ans_len`` cut); sample lengths AFTER it (what the model sees). With ``--multi_turn`` one row can make
several samples, so ``kept + skipped_total`` may exceed ``rows``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from easysft.data.chat_render import CONVERSATION_COUNTERS
from easysft.data.tokenize import SKIP_REASONS
from easysft.files import write_json_atomic

PERCENTILES = (50, 90, 99)


def percentiles(values) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and max (all 0 for no values): real lengths, never interpolated.

    ``values``: a list of lengths, or a :class:`collections.Counter` ``{length: count}`` (what the report keeps,
    so its memory grows with the number of DISTINCT lengths, not with the number of samples)."""
    histogram = values if isinstance(values, Counter) else Counter(values)
    total = sum(histogram.values())
    if not total:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = sorted(histogram.items())
    out = {}
    for p in PERCENTILES:
        rank, seen = max(1, math.ceil(p / 100 * total)), 0
        for length, count in ordered:
            seen += count
            if seen >= rank:
                out[f"p{p}"] = int(length)
                break
    out["max"] = int(ordered[-1][0])
    return out


def length_histogram(values, bins: int = 16) -> dict[str, list[int]]:
    """Counts of ``values`` (a list of lengths, or a Counter ``{length: count}``) in ``bins`` equal-width integer
    bins: ``{"edges": [b0, ..., bN], "counts": [...]}`` (bin i holds ``edges[i] <= v < edges[i+1]``; the last bin
    also holds the maximum). Empty input: no bins."""
    histogram = values if isinstance(values, Counter) else Counter(values)
    if not histogram:
        return {"edges": [], "counts": []}
    low, high = min(histogram), max(histogram)
    width = max(1, math.ceil((high - low + 1) / bins))
    edges = [low + i * width for i in range(math.ceil((high - low + 1) / width) + 1)]
    counts = [0] * (len(edges) - 1)
    for value, count in histogram.items():
        counts[min((value - low) // width, len(counts) - 1)] += count
    return {"edges": edges, "counts": counts}


def _histogram(values) -> Counter:
    lengths, counts = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
    return Counter(dict(zip(lengths.tolist(), counts.tolist(), strict=True)))


@dataclass
class SplitStats:
    """Counters for one split of one source (merge several with :meth:`merge`); bounded memory: lengths are
    kept as histograms."""

    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    first_skipped: dict[str, str] = field(default_factory=dict)
    truncated_prompts: int = 0
    truncated_answers: int = 0
    prompt_lens: Counter = field(default_factory=Counter)
    answer_lens: Counter = field(default_factory=Counter)
    sample_lens: Counter = field(default_factory=Counter)
    num_tokens: int = 0
    num_supervised_tokens: int = 0
    conversation: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CONVERSATION_COUNTERS, 0))

    def add_skip(self, reason: str, location: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.first_skipped.setdefault(reason, f"{location} ({detail})" if detail else location)

    def add_sample(self, sample: dict) -> None:
        """Count a tokenize_example() result (it carries the pre-truncation lengths)."""
        self.kept += 1
        self.prompt_lens[sample["num_prompt_tokens"]] += 1
        self.answer_lens[sample["num_answer_tokens"]] += 1
        self.sample_lens[len(sample["input_ids"])] += 1
        self.num_tokens += len(sample["input_ids"])
        self.truncated_prompts += bool(sample["prompt_truncated"])
        self.truncated_answers += bool(sample["answer_truncated"])
        self.num_supervised_tokens += sum(1 for label in sample["labels"] if label != -100)

    def add_piece(self, piece) -> None:
        """Count the samples of a :class:`easysft.data.pieces.Piece` (its skips are counted by the caller)."""
        self.rows += piece.num_records
        self.kept += len(piece.sample_lens)
        if not len(piece.sample_lens):
            return
        self.prompt_lens.update(_histogram(piece.prompt_lens))
        self.answer_lens.update(_histogram(piece.answer_lens))
        self.sample_lens.update(_histogram(piece.sample_lens))
        self.num_tokens += int(piece.sample_lens.sum())
        self.truncated_prompts += int(piece.prompt_truncated.sum())
        self.truncated_answers += int(piece.answer_truncated.sum())
        self.num_supervised_tokens += int(piece.mask.sum())
        for name, total in zip(CONVERSATION_COUNTERS, piece.conversation.sum(axis=0).tolist(), strict=True):
            self.conversation[name] += int(total)

    def merge(self, other: SplitStats) -> None:
        self.rows += other.rows
        self.kept += other.kept
        for reason, count in other.skipped.items():
            self.skipped[reason] += count
        for reason, where in other.first_skipped.items():
            self.first_skipped.setdefault(reason, where)
        self.truncated_prompts += other.truncated_prompts
        self.truncated_answers += other.truncated_answers
        self.prompt_lens.update(other.prompt_lens)
        self.answer_lens.update(other.answer_lens)
        self.sample_lens.update(other.sample_lens)
        self.num_tokens += other.num_tokens
        self.num_supervised_tokens += other.num_supervised_tokens
        for name, count in other.conversation.items():
            self.conversation[name] += count

    def to_dict(self) -> dict:
        num_tokens = self.num_tokens
        return {
            "rows": self.rows,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()),
            "first_skipped": dict(self.first_skipped),
            "truncated_prompts": self.truncated_prompts,
            "truncated_answers": self.truncated_answers,
            "num_tokens": num_tokens,
            "num_supervised_tokens": self.num_supervised_tokens,
            "supervised_share": round(self.num_supervised_tokens / num_tokens, 4) if num_tokens else 0.0,
            "prompt_tokens": percentiles(self.prompt_lens),
            "answer_tokens": percentiles(self.answer_lens),
            "sample_tokens": percentiles(self.sample_lens),
            "prompt_tokens_hist": length_histogram(self.prompt_lens),
            "answer_tokens_hist": length_histogram(self.answer_lens),
            "sample_tokens_hist": length_histogram(self.sample_lens),
            "conversation": dict(self.conversation),
        }


@dataclass
class SourceStats:
    name: str
    layout: str
    eval_origin: str
    train: SplitStats = field(default_factory=SplitStats)
    eval: SplitStats = field(default_factory=SplitStats)


def build_report(sources: list[SourceStats], *, template: str, max_prompt_len: int, max_ans_len: int) -> dict:
    totals = {"train": SplitStats(), "eval": SplitStats()}
    for source in sources:
        totals["train"].merge(source.train)
        totals["eval"].merge(source.eval)
    return {
        "template": template,
        "max_prompt_len": max_prompt_len,
        "max_ans_len": max_ans_len,
        "train": totals["train"].to_dict(),
        "eval": totals["eval"].to_dict(),
        "sources": [
            {"name": s.name, "layout": s.layout, "eval_origin": s.eval_origin,
             "train": s.train.to_dict(), "eval": s.eval.to_dict()}
            for s in sources
        ],
    }


def _skip_text(stats: dict) -> str:
    parts = [f"{reason} {count}" for reason, count in stats["skipped"].items() if count]
    return ", ".join(parts) if parts else "none"


def format_report(report: dict) -> str:
    """A compact, human-readable rendering of :func:`build_report`'s dict (for the console)."""
    lines = [
        f"data report: template {report['template']}, max_prompt_len {report['max_prompt_len']}, "
        f"max_ans_len {report['max_ans_len']}",
        f"  {'split':<6}{'rows':>9}{'kept':>9}{'skipped':>9}{'trunc.prompt':>14}{'trunc.answer':>14}"
        f"{'tokens':>11}{'supervised':>12}",
    ]
    for split in ("train", "eval"):
        s = report[split]
        lines.append(
            f"  {split:<6}{s['rows']:>9}{s['kept']:>9}{s['skipped_total']:>9}{s['truncated_prompts']:>14}"
            f"{s['truncated_answers']:>14}{s['num_tokens']:>11}{s['supervised_share']:>11.1%}"
        )
    lines.append(f"  {'token lengths':<22}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}")
    for split in ("train", "eval"):
        for part in ("prompt", "answer", "sample"):
            p = report[split][f"{part}_tokens"]
            lines.append(f"  {split + ' ' + part:<22}{p['p50']:>7}{p['p90']:>7}{p['p99']:>7}{p['max']:>7}")
    for split in ("train", "eval"):
        s = report[split]
        if s["skipped_total"]:
            lines.append(f"  skipped ({split}): {_skip_text(s)}")
            for reason, where in s["first_skipped"].items():
                lines.append(f"    first {reason}: {where}")
    for split in ("train", "eval"):
        c = report[split].get("conversation") or {}
        if c.get("turns_supervised"):
            lines.append(f"  conversations ({split}): {c['turns_supervised']} assistant turns supervised, "
                         f"{c['reasoning_tokens']} reasoning tokens supervised, {c['reasoning_lost_turns']} turns "
                         f"lost their reasoning to the template, {c['dropped_turns']} turns dropped to fit "
                         f"--max_seq_len, {report[split]['skipped'].get('too_long', 0)} too long")
    lines.append("  sources:")
    for source in report["sources"]:
        t, e = source["train"], source["eval"]
        lines.append(
            f"    {source['name']} [{source['layout']}]: train {t['kept']}/{t['rows']} kept, "
            f"eval {e['kept']}/{e['rows']} kept ({source['eval_origin']})"
        )
    if report.get("mixing"):
        from easysft.data.mixing import format_mixing

        lines += ["  " + line for line in format_mixing(report["mixing"])]
    cache = report.get("cache")
    if cache:
        lines.append(f"  cache: {'hit' if cache.get('hit') else 'built'} {cache.get('path')}")
    return "\n".join(lines)


def data_notices(report: dict) -> list[str]:
    """One console line per thing in ``report`` a user must hear about even when the run succeeds: rows skipped
    (e.g. a file mixing two layouts: the layout read from ALL columns fits only some rows), and no eval sample
    (training then runs without any evaluation)."""
    notices = []
    for split in ("train", "eval"):
        s = report[split]
        if s["skipped_total"]:
            layouts = ", ".join(sorted({src["layout"] for src in report["sources"]}))
            first = "; ".join(f"first {r}: {w}" for r, w in s["first_skipped"].items())
            notices.append(f"easysft: note: {s['skipped_total']} of {s['rows']} {split} rows skipped "
                           f"({_skip_text(s)}; layout {layouts}; {first}); see data_report.json.")
    mismatches = report["train"].get("conversation", {}).get("prefix_mismatches", 0)
    if mismatches:
        notices.append(f"easysft: warning: in {mismatches} assistant turn(s) the prompt inference builds is not a "
                       "token prefix of the training rendering (the chat template renders earlier turns "
                       "differently once later turns exist); see `easysft prepare --show` and --chat_template.")
    if report["eval"]["kept"] == 0:
        origins = "; ".join(src["eval_origin"] for src in report["sources"])
        notices.append(f"easysft: note: no eval sample ({origins}): no evaluation will run; add an eval.json "
                       "or more rows (a single file holds out --eval_fraction of its rows, at least 1 of 2+).")
    return notices


def write_report(report: dict, path: str) -> str:
    """Write ``report`` as JSON to ``path`` (a file, or a folder that gets ``data_report.json``); return the file."""
    if os.path.isdir(path) or path.endswith(os.sep):
        path = os.path.join(path, "data_report.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, report)
    return path
