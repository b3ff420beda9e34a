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

from easysft.generate.hf import (
    PaddingAwareRepetitionPenalty,
    can_prefill_separately,
    cut_at_stop,
    generate_ids,
    generate_kwargs,
    left_pad,
    length_order,
    plan_batches,
    prefill_cache,
    stop_token_ids,
)
from easysft.generate.parallel import (
    apply_tensor_parallel,
    dist_state,
    generate_ids_data_parallel,
    shard_for_rank,
)
from easysft.generate.progress import Progress
from easysft.generate.prompts import build_prompt_ids
from easysft.generate.vllm import generate_ids_vllm, require_vllm, vllm_available
from easysft.models.meta import SavedSettings, resolve_settings

__all__ = [
    "PaddingAwareRepetitionPenalty", "Progress", "SavedSettings", "apply_tensor_parallel", "build_prompt_ids",
    "can_prefill_separately", "cut_at_stop", "dist_state", "generate_ids", "generate_ids_data_parallel",
    "generate_ids_vllm", "generate_kwargs", "left_pad", "length_order", "plan_batches", "prefill_cache",
    "require_vllm", "resolve_settings", "shard_for_rank", "stop_token_ids", "vllm_available",
]
