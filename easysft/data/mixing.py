"""Weighted mixing of ``--data_path`` sources: which training samples make up each epoch.

Without ``--data_weights`` an epoch is every training sample once (sources concatenated). With weights
``w_1..w_k`` (normalised to sum 1) over sources holding ``n_1..n_k`` samples, the epoch holds ``c_i`` samples of
source ``i``, with ``c_i / sum(c) = w_i`` up to rounding:

- ``downsample`` (no repetition): the epoch is as large as the weights allow without repeating a sample,
  ``N = min(n_i / w_i)``, ``c_i = min(n_i, round(w_i * N))``; a source with more samples than its share gives a
  different seeded subset every epoch, so several epochs cover it.
- ``upsample`` (repetition): the epoch is as large as needed to use every sample of every source,
  ``N = max(n_i / w_i)``, ``c_i = max(n_i, round(w_i * N))``; a source repeats ``c_i // n_i`` times in full,
  plus a seeded subset of ``c_i % n_i`` samples (so no sample repeats twice more than another).

The draw depends only on ``(seed, epoch, source)``, never on the rank or the world size: every rank computes
the same population, and :func:`easysft.data.batching.plan_epoch` shuffles and shards it as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from easysft.errors import DataError

MODES = ("downsample", "upsample")
# Most samples one epoch may hold: its sample list (8 bytes each, plus the shuffled copy) must fit in memory. An
# upsampled epoch this large means weights thousands of times apart, almost always a typo (1e-12 for 1e-2).
MAX_EPOCH_SAMPLES = 100_000_000


@dataclass(frozen=True)
class MixPlan:
    """Sources (``names``), their contiguous sample ranges in the training samples, and normalised weights."""

    names: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]
    mode: str = "downsample"

    @classmethod
    def from_report(cls, report: dict, weights, mode: str) -> MixPlan:
        """Ranges from the data report's per-source kept counts (samples are stored in ``--data_path`` order)."""
        if mode not in MODES:
            raise ValueError(f"mixing mode {mode!r}: choose one of {MODES}")
        names, ranges, start = [], [], 0
        for source in report["sources"]:
            kept = source["train"]["kept"]
            if kept == 0:
                raise DataError(f"--data_path {source['name']}: no training sample, so --data_weights cannot draw "
                                "from it; fix the source or drop it (and its weight).")
            names.append(source["name"])
            ranges.append((start, start + kept))
            start += kept
        total = float(sum(weights))
        plan = cls(tuple(names), tuple(ranges), tuple(float(w) / total for w in weights), mode)
        plan.check_epoch_size(weights)
        return plan

    def epoch_size(self) -> float:
        """Samples per epoch before rounding (a float: uneven weights can make it astronomically large)."""
        # A weight so much smaller than another that its share underflows to 0 needs an endless upsampled epoch.
        ratios = [n / w if w > 0.0 else float("inf") for n, w in zip(self.sizes, self.weights, strict=True)]
        return min(ratios) if self.mode == "downsample" else max(ratios)

    def check_epoch_size(self, weights) -> None:
        """DataError naming --data_weights when an epoch would hold more than MAX_EPOCH_SAMPLES samples (its sample
        list could not be allocated), before any array of that size is made."""
        epoch = self.epoch_size()
        if epoch <= MAX_EPOCH_SAMPLES:
            return
        shown = " ".join(f"{float(w):g}" for w in weights)
        sizes = ", ".join(str(n) for n in self.sizes)
        raise DataError(f"--data_weights {shown} with --mixing {self.mode}: an epoch would hold {epoch:.3g} samples "
                        f"(sources of {sizes} training samples; at most {MAX_EPOCH_SAMPLES:,} are allowed); give "
                        "less uneven weights, or use --mixing downsample.")

    @property
    def sizes(self) -> list[int]:
        return [stop - start for start, stop in self.ranges]

    def counts(self) -> list[int]:
        """Samples drawn from each source per epoch (the same every epoch)."""
        sizes, epoch = self.sizes, self.epoch_size()
        if self.mode == "downsample":
            return [max(1, min(n, round(w * epoch))) for n, w in zip(sizes, self.weights, strict=True)]
        return [max(n, round(w * epoch)) for n, w in zip(sizes, self.weights, strict=True)]

    def population(self, seed: int, epoch: int) -> np.ndarray:
        """The training-sample indices of ``epoch`` (int64, grouped by source; the epoch plan shuffles them)."""
        parts = []
        for k, ((start, stop), count) in enumerate(zip(self.ranges, self.counts(), strict=True)):
            size = stop - start
            repeats, extra = divmod(count, size)
            rng = np.random.default_rng([seed, epoch, k, 0x6D6978])  # "mix": a stream of its own
            chosen = np.sort(rng.permutation(size)[:extra])
            parts.append(np.concatenate([np.tile(np.arange(size), repeats), chosen]) + start)
        return np.concatenate(parts).astype(np.int64)

    def to_report(self) -> dict:
        """The ``mixing`` part of the data report: weights, samples kept and drawn per epoch, per source."""
        counts = self.counts()
        total = sum(counts)
        return {
            "mode": self.mode,
            "samples_per_epoch": total,
            "sources": [
                {"name": name, "weight": round(w, 6), "kept": size, "drawn_per_epoch": count,
                 "share": round(count / total, 4), "passes_per_epoch": round(count / size, 4)}
                for name, w, size, count in zip(self.names, self.weights, self.sizes, counts, strict=True)
            ],
        }


def format_mixing(mixing: dict) -> list[str]:
    """Console lines for :meth:`MixPlan.to_report` (the data report and the training start-up lines)."""
    lines = [f"data mixing ({mixing['mode']}): {mixing['samples_per_epoch']} training samples per epoch"]
    for s in mixing["sources"]:
        lines.append(f"  {s['name']}: weight {s['weight']:.3g}, {s['drawn_per_epoch']} of {s['kept']} samples "
                     f"per epoch ({s['share']:.1%} of the epoch, {s['passes_per_epoch']:.2f} passes)")
    return lines
