"""Samples -> batches. Pure functions: no model, no tokenizer, no global state.

Batches are padded on the RIGHT to the longest sample in the batch (never to a fixed length). With a causal
model, right padding means no real token ever attends to a pad token, and ``position_ids`` of every sample
start at 0, so a sample's loss is the same alone and inside a padded batch.
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


def count_supervised(batch: dict[str, torch.Tensor]) -> int:
    """Number of supervised next-token targets in a batch (labels shifted by one, -100 excluded)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
