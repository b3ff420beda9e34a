"""Batched generation for `easysft infer` and `easysft chat`.

Contract of :func:`generate_ids` (the HF backend):

- prompts are lists of token ids built by :func:`build_prompt_ids`, i.e. the training prompt (template + the same
  END-keeping truncation as :func:`easysft.data.tokenize.tokenize_example`) without the answer;
- prompts are sorted by length (longest first, so an out-of-memory batch fails at once) and decoded in groups of
  at most ``batch_size`` rows;
- the usual path (one sequence per prompt, prompts of 2+ tokens, a plain full-attention cache): each group's
  prompt pass runs in length buckets chosen by :func:`plan_batches` (padding traded against forward passes), and
  :func:`prefill_cache` stitches the buckets' key/value caches into one left-padded batch that ``generate``
  decodes together. On 2 CPU cores this is what makes batching pay: a padded batch would run every short prompt
  at the longest one's length, and separate batches would pay every decoding step once per batch;
- otherwise (beam search, a one-token prompt, sliding-window or recurrent caches, a streamer) each batch is
  padded and generated as one, with :func:`plan_batches` trading padding against decoding steps;
- batches are LEFT-padded with an ``attention_mask`` of 0 on the padding: new tokens are appended on the right,
  and position ids come from the mask, so a padded row sees the same positions as alone;
- each row stops at its own EOS: the returned ids exclude the EOS and anything generated after it (rows that
  finish early keep producing padding until the whole batch is done);
- the result is in the INPUT order.

Greedy decoding (``do_sample=False``) in fp32 gives the same tokens batched as one prompt at a time (tested), up
to floating-point near-ties. The repetition penalty is applied by :class:`PaddingAwareRepetitionPenalty`, which
ignores the left padding: transformers' own processor would count the pad token (usually EOS) as "already
generated" in padded rows only, making a batched answer end differently from the same prompt alone.

Several processes (``deepspeed --num_gpus N`` or ``torchrun``):

- data parallel (default): prompts are dealt out round-robin in length order, each rank generates its share
  with a full copy of the model, rank 0 gathers and writes. Use it whenever the model fits one device: it scales
  almost linearly and needs no communication during decoding.
- tensor parallel (``--tensor_parallel``, CUDA only): DeepSpeed ``init_inference`` splits every layer across
  the N GPUs (automatic tensor parallelism); every rank runs all prompts in lock step and rank 0 writes. Use it
  only for a model that does not fit one GPU: it communicates in every layer of every decoding step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from easysft.config import DataConfig, GenerateConfig
from easysft.data.templates import Template
from easysft.data.tokenize import keep_prompt_end
from easysft.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Settings: what was saved with the model, overridden by the flags the user gave.


@dataclass
class InferenceSettings:
    """How prompts are rendered and answers generated for one model."""

    template: Template
    max_prompt_len: int
    max_ans_len: int
    generation: GenerateConfig

    @property
    def max_new_tokens(self) -> int:
        """``--max_new_tokens`` when given, else ``max_ans_len`` (the answer length the model was trained on)."""
        return self.generation.max_new_tokens or self.max_ans_len


def resolve_settings(meta: dict, tokenizer, given: dict) -> InferenceSettings:
    """Merge, lowest priority first: built-in defaults, ``easysft.json`` (``meta``), flags in ``given``.

    ``given`` holds only the flags the user actually typed (the CLI's flat dict), so a saved value is never
    overridden by a mere default. A model without ``easysft.json`` gets template 'chat' when its tokenizer has a
    chat template, else 'qa'.
    """
    if "template" in given:
        template_spec = given["template"]
    elif meta.get("template"):
        template_spec = meta["template"]
    else:
        template_spec = "chat" if getattr(tokenizer, "chat_template", None) else "qa"
    lengths = {}
    defaults = DataConfig()
    for name in ("max_prompt_len", "max_ans_len"):
        value = given.get(name, meta.get(name, getattr(defaults, name)))
        if value is None or int(value) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}.")
        lengths[name] = int(value)
    names = {f.name for f in dataclasses.fields(GenerateConfig)}
    gen_values = {k: v for k, v in (meta.get("generation") or {}).items() if k in names}
    gen_values.update({k: v for k, v in given.items() if k in names})
    return InferenceSettings(Template.from_name(template_spec), generation=GenerateConfig(**gen_values), **lengths)


def build_prompt_ids(tokenizer, template: Template, prompt: str, context: list[dict] | None,
                     max_prompt_len: int) -> list[int]:
    """The ids the model saw before the answer at training time: template, then keep the prompt's END."""
    ids = template.prompt_ids(tokenizer, prompt, context or None)
    return keep_prompt_end(ids, max_prompt_len, tokenizer)[0]


# ----------------------------------------------------------------------------------------------------------
# The HF backend.


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
    """
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=gen.do_sample, num_beams=gen.num_beams,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, repetition_penalty=1.0, use_cache=True,
    )
    # Sampling knobs only when sampling: greedy and beam search ignore a model's saved sampling defaults, and
    # transformers warns only about conflicting values passed explicitly.
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    return kwargs


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
    if gen.num_beams != 1 or streamer is not None or min(map(len, prompts)) < 2:
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
) -> list[list[int]]:
    """Generated ids for each prompt, EOS excluded, in input order (see the module docstring).

    ``on_batch(num_prompts, num_new_tokens)`` is called after each batch (progress bars). ``streamer`` (a
    transformers streamer) is only allowed with a single prompt.
    """
    if any(not ids for ids in prompts):
        raise ValueError("every prompt needs at least one token")
    if streamer is not None and len(prompts) != 1:
        raise ValueError("a streamer needs exactly one prompt")
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(model, tokenizer)
    kwargs = generate_kwargs(gen, max_new_tokens, tokenizer, stop_ids)
    results: list[list[int] | None] = [None] * len(prompts)
    lengths = [len(ids) for ids in prompts]
    separate_prefill = can_prefill_separately(model, prompts, gen, streamer)
    if separate_prefill:  # decoding groups of batch_size in length order; each group's prompt pass is bucketed
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
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                logits_processor=processors or None, streamer=streamer, **kwargs,
            )
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        num_new = 0
        for row, ids in zip(rows, new_tokens, strict=True):
            results[row] = cut_at_stop(ids, stop_ids)
            num_new += len(results[row])
        if on_batch is not None:
            on_batch(len(rows), num_new)
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Several processes: data-parallel sharding with rank 0 gathering, or DeepSpeed tensor parallelism.


def dist_state() -> tuple[int, int]:
    """(rank, world_size) of an INITIALISED torch.distributed group, else (0, 1)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def shard_for_rank(prompts: list[list[int]], rank: int, world_size: int) -> list[int]:
    """Indices this rank generates: dealt round-robin in length order so every rank gets similar lengths."""
    return length_order(prompts)[rank::world_size]


def generate_ids_data_parallel(model, tokenizer, prompts: list[list[int]], gen: GenerateConfig, *,
                               max_new_tokens: int, batch_size: int = 8,
                               on_batch: Callable[[int, int], None] | None = None) -> list[list[int]] | None:
    """:func:`generate_ids` over this rank's share; rank 0 returns all results in input order, others None.

    Without an initialised process group this is :func:`generate_ids`. ``gather_object`` is a collective:
    every rank must call this function with the same ``prompts``.
    """
    rank, world_size = dist_state()
    if world_size == 1:
        return generate_ids(model, tokenizer, prompts, gen, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, on_batch=on_batch)
    import torch.distributed as tdist

    mine = shard_for_rank(prompts, rank, world_size)
    local = generate_ids(model, tokenizer, [prompts[i] for i in mine], gen, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, on_batch=on_batch)
    gathered: list | None = [None] * world_size if rank == 0 else None
    # gather_object pickles through the default group; with nccl the objects travel via the current CUDA device.
    tdist.gather_object(list(zip(mine, local, strict=True)), gathered, dst=0)
    if rank != 0:
        return None
    results: list[list[int] | None] = [None] * len(prompts)
    for part in gathered:
        for index, ids in part:
            results[index] = ids
    assert all(r is not None for r in results), "a prompt was generated by no rank"
    return results  # type: ignore[return-value]


def apply_tensor_parallel(model, world_size: int, dtype: torch.dtype):
    """Split ``model`` across ``world_size`` GPUs with DeepSpeed automatic tensor parallelism (CUDA only).

    For models that do not fit one GPU. Every rank must then call ``generate`` on the same prompts in the same
    order (the layers all-reduce in every step), and with the same seed when sampling.
    """
    if not torch.cuda.is_available():
        raise ConfigError("--tensor_parallel needs CUDA GPUs; on CPU, prompts are sharded across processes instead.")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("--tensor_parallel needs DeepSpeed: pip install 'easysft[deepspeed]'.") from None
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world_size}, dtype=dtype,
                                      replace_with_kernel_inject=False)
    return engine.module


