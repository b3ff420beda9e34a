"""The HF backend: batched ``model.generate`` with length-bucketed prompt passes (see the package docstring)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from easysft.config import GenerateConfig
from easysft.config.generation import model_generation_defaults


class PaddingAwareRepetitionPenalty:
    """CTRL-style repetition penalty (as transformers' ``repetition_penalty``) that skips left padding.

    A token already present in the row's real prompt or generated text has its logit divided by ``penalty``
    (multiplied when negative). ``pad_lens[i]`` leading positions of row ``i`` are padding and are ignored.
    With beam search the rows are ``batch x num_beams``; the pad lengths are repeated per beam.
    """

    def __init__(self, penalty: float, pad_lens: list[int]):
        self.penalty = float(penalty)
        self.pad_lens = torch.tensor(pad_lens, dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, cols = input_ids.shape
        vocab = scores.shape[-1]
        pad_lens = self.pad_lens.to(input_ids.device)
        if rows != pad_lens.numel():  # beam search: each prompt row became num_beams rows
            pad_lens = pad_lens.repeat_interleave(rows // pad_lens.numel())
        real = torch.arange(cols, device=input_ids.device)[None, :] >= pad_lens[:, None]
        # Padding and ids beyond the LM head's vocabulary go to an extra column that is dropped afterwards.
        ids = torch.where(real, input_ids.clamp(max=vocab), torch.full_like(input_ids, vocab))
        seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=scores.device)
        seen.scatter_(1, ids, True)
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen[:, :vocab], penalised, scores)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS (what training appends to answers) plus any the model's generation config names."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, list) else [configured]:
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids


def generate_kwargs(gen: GenerateConfig, max_new_tokens: int, tokenizer, stop_ids: list[int]) -> dict:
    """Arguments for ``model.generate`` that fully pin the decoding (nothing left to the model's defaults).

    The repetition penalty is set to the neutral 1.0 here: :class:`PaddingAwareRepetitionPenalty` applies it.
    Unset fields of ``gen`` take its preset's values (see :meth:`GenerateConfig.filled`).
    """
    gen = gen.filled()
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=gen.do_sample, num_beams=gen.num_beams,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, repetition_penalty=1.0, use_cache=True,
    )
    # Sampling knobs only when sampling: greedy and beam search ignore a model's saved sampling defaults, and
    # transformers warns only about conflicting values passed explicitly.
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    return kwargs


def model_context(model) -> int | None:
    """Positions the model can attend to (``max_position_embeddings`` of its config), or None when unknown."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def clamp_new_tokens(max_new_tokens: int, prompt_len: int, context: int | None) -> int:
    """``max_new_tokens`` bounded by what the context leaves after a prompt of ``prompt_len`` tokens (at least 1).

    >>> clamp_new_tokens(100_000_000, 24, 1024), clamp_new_tokens(8, 24, 1024), clamp_new_tokens(8, 2000, 1024)
    (1000, 8, 1)
    """
    if context is None:
        return max_new_tokens
    return max(1, min(max_new_tokens, context - prompt_len))


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """Generated ids up to (not including) the first stop token."""
    stops = set(stop_ids)
    for position, token in enumerate(ids):
        if token in stops:
            return ids[:position]
    return ids


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(input_ids, attention_mask)``.

    >>> left_pad([[5, 6, 7], [8]], pad_id=0)  # doctest: +NORMALIZE_WHITESPACE
    (tensor([[5, 6, 7], [0, 0, 8]]), tensor([[1, 1, 1], [0, 0, 1]]))
    """
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def length_order(prompts: list[list[int]]) -> list[int]:
    """Indices of ``prompts``, longest first (stable: equal lengths keep their input order)."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


# Cost model for cutting prompts into batches, in "prompt tokens": on CPU a forward pass costs a fixed ~100 ms
# (every weight is read once, whatever the batch) plus ~2.6 ms per prompt token, and one decoding step of a batch
# ~110-260 ms (SmolLM2-135M, 2 cores, measured). Only the order of magnitude matters: it decides when padding a
# short prompt up to a long one is cheaper than one more forward pass.
PREFILL_FORWARD_TOKENS = 40
DECODE_STEP_TOKENS = 60


def plan_batches(lengths: list[int], max_batch_size: int, overhead_tokens: float) -> list[list[int]]:
    """Cut prompts into batches (lists of indices into ``lengths``) of at most ``max_batch_size`` rows.

    Prompts are taken longest first and cut into contiguous runs minimising the estimated cost
    ``sum(rows x longest prompt) + batches x overhead_tokens`` (dynamic programming over the sorted lengths), where
    ``overhead_tokens`` is what one more batch costs. Lengths spread 10x: a few long prompts get their own batch
    instead of padding many short ones; similar lengths: batches are as large as allowed.

    >>> plan_batches([100, 10, 10, 100, 10], max_batch_size=4, overhead_tokens=32)
    [[0, 3], [1, 2, 4]]
    """
    order = length_order([[0] * n for n in lengths]) if lengths else []
    sorted_lengths = [lengths[i] for i in order]
    count = len(order)
    if count * max_batch_size > 5_000_000:  # too many prompts to plan in Python: fixed-size batches
        return [order[i:i + max_batch_size] for i in range(0, count, max_batch_size)]
    best = [0.0] + [float("inf")] * count  # best[end]: cost of batching the first ``end`` sorted prompts
    start_of = [0] * (count + 1)
    for end in range(1, count + 1):
        for start in range(max(0, end - max_batch_size), end):
            # Sorted longest first, so the batch [start, end) is padded to sorted_lengths[start].
            cost = best[start] + (end - start) * sorted_lengths[start] + overhead_tokens
            if cost < best[end]:
                best[end], start_of[end] = cost, start
    batches, end = [], count
    while end > 0:
        batches.append(order[start_of[end]:end])
        end = start_of[end]
    return batches[::-1]


def can_prefill_separately(model, prompts: list[list[int]], gen: GenerateConfig, streamer) -> bool:
    """Whether :func:`prefill_cache` applies: one sequence per prompt (no beams), prompts of 2+ tokens, and a
    model whose default cache is a plain full-attention ``DynamicCache`` (sliding-window, linear-attention and
    custom caches cannot be stitched by left padding)."""
    if (gen.num_beams or 1) != 1 or streamer is not None or min(map(len, prompts)) < 2:
        return False
    supports = getattr(type(model), "_supports_default_dynamic_cache", None)
    if supports is None or not supports():
        return False
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config the cache cannot read: stay on the plain path
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def prefill_cache(model, prompts: list[list[int]], pad_id: int, device):
    """Run every prompt except its last token through ``model`` in length buckets, and stitch the key/value
    caches into ONE left-padded batch that ``model.generate`` continues from.

    Returns ``(input_ids, attention_mask, cache)``: the full prompts left-padded to the longest, and a
    ``DynamicCache`` holding positions ``0 .. width-2`` of every row (zeros under the padding, which the mask
    hides). ``generate`` then feeds only the last column (each row's last real token) and decodes all rows
    together. Why: a padded batch pays the longest prompt for every row, separate batches pay every decoding step
    once per batch; bucketing the prompt pass by length and decoding once gets the cheaper of both.
    """
    import torch.nn.functional as F
    from transformers.cache_utils import DynamicCache

    width = max(map(len, prompts))
    input_ids, attention_mask = left_pad(prompts, pad_id)
    heads: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per bucket: per layer (keys, values)
    order: list[int] = []
    for rows in plan_batches([len(ids) - 1 for ids in prompts], len(prompts), PREFILL_FORWARD_TOKENS):
        ids, mask = left_pad([prompts[i][:-1] for i in rows], pad_id)
        # What generate() derives from the mask: every row's real tokens start at position 0.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
              cache=cache, use_cache=True, logits_to_keep=1)
        missing = width - 1 - ids.shape[1]  # left-pad this bucket's cache to the longest prompt
        heads.append([(F.pad(layer.keys, (0, 0, missing, 0)), F.pad(layer.values, (0, 0, missing, 0)))
                      for layer in cache.layers])
        order.extend(rows)
    back = torch.argsort(torch.tensor(order)).to(device)  # bucket order -> the order of ``prompts``
    merged = DynamicCache(
        [(torch.cat([bucket[layer][0] for bucket in heads]).index_select(0, back),
          torch.cat([bucket[layer][1] for bucket in heads]).index_select(0, back))
         for layer in range(len(heads[0]))],
        config=model.config,
    )
    return input_ids.to(device), attention_mask.to(device), merged


def generate_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    gen: GenerateConfig,
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
    streamer=None,
    lockstep: bool = False,
) -> list[list[int]]:
    """Generated ids for each prompt, EOS excluded, in input order (see the module docstring).

    ``on_batch(num_prompts, num_new_tokens)`` is called after each batch (progress bars). ``streamer`` (a
    transformers streamer) is only allowed with a single prompt. Unset generation fields come from the model's
    generation_config (``--generation_preset model``) or the original design's values ('original').

    ``lockstep``: for models whose forward pass is a collective (DeepSpeed ZeRO-3, FSDP2): every rank must run the
    same number of forward passes, so batches are fixed runs of ``batch_size`` prompts in length order, the prompt
    pass is not bucketed, and ``generate(synced_gpus=True)`` keeps a finished rank stepping until all are done.
    The caller gives every rank the same number of prompts.
    """
    if any(not ids for ids in prompts):
        raise ValueError("every prompt needs at least one token")
    if streamer is not None and len(prompts) != 1:
        raise ValueError("a streamer needs exactly one prompt")
    gen = gen.filled(model_generation_defaults(model))
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(model, tokenizer)
    # Every generation stays within the model's context: max_new_tokens is bounded by max_position_embeddings
    # minus the (padded) prompt length of each batch; one note when that cuts what was asked.
    context = model_context(model)
    requested = max_new_tokens
    max_new_tokens = clamp_new_tokens(max_new_tokens, min(len(ids) for ids in prompts), context)
    clamped_to: list[int] = []  # one note, at the first batch that is cut
    kwargs = generate_kwargs(gen, max_new_tokens, tokenizer, stop_ids)
    results: list[list[int] | None] = [None] * len(prompts)
    lengths = [len(ids) for ids in prompts]
    separate_prefill = not lockstep and can_prefill_separately(model, prompts, gen, streamer)
    if lockstep:
        kwargs["synced_gpus"] = True
        order = length_order(prompts)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    elif separate_prefill:  # decoding groups of batch_size in length order; each group's prompt pass is bucketed
        groups = length_order(prompts)
        batches = [groups[i:i + batch_size] for i in range(0, len(groups), batch_size)]
    else:  # one padded batch per group: padding traded against decoding steps
        batches = plan_batches(lengths, batch_size, max_new_tokens * DECODE_STEP_TOKENS)
    for rows in batches:
        batch = [prompts[i] for i in rows]
        cache = None
        with torch.inference_mode():
            if separate_prefill:
                input_ids, attention_mask, cache = prefill_cache(model, batch, tokenizer.pad_token_id, device)
            else:
                input_ids, attention_mask = left_pad(batch, tokenizer.pad_token_id)
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            processors = []
            if gen.repetition_penalty != 1.0:
                from transformers import LogitsProcessorList

                pad_lens = [input_ids.shape[1] - len(ids) for ids in batch]
                processors = LogitsProcessorList([PaddingAwareRepetitionPenalty(gen.repetition_penalty, pad_lens)])
            allowed = clamp_new_tokens(max_new_tokens, input_ids.shape[1], context)
            if allowed < requested and not clamped_to:
                print(f"easysft: note: --max_new_tokens {requested} does not fit the model's context ({context} "
                      f"positions) after the prompt; generating at most {allowed} new tokens per prompt.",
                      file=sys.stderr)
            if allowed < requested:
                clamped_to.append(allowed)
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                logits_processor=processors or None, streamer=streamer, **{**kwargs, "max_new_tokens": allowed},
            )
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        num_new = 0
        for row, ids in zip(rows, new_tokens, strict=True):
            results[row] = cut_at_stop(ids, stop_ids)
            num_new += len(results[row])
        if on_batch is not None:
            on_batch(len(rows), num_new)
    return results  # type: ignore[return-value]
