"""Generation eval: answers for prompt/answer rows through the ``infer`` path, scored (easysft/scoring.py).

Used by training (``--eval_generate N`` at every eval) and by ``easysft eval --generate N``. Prompts are the
training prompts (:func:`build_prompt_ids`: template + END-keeping truncation); generation is batched and uses the
given settings (unset fields: the model's generation_config, see GenerateConfig). Under several processes every
rank calls :func:`generate_and_score`: prompts are sharded over ranks, rank 0 gathers and scores, and the scores
are broadcast so every rank returns the same metrics (the loop's best-model and early-stopping decisions must
agree on all ranks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from easysft.config import GenerateConfig
from easysft.distributed import DistInfo
from easysft.dtypes import dtype_for_device
from easysft.errors import ConfigError
from easysft.files import atomic_open
from easysft.generate.parallel import dist_state, generate_ids_data_parallel
from easysft.generate.prompts import example_prompt_ids
from easysft.scoring import UserMetric, parse_tool_calls, score, strip_reasoning, tool_call_scores

ERROR_KEY = "__error__"


@dataclass
class ScoredGeneration:
    """Scores (no ``eval_`` prefix) on every rank; the rows {prompt, reference, prediction} on rank 0 only."""

    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)


def usable_rows(examples, limit: int) -> list:
    """The first ``limit`` examples with a non-empty string prompt (or conversation messages) and a string answer
    (the reference)."""
    rows = []
    for example in examples:
        has_prompt = example.messages is not None or (isinstance(example.prompt, str) and example.prompt.strip())
        if has_prompt and isinstance(example.answer, str):
            rows.append(example)
            if len(rows) == limit:
                break
    return rows


def generate_and_score(model, tokenizer, examples, *, template, max_prompt_len: int, gen: GenerateConfig,
                       max_new_tokens: int, batch_size: int, user_metric: UserMetric | None = None,
                       user_metric_name: str = "", lockstep: bool = False, seed: int = 1234) -> ScoredGeneration:
    """Generate an answer for each example (prompt, answer) and score it against the answer.

    A collective under torch.distributed (every rank calls it with the same ``examples``). The model is put in
    eval mode and back; the global RNG state is saved and restored around generation, so sampling here never
    changes the training run's random numbers (resume stays exact).
    """
    prompts = [example_prompt_ids(tokenizer, template, ex, max_prompt_len, max_prompt_len + max_new_tokens)
               for ex in examples]
    was_training = model.training
    model.eval()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        generated = generate_ids_data_parallel(model, tokenizer, prompts, gen, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size, lockstep=lockstep)
    if was_training:
        model.train()
    rank, world_size = dist_state()
    result = ScoredGeneration(metrics={})
    if rank == 0:
        predictions = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
        try:
            result.metrics, result.rows = score_turns(examples, predictions, user_metric, user_metric_name)
        except ConfigError as exc:  # a user metric failing later than its dry run: every rank must stop
            result.metrics = {ERROR_KEY: str(exc)}
    if world_size > 1:
        import torch.distributed as tdist

        shared = [result.metrics]
        tdist.broadcast_object_list(shared, src=0)
        result.metrics = shared[0]
    if ERROR_KEY in result.metrics:
        raise ConfigError(result.metrics[ERROR_KEY])
    return result


def score_turns(examples, predictions: list[str], user_metric: UserMetric | None = None,
                user_metric_name: str = "") -> tuple[dict[str, float], list[dict]]:
    """Scores and prediction rows. A turn whose reference is a tool call (``example.reference_calls``) is scored
    by the calls parsed from its prediction (``tool_call_name``, ``tool_call_exact``); every other turn by the
    text metrics, against its reference text (a conversation turn's prediction without its ``<think>`` block).
    Rows of conversation turns also carry the parsed ``tool_calls`` and the ``reference_tool_calls``."""
    text, calls, rows = [], [], []
    for example, prediction in zip(examples, predictions, strict=True):
        row = {"prompt": example.prompt, "reference": example.answer, "prediction": prediction}
        if example.messages is not None:
            row["tool_calls"] = parse_tool_calls(prediction)
            row["reference_tool_calls"] = example.reference_calls
        if example.reference_calls:
            calls.append((row["tool_calls"], example.reference_calls))
        else:
            answer = strip_reasoning(prediction) if example.messages is not None else prediction
            text.append((answer, example.answer, example.prompt))
        rows.append(row)
    metrics: dict[str, float] = {}
    if text:
        metrics.update(score(*map(list, zip(*text, strict=True)), user_metric, user_metric_name))
    if calls:
        metrics.update(tool_call_scores(*map(list, zip(*calls, strict=True))))
    return metrics, rows


def write_prediction_rows(path: str | Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines, atomically (``eval_predictions/step-N.jsonl``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def score_saved_model(model_cfg, data_cfg, eval_cfg, given: dict, user_metric: UserMetric | None = None) -> dict:
    """`easysft eval --generate N`: generation scores (``eval_`` prefixed) of a saved model on the first N rows
    of ``eval_cfg.split``. Settings: saved (easysft.json) < the flags in ``given`` (models/meta.py).
    ``user_metric``: ``--eval_metric`` already loaded (and checked) by the caller."""
    from easysft.data.sources import load_examples
    from easysft.errors import DataError
    from easysft.models.load import load_model, load_tokenizer, resolve_model_path
    from easysft.models.meta import resolve_settings

    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code,
                               chat_template=model_cfg.chat_template)
    settings = resolve_settings(resolved.meta, tokenizer, given)
    examples = usable_rows(load_examples(data_cfg.data_path, split=eval_cfg.split, eval_fraction=data_cfg.eval_fraction,
                                         seed=eval_cfg.seed, data_split=data_cfg.data_split,
                                         multi_turn=data_cfg.multi_turn,
                                         conversation_turns="all" if settings.template.kind == "chat" else None),
                          eval_cfg.generate)
    if not examples:
        raise DataError(f"the {eval_cfg.split} split has no row with a prompt and a text answer to generate for.")
    device = DistInfo.from_env().device  # the GPU when there is one
    model = load_model(resolved.path, dtype=dtype_for_device(eval_cfg.dtype, device),
                       trust_remote_code=model_cfg.trust_remote_code, adapter_path=resolved.adapter_path)
    scored = generate_and_score(model.to(device), tokenizer, examples, template=settings.template,
                                max_prompt_len=settings.max_prompt_len, gen=settings.generation,
                                max_new_tokens=settings.max_new_tokens, batch_size=eval_cfg.per_device_eval_batch_size,
                                user_metric=user_metric, user_metric_name=eval_cfg.eval_metric or "",
                                seed=eval_cfg.seed)
    return {f"eval_{name}": value for name, value in scored.metrics.items()} | {"num_generated": len(examples)}
