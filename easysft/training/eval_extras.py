"""What an eval measures besides perplexity: generation eval (``--eval_generate``) and the forgetting probe
(``--probe_data``). :func:`prepare_eval_extras` runs in set-up (a broken ``--eval_metric`` or probe file fails
before the first step); :func:`measure_extras` runs inside every eval and returns the fields for its record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from easysft.config import GenerateConfig
from easysft.config.generation import model_generation_defaults
from easysft.distributed import print0
from easysft.errors import ConfigError
from easysft.generate.scored import generate_and_score, usable_rows, write_prediction_rows
from easysft.probe import load_probe_samples, probe_metrics
from easysft.scoring import BUILTIN_METRICS, TOOL_CALL_METRICS, load_user_metric

PREDICTIONS_DIR = "eval_predictions"


@dataclass
class EvalExtras:
    """Set-up products: the generation rows and settings, the user metric, the probe samples and reference."""

    gen_examples: list = field(default_factory=list)
    gen: GenerateConfig | None = None
    max_new_tokens: int = 0
    user_metric: object = None
    user_metric_names: tuple[str, ...] = ()
    lockstep: bool = False
    probe_samples: list = field(default_factory=list)
    probe_reference: object = None  # full fine-tuning: a frozen copy of the starting model
    probe_disable_adapter: bool = False  # LoRA: the starting model is the adapter switched off

    def metric_names(self) -> set[str]:
        """Every field an eval record will carry (what --metric_for_best_model may name)."""
        names = {"eval_loss", "eval_ppl"}
        if any(not ex.reference_calls for ex in self.gen_examples):  # text turns
            names |= {f"eval_{m}" for m in (*BUILTIN_METRICS, *self.user_metric_names)}
        if any(ex.reference_calls for ex in self.gen_examples):  # tool-call turns
            names |= {f"eval_{m}" for m in TOOL_CALL_METRICS}
        if self.probe_samples:
            names |= {"probe_nll", "probe_kl"}
        return names


def check_user_metric(train_cfg):
    """``--eval_metric``: imported and called once on a dry sample now (one-line ConfigError when broken)."""
    if not train_cfg.eval_metric:
        return None, ()
    if not train_cfg.eval_generate:
        raise ConfigError("--eval_metric scores generated answers: add --eval_generate N (rows to generate).")
    function = load_user_metric(train_cfg.eval_metric)
    names = tuple(function(["a dry run"], ["a dry run"], ["a prompt"]))
    return function, names


def prepare_eval_extras(run, user_metric=None, user_metric_names: tuple[str, ...] = ()) -> EvalExtras:
    """Load the generation rows and probe; called after the engine's set-up, before a resume loads weights (the
    probe's starting model is the model as loaded)."""
    from easysft.data.sources import load_examples

    cfg, data_cfg = run.train_cfg, run.data_cfg
    extras = EvalExtras(user_metric=user_metric, user_metric_names=user_metric_names,
                        lockstep=bool(getattr(run.engine, "gathers_state_dict", False)))
    model = run.engine.unwrapped_model()
    if cfg.eval_generate:
        if not run.data.eval:
            raise ConfigError("--eval_generate needs an eval split (eval.json, --data_split or --eval_fraction).")
        # --template chat: every assistant turn of a conversation, generated from the turns before it
        turns = "all" if run.data.template.kind == "chat" else None
        examples = load_examples(data_cfg.data_path, split="eval", eval_fraction=data_cfg.eval_fraction,
                                 seed=cfg.seed, data_split=data_cfg.data_split, multi_turn=data_cfg.multi_turn,
                                 conversation_turns=turns)
        extras.gen_examples = usable_rows(examples, cfg.eval_generate)
        extras.gen = run.gen_cfg.filled(model_generation_defaults(model))
        extras.max_new_tokens = cfg.eval_max_new_tokens or run.gen_cfg.max_new_tokens or data_cfg.max_ans_len
    if cfg.probe_data:
        extras.probe_samples = load_probe_samples(cfg.probe_data, run.tokenizer, run.data.template,
                                                  max_prompt_len=data_cfg.max_prompt_len,
                                                  max_ans_len=data_cfg.max_ans_len)
        if run.lora_cfg.enabled and run.lora_cfg.only_optimize_lora:
            extras.probe_disable_adapter = True
        elif extras.lockstep:
            raise ConfigError("--probe_data with full fine-tuning keeps a frozen copy of the starting model, which "
                              "sharded engines (ZeRO-3, FSDP2) do not hold; use LoRA, DDP, or a single process.")
        else:  # a frozen copy of the starting weights: one more copy of the model in memory
            extras.probe_reference = copy.deepcopy(model).eval().requires_grad_(False)
    names = extras.metric_names()
    if cfg.metric_for_best_model and cfg.metric_for_best_model not in names:
        raise ConfigError(f"--metric_for_best_model {cfg.metric_for_best_model}: not measured by this run; choose "
                          f"one of: {', '.join(sorted(names))} (generation metrics need --eval_generate N).")
    if cfg.metric_for_best_model and not run.data.eval:
        raise ConfigError("--metric_for_best_model / --load_best_model_at_end / --early_stopping_patience need an "
                          "eval split (eval.json, --data_split or --eval_fraction).")
    return extras


def measure_extras(run, step: int) -> dict:
    """Generation scores (``eval_<metric>``) and probe values for the eval at ``step``; rank 0 writes
    ``eval_predictions/step-N.jsonl``. A collective: every rank calls it."""
    extras: EvalExtras | None = run.extras
    record: dict = {}
    if extras is None:
        return record
    if extras.gen_examples:
        scored = generate_and_score(
            run.engine.unwrapped_model(), run.tokenizer, extras.gen_examples, template=run.data.template,
            max_prompt_len=run.data_cfg.max_prompt_len, gen=extras.gen, max_new_tokens=extras.max_new_tokens,
            batch_size=run.train_cfg.per_device_eval_batch_size, user_metric=extras.user_metric,
            user_metric_name=run.train_cfg.eval_metric or "", lockstep=extras.lockstep, seed=run.train_cfg.seed)
        record.update({f"eval_{name}": value for name, value in scored.metrics.items()})
        if run.dist.is_main:
            write_prediction_rows(Path(run.output_dir) / PREDICTIONS_DIR / f"step-{step}.jsonl", scored.rows)
        shown = ", ".join(f"{name} {value:.4g}" for name, value in scored.metrics.items())
        print0(f"eval step {step}: generated {len(extras.gen_examples)} answers: {shown}")
    if extras.probe_samples:
        record.update(probe_metrics(
            run.engine.model, extras.probe_samples, reference=extras.probe_reference,
            peft_model=run.engine.unwrapped_model() if extras.probe_disable_adapter else None,
            batch_size=run.train_cfg.per_device_eval_batch_size, pad_token_id=run.tokenizer.pad_token_id,
            rank=run.dist.rank, world_size=run.dist.world_size, device=run.dist.device))
        print0(f"eval step {step}: probe nll {record['probe_nll']:.4f} kl {record['probe_kl']:.4g}")
    return record
