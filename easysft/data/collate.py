"""Samples -> batches. Pure functions: no model, no tokenizer, no global state.

Batches are padded on the RIGHT to the longest sample in the batch (never to a fixed length). With a causal
model, right padding means no real token ever attends to a pad token, and ``position_ids`` of every sample
start at 0, so a sample's loss is the same alone and inside a padded batch. :func:`pack` is the padding-free
alternative (``--packing``): samples side by side in one row, isolated by restarting ``position_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from easysft.data.tokenize import IGNORE_INDEX


def collate(samples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``samples`` (dicts with ``input_ids`` and ``labels``) to the longest one.

    Worked example (pad_token_id = 0)::

        samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                   {"input_ids": [8, 9],    "labels": [-100, 9]}]
        collate(samples, 0) ==
            input_ids      [[5, 6, 7], [8, 9, 0]]
            attention_mask [[1, 1, 1], [1, 1, 0]]
            position_ids   [[0, 1, 2], [0, 1, 0]]
            labels         [[-100, 6, 7], [-100, 9, -100]]

    Padding gets label -100 and attention 0; its position id is 0 (never attended to, never supervised).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    longest = max(len(s["input_ids"]) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    position_ids = torch.zeros((batch, longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        if len(sample["labels"]) != n:
            raise ValueError(f"sample {row}: input_ids and labels differ in length ({n} vs {len(sample['labels'])})")
        input_ids[row, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.arange(n)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def pack(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Concatenate ``samples`` into ONE row, padding-free, for a model that isolates them by ``position_ids``.

    Worked example::

        samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                   {"input_ids": [8, 9],    "labels": [9, 9]}]
        pack(samples) ==
            input_ids    [[5, 6, 7, 8, 9]]
            position_ids [[0, 1, 2, 0, 1]]
            labels       [[-100, 6, 7, -100, 9]]

    - ``position_ids`` restart at 0 for each sample: transformers (sdpa/eager: a block-diagonal causal mask;
      flash-attention: variable-length kernels) reads the restarts as sample boundaries when there is NO
      ``attention_mask`` and no KV cache (the forward must pass ``use_cache=False``, as the loss does).
    - The first label of every sample is -100: the loss shifts labels by one, so that label would be a target
      predicted from the PREVIOUS sample's last token. With it masked, no target crosses a boundary, and each
      sample's loss equals its loss alone (docs/ARCHITECTURE.md rule 5; tests check values and gradients).
    - There is no ``attention_mask`` key (a 2-D mask of ones would turn off the packed-sequence detection).
    """
    if not samples:
        raise ValueError("pack needs at least one sample")
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for k, sample in enumerate(samples):
        n = len(sample["input_ids"])
        if n == 0 or len(sample["labels"]) != n:
            raise ValueError(f"sample {k}: needs equal, non-zero input_ids and labels lengths "
                             f"({n} vs {len(sample['labels'])})")
        input_ids.extend(sample["input_ids"])
        labels.append(IGNORE_INDEX)
        labels.extend(sample["labels"][1:])
        position_ids.extend(range(n))
    return {key: torch.tensor([values], dtype=torch.long)
            for key, values in (("input_ids", input_ids), ("position_ids", position_ids), ("labels", labels))}


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a padded or packed batch (a packed batch has no padding)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def count_supervised(batch: dict[str, torch.Tensor]) -> int:
    """Number of supervised next-token targets in a batch (labels shifted by one, -100 excluded)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
