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


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True,
                population: Sequence[int] | None = None) -> list[int]:
    """The epoch's sample order: a permutation seeded by ``seed + epoch`` (reshuffled each epoch) of
    ``range(num_samples)``, or of ``population`` (the epoch's samples under --data_weights, repeats allowed)."""
    order = list(range(num_samples)) if population is None else [int(i) for i in population]
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
    population: Sequence[int] | None = None,
) -> MicroBatchPlan:
    """This rank's micro-batches for ``epoch`` (see the module docstring for the sharding rule).

    ``population``: the sample indices of this epoch (from :meth:`easysft.data.mixing.MixPlan.population`);
    default every sample once."""
    if num_samples < 1:
        raise ValueError("plan_epoch needs at least one sample")
    order = epoch_order(num_samples, seed, epoch, shuffle, population)
    global_size = micro_batch_size * world_size
    if lengths is not None:
        order = group_by_length(order, lengths, global_size, seed, epoch)
    batches: list[list[int | None]] = []
    for start in range(0, len(order), global_size):
        chunk = order[start : start + global_size]
        if len(chunk) == global_size:
            mine = chunk[rank * micro_batch_size : (rank + 1) * micro_batch_size]
        else:
            # Short last batch: deal samples out evenly so no rank holds many while another holds none.
            share = -(-len(chunk) // world_size)
            mine = chunk[rank * share : (rank + 1) * share]
        batches.append(list(mine) if mine else [None])
    return MicroBatchPlan(epoch=epoch, batches=batches)


# ---- packing ----------------------------------------------------------------------------------------------------
#
# With --packing a micro-batch is ONE packed row (see :func:`easysft.data.collate.pack`), and a *bin* is the list
# of sample indices that share a row. Bins are built from the epoch's seeded order, independently of the world
# size; a global micro-batch is ``world_size`` consecutive bins and rank r takes bin r. Parity that holds:
# (world_size x gradient_accumulation_steps) constant -> every optimizer step holds the same bins, hence the same
# samples and the same loss (1 process x accumulation 2 == 2 processes x accumulation 1). The bins depend on the
# token budget, so runs with different ``--packing_max_tokens`` (or, with the default budget, different
# ``--per_device_train_batch_size``) see the same samples per epoch but grouped differently.

PACKING_WINDOW = 512  # samples per best-fit window: larger packs tighter, smaller keeps more of the shuffle


def pack_bins(order: Sequence[int], lengths: Sequence[int], max_tokens: int,
              window: int = PACKING_WINDOW, seed: int = 0) -> list[list[int]]:
    """Best-fit-decreasing bins of at most ``max_tokens`` tokens over ``order``, window by window.

    Each window of ``window`` consecutive samples of ``order`` is packed on its own (so the result is
    deterministic, cheap, and keeps the randomness of the order); inside a bin, samples keep their ``order``
    position; the bins of a window are shuffled by ``seed`` (best-fit-decreasing would otherwise put every long
    sample first). A sample longer than ``max_tokens`` gets a row of its own. Every index of ``order`` lands in
    exactly one bin.

    Example: lengths [5, 3, 4, 2], max_tokens 7, order [0, 1, 2, 3] -> bins {0, 3} (7 tokens) and {1, 2} (7).
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    rng = random.Random(seed)
    bins_out: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = list(order[start : start + window])
        position = {index: k for k, index in enumerate(chunk)}
        bins: list[list[int]] = []
        free: list[int] = []
        # Longest first; ties keep the order's position so the result never depends on sort stability quirks.
        for index in sorted(chunk, key=lambda i: (-lengths[i], position[i])):
            size = lengths[index]
            best = -1
            for b, room in enumerate(free):  # best fit: the fullest bin that still has room
                if room >= size and (best < 0 or room < free[best]):
                    best = b
            if best < 0:
                bins.append([index])
                free.append(max_tokens - size)
            else:
                bins[best].append(index)
                free[best] -= size
        for members in bins:
            members.sort(key=position.__getitem__)
        rng.shuffle(bins)
        bins_out.extend(bins)
    return bins_out


def plan_packed_epoch(
    lengths: Sequence[int],
    *,
    max_tokens: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    population: Sequence[int] | None = None,
) -> MicroBatchPlan:
    """This rank's packed micro-batches for ``epoch``: each is one bin (one row of at most ``max_tokens``).

    The bins come from :func:`pack_bins` over :func:`epoch_order` and do not depend on ``world_size``; rank r
    takes bin r of every group of ``world_size`` bins. When the last group is short, the ranks left without a
    bin get a filler (``[None]``: one sample, every label -100), so every rank runs the same number of
    micro-batches.
    """
    if len(lengths) == 0:
        raise ValueError("plan_packed_epoch needs at least one sample")
    order = epoch_order(len(lengths), seed, epoch, shuffle, population)
    bins = pack_bins(order, lengths, max_tokens, seed=(seed + epoch) * 104729 + 7)
    batches: list[list[int | None]] = []
    for start in range(0, len(bins), world_size):
        group = bins[start : start + world_size]
        batches.append(list(group[rank]) if rank < len(group) else [None])
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