# ----------------------------------------------------------------------------------------------------------
# The vLLM backend (optional; GPU users with large jobs).


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise ConfigError(
            "--backend vllm needs the vllm package, which is not installed: `pip install vllm` on a CUDA "
            "machine, or use --backend hf (the default)."
        )


def generate_ids_vllm(model_path: str, tokenizer_path: str, adapter_path: str | None, prompts: list[list[int]],
                      gen: GenerateConfig, *, max_new_tokens: int, seed: int, dtype: str = "fp32",
                      stop_ids: list[int] | None = None) -> list[list[int]]:
    """Generate with vLLM from the same prompt ids (EOS excluded, input order); vLLM batches by itself."""
    require_vllm()
    from vllm import LLM, SamplingParams

    vllm_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    llm = LLM(model=model_path, tokenizer=tokenizer_path, dtype=vllm_dtype, seed=seed,
              enable_lora=adapter_path is not None)
    params = SamplingParams(
        n=1, max_tokens=max_new_tokens, seed=seed, repetition_penalty=gen.repetition_penalty,
        stop_token_ids=stop_ids or None,
        # temperature 0 is vLLM's greedy decoding.
        temperature=gen.temperature if gen.do_sample else 0.0,
        top_p=gen.top_p if gen.do_sample else 1.0,
        top_k=(gen.top_k or -1) if gen.do_sample else -1,
    )
    lora = None
    if adapter_path is not None:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("easysft-adapter", 1, adapter_path)
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    outputs = llm.generate(requests, params, lora_request=lora, use_tqdm=True)
    return [cut_at_stop(list(out.outputs[0].token_ids), stop_ids or []) for out in outputs]


# ----------------------------------------------------------------------------------------------------------
# Progress on stderr.


class Progress:
    """A tqdm bar on stderr showing prompts/s and generated tokens/s; silent when ``enabled`` is False."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "generating"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)
        self.started = time.perf_counter()
        self.num_prompts = 0
        self.num_tokens = 0

    def __call__(self, num_prompts: int, num_tokens: int) -> None:
        self.num_prompts += num_prompts
        self.num_tokens += num_tokens
        self.bar.update(num_prompts)
        self.bar.set_postfix_str(f"{self.num_tokens / self.seconds:.1f} tok/s", refresh=True)

    @property
    def seconds(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def close(self) -> None:
        self.bar.close()
