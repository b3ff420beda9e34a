"""Which samples go into which micro-batch, per epoch and per rank. Deterministic from (seed, epoch).

A *global micro-batch* is ``micro_batch_size * world_size`` consecutive samples of the epoch's seeded
permutation; rank ``r`` takes the r-th slice of it. So 1 process with batch 4 and 2 processes with batch 2 see
exactly the same samples in every optimizer step (the distributed parity tests rely on this).

Every rank gets the same number of micro-batches (no hang at epoch end): when the last global micro-batch has
too few samples for every rank, a rank left with none gets a *filler* -- a copy of a real sample whose labels are
all ``-100``. It runs forward/backward like any batch (so collectives line up) but adds no token to the loss
or to the token count, so the math is unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from easysft.data.tokenize import IGNORE_INDEX


@dataclass(frozen=True)
class MicroBatchPlan:
    """Sample indices of each micro-batch of one epoch on one rank; ``None`` marks a filler sample."""

    epoch: int
    batches: list[list[int | None]]


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's sample order: a permutation seeded by ``seed + epoch`` (reshuffled each epoch)."""
    order = list(range(num_samples))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    return order


def group_by_length(order: list[int], lengths: Sequence[int], group_size: int, seed: int, epoch: int) -> list[int]:
    """Reorder so each run of ``group_size`` samples has similar lengths, keeping coverage and seeded randomness.

    Chunks of ``50 * group_size`` samples of the shuffled order are sorted by length, cut into groups, and the
    groups shuffled, so padding shrinks while every sample still appears exactly once per epoch.
    """
    window = max(group_size * 50, group_size)
    rng = random.Random((seed + epoch) * 7919 + 1)
    groups: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        groups.extend(chunk[i : i + group_size] for i in range(0, len(chunk), group_size))
    rng.shuffle(groups)
    return [i for group in groups for i in group]


def plan_epoch(
    num_samples: int,
    *,
    micro_batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    lengths: Sequence[int] | None = None,
    shuffle: bool = True,
) -> MicroBatchPlan:
    """This rank's micro-batches for ``epoch`` (see the module docstring for the sharding rule)."""
    if num_samples < 1:
        raise ValueError("plan_epoch needs at least one sample")
    order = epoch_order(num_samples, seed, epoch, shuffle)
    global_size = micro_batch_size * world_size
    if lengths is not None:
        order = group_by_length(order, lengths, global_size, seed, epoch)
    batches: list[list[int | None]] = []
    for start in range(0, num_samples, global_size):
        chunk = order[start : start + global_size]
        if len(chunk) == global_size:
            mine = chunk[rank * micro_batch_size : (rank + 1) * micro_batch_size]
        else:
            # Short last batch: deal samples out evenly so no rank holds many while another holds none.
            share = -(-len(chunk) // world_size)
            mine = chunk[rank * share : (rank + 1) * share]
        batches.append(list(mine) if mine else [None])
    return MicroBatchPlan(epoch=epoch, batches=batches)


def materialise(indices: list[int | None], samples: Sequence[dict]) -> list[dict]:
    """Sample dicts for a micro-batch; ``None`` becomes a filler (sample 0 with every label -100)."""
    out = []
    for index in indices:
        if index is None:
            source = samples[0]
            out.append({"input_ids": source["input_ids"], "labels": [IGNORE_INDEX] * len(source["labels"])})
        else:
            out.append(samples[index])
    return out
