"""Metrics sinks on rank 0: metrics.jsonl (one JSON object per line), TensorBoard events, and loss.png.

Records are plain dicts. Training records carry ``step, epoch, loss, lr, grad_norm, num_tokens, tokens_per_s``;
evaluation records carry ``step, eval_loss, eval_ppl, eval_num_tokens`` (and, with ``--eval_generate``,
``eval_exact_match, eval_rouge_l, eval_chrf, eval_bleu, eval_<user metric>``; with ``--probe_data``,
``probe_nll, probe_kl``: drawn in a second panel of loss.png). Other ranks get a logger with
``enabled=False`` whose methods do nothing, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from easysft.distributed import barrier
from easysft.files import atomic_open, write_text_atomic


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # append: a resumed run continues the file
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a trimmed install should still train
                self._tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> bool:
    """Training and eval loss against step into ``png_path``; False when there is nothing to draw."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return False
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = extra_eval_series(records)
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(13 if extra else 7, 4), squeeze=False)
    ax = axes[0][0]
    if extra:  # generation scores and probe values: their own panel (different scales from the loss)
        right = axes[0][1]
        for name, points in extra.items():
            right.plot(*zip(*points, strict=True), "o-", label=name)
        right.set_xlabel("optimizer step")
        right.set_ylabel("eval metric")
        right.legend(fontsize="small")
        right.grid(alpha=0.3)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(png_path, "wb") as handle:
        fig.savefig(handle, dpi=100, format="png")
    plt.close(fig)
    return True


# Eval record fields that are bookkeeping or already drawn in the loss panel.
_NOT_PLOTTED = {"step", "epoch", "eval_loss", "eval_ppl", "eval_num_tokens"}


def extra_eval_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per-step series of the eval records' other numeric fields (``eval_exact_match``, ``probe_kl``, ...)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if "eval_loss" not in record:
            continue
        for key, value in record.items():
            if key not in _NOT_PLOTTED and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def rewind_metrics(output_dir: str | Path, step: int, dist) -> tuple[list[float], list[dict]]:
    """Drop metrics.jsonl records after ``step`` (rank 0), so the resumed curve continues the saved one; return
    (per-step losses, eval records) up to ``step``. A torn last line (a kill mid-write) is dropped too."""
    path = Path(output_dir) / "metrics.jsonl"
    if dist.is_main and path.is_file():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(path, "".join(k + "\n" for k in kept))
    barrier()
    if not path.is_file():
        return [], []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
    return losses, [r for r in records if "eval_loss" in r]

