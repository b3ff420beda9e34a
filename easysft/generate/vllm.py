"""The vLLM backend (optional; GPU users with large jobs)."""

from __future__ import annotations

import importlib.util

from easysft.config import GenerateConfig
from easysft.config.generation import SAMPLING_FIELDS
from easysft.dtypes import DTYPE_NAMES
from easysft.errors import ConfigError
from easysft.generate.hf import cut_at_stop


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

    vllm_dtype = DTYPE_NAMES[dtype]
    gen = gen.filled(_saved_generation_defaults(model_path))
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


def _saved_generation_defaults(model_path: str) -> dict:
    """The sampling fields of ``model_path``'s generation_config.json ({} when it has none)."""
    try:
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return {}
    return {name: getattr(config, name, None) for name in SAMPLING_FIELDS}
