"""Forgetting monitor (``--probe_data``): NLL of held-aside text under the model being trained, and the KL
divergence of its next-token distributions from the starting model's.

Probe rows are never trained on. Two kinds:

- general text: a ``.txt`` file, one passage per non-empty line; every token after the first is scored;
- prompt/answer rows in any format ``--data_path`` reads (both splits): only the answer tokens are scored, the
  prompt rendered with the training template.

``probe_nll`` = sum NLL / scored tokens; ``probe_kl`` = mean over scored positions of
``KL(start || now) = sum_v p_start(v) (log p_start(v) - log p_now(v))`` (nats per token; 0 for the unchanged
model, growing as training moves the model away from where it started). The starting model is, for LoRA, the
same model with its adapters switched off (PEFT's ``disable_adapter`` context: no second copy); for full
fine-tuning a frozen copy of the starting weights kept on the training device (one more copy of the weights in
memory: 4 bytes per parameter in fp32, e.g. 0.54 GB for a 135 M model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from easysft.data.batching import materialise
from easysft.data.collate import collate
from easysft.data.tokenize import IGNORE_INDEX, tokenize_example
from easysft.distributed import all_reduce_sum
from easysft.errors import ConfigError, DataError
from easysft.loss import model_inputs


def load_probe_samples(path: str, tokenizer, template, *, max_prompt_len: int, max_ans_len: int,
                       max_rows: int = 256) -> list[dict]:
    """Tokenized probe samples ({input_ids, labels}), at most ``max_rows``; DataError when none is usable.

    Every error reading the file or folder is one line naming ``--probe_data`` (the readers it shares with
    ``--data_path`` name that flag, which the user did not give here)."""
    if not Path(path).exists():
        raise ConfigError(f"--probe_data {path}: no such file or folder.")
    try:
        samples = _read_probe_samples(path, tokenizer, template, max_prompt_len=max_prompt_len,
                                      max_ans_len=max_ans_len)
    except (ConfigError, DataError) as exc:
        raise type(exc)(_as_probe_error(str(exc), path)) from None
    if not samples:
        raise DataError(f"--probe_data {path}: no usable row (give a .txt file of passages, or prompt/answer rows).")
    return samples[:max_rows]


def _as_probe_error(message: str, path: str) -> str:
    """A reader's message, as said of --probe_data: '--data_path X: ...' -> '--probe_data X: ...'; a message
    that starts with a file's location gets the flag in front of it."""
    if message.startswith("--data_path"):
        return "--probe_data" + message[len("--data_path"):]
    if message.startswith(str(path)):
        return f"--probe_data {message}"
    return f"--probe_data {path}: {message}"


def _read_probe_samples(path: str, tokenizer, template, *, max_prompt_len: int, max_ans_len: int) -> list[dict]:
    samples: list[dict] = []
    if str(path).endswith(".txt"):
        from easysft.data.readers import read_text_file

        limit = max_prompt_len + max_ans_len
        for line in read_text_file(path).splitlines():
            ids = tokenizer(line.strip(), add_special_tokens=False)["input_ids"][:limit] if line.strip() else []
            if len(ids) >= 2:
                samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    else:
        from easysft.data.sources import load_examples

        for split in ("train", "eval"):
            for ex in load_examples(path, split=split, eval_fraction=0.0):
                sample = tokenize_example(tokenizer, ex.prompt, ex.answer, max_prompt_len=max_prompt_len,
                                          max_ans_len=max_ans_len, template=template, context=ex.context or None)
                if isinstance(sample, dict) and any(label != IGNORE_INDEX for label in sample["labels"]):
                    samples.append(sample)
    return samples


def _scored_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at scored positions (n, vocab) in fp32, their targets (n,))."""
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return logits[keep].float(), targets[keep]


@torch.no_grad()
def probe_metrics(model, samples: Sequence[dict], *, reference=None, peft_model=None, batch_size: int = 8,
                  pad_token_id: int = 0, rank: int = 0, world_size: int = 1,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """``{"probe_nll", "probe_kl"}`` of ``model`` on ``samples`` against the starting model.

    The starting model is ``reference`` (a frozen copy) or, for LoRA, ``peft_model`` with its adapters disabled.
    Sharded over ranks like :func:`easysft.evaluation.evaluate` (every rank runs the same number of forward
    passes; sums are reduced before dividing); a collective: every rank calls it.
    """
    if reference is None and peft_model is None:
        raise ValueError("probe_metrics needs a reference model or a PEFT model to disable")
    was_training = model.training
    model.eval()
    mine: list[int | None] = list(range(rank, len(samples), world_size))
    mine += [None] * (-(-len(samples) // world_size) - len(mine))
    nll = kl = 0.0
    tokens = 0
    for first in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in
                 collate(materialise(mine[first:first + batch_size], samples), pad_token_id).items()}
        logits, targets = _scored_logits(model, batch)
        start_ctx = peft_model.disable_adapter() if reference is None else contextlib.nullcontext()
        with start_ctx:
            start_logits, _ = _scored_logits(reference if reference is not None else model, batch)
        now_logp, start_logp = F.log_softmax(logits, -1), F.log_softmax(start_logits, -1)
        nll += float(F.nll_loss(now_logp, targets, reduction="sum"))
        kl += float((start_logp.exp() * (start_logp - now_logp)).sum())
        tokens += int(targets.numel())
    totals = all_reduce_sum(torch.tensor([nll, kl, float(tokens)], dtype=torch.float64), device=None)
    if was_training:
        model.train()
    count = max(float(totals[2]), 1.0)
    return {"probe_nll": float(totals[0]) / count, "probe_kl": max(float(totals[1]) / count, 0.0)}
