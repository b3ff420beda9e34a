"""Perplexity = exp(sum NLL / sum supervised tokens), reduced across ranks; never a mean of batch means."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from easysft.data.batching import materialise
from easysft.data.collate import collate
from easysft.data.samples import sample_lengths
from easysft.distributed import DistInfo, all_reduce_sum
from easysft.dtypes import dtype_for_device
from easysft.loss import supervised_loss_sum


@dataclass
class EvalResult:
    loss: float  # mean NLL per supervised token
    perplexity: float
    num_tokens: int

    def as_dict(self) -> dict:
        return {"eval_loss": self.loss, "eval_ppl": self.perplexity, "num_tokens": self.num_tokens}


@torch.no_grad()
def evaluate(
    model,
    samples: Sequence[dict],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> EvalResult:
    """Token-weighted loss and perplexity of ``model`` on ``samples``.

    Each rank evaluates every ``world_size``-th sample (sorted by length to cut padding); the (NLL sum, token
    count) pairs are summed over ranks before dividing, so the result is the same on any number of ranks.
    Every rank must call this (it holds a collective).
    """
    was_training = model.training
    model.eval()
    lengths = sample_lengths(samples)  # memory-mapped samples give them without reading any token
    mine: list[int | None] = sorted(range(rank, len(samples), world_size), key=lambda i: int(lengths[i]))
    # Every rank runs the same number of forward passes (sharded engines gather weights collectively in each):
    # ranks with one sample fewer run a filler that adds no token.
    per_rank = -(-len(samples) // world_size)
    mine += [None] * (per_rank - len(mine))
    nll, tokens = 0.0, 0
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, desc="eval", leave=False, dynamic_ncols=True)
    for indices in iterator:
        batch = {k: v.to(device) for k, v in collate(materialise(indices, samples), pad_token_id).items()}
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            out = supervised_loss_sum(model, batch)
        nll += float(out.loss_sum)
        tokens += out.num_tokens
    totals = all_reduce_sum(torch.tensor([nll, float(tokens)], dtype=torch.float64), device=None)
    total_nll, total_tokens = float(totals[0]), int(totals[1])
    if was_training:
        model.train()
    if total_tokens == 0:
        return EvalResult(loss=float("nan"), perplexity=float("nan"), num_tokens=0)
    loss = total_nll / total_tokens
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), num_tokens=total_tokens)


def evaluate_saved_model(model_cfg, data_cfg_values: dict, eval_cfg) -> EvalResult:
    """`easysft eval`: perplexity of a saved model (full, adapter, hub id or bundled) on a split of the data.

    ``data_cfg_values`` are the DataConfig flags the user typed; the template and max lengths saved with the
    model fill the rest (easysft/models/meta.py, the one settings rule). Raises DataError on an empty split.
    """
    from easysft.config import DataConfig, from_flat_dict
    from easysft.data.dataset import prepare_data
    from easysft.errors import DataError
    from easysft.models.load import load_model, load_tokenizer, resolve_model_path
    from easysft.models.meta import resolve_settings

    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code,
                               chat_template=model_cfg.chat_template)
    settings = resolve_settings(resolved.meta, tokenizer, data_cfg_values)
    saved = {"template": settings.template_spec, "max_prompt_len": settings.max_prompt_len,
             "max_ans_len": settings.max_ans_len}
    data_cfg = from_flat_dict(DataConfig, data_cfg_values | saved)
    data = prepare_data(data_cfg, tokenizer, seed=eval_cfg.seed)
    samples = data.eval if eval_cfg.split == "eval" else data.train
    if not samples:
        raise DataError(f"--data_path {', '.join(data_cfg.data_path)}: the {eval_cfg.split} split has no sample to "
                        "evaluate; add rows to it (or pick another --split).")
    device = DistInfo.from_env().device  # the GPU when there is one
    model = load_model(resolved.path, dtype=dtype_for_device(eval_cfg.dtype, device),
                       trust_remote_code=model_cfg.trust_remote_code, adapter_path=resolved.adapter_path)
    return evaluate(model.to(device), samples, batch_size=eval_cfg.per_device_eval_batch_size,
                    pad_token_id=tokenizer.pad_token_id, device=device, progress=True)
