"""`easysft infer`: rows of a data split -> training prompts -> batched generation -> predictions file.

Pipeline (every rank runs it; only rank 0 writes):

1. resolve the model (full checkpoint, LoRA adapter folder, hub id or 'bundled') and read ``easysft.json``;
2. settings = saved template / max lengths / generation defaults, overridden by the flags given;
3. load the split's rows and render each prompt exactly as training did (:func:`easysft.generate.build_prompt_ids`);
4. generate (HF backend, data-parallel or tensor-parallel under a launcher; or vLLM);
5. rank 0 writes ``prompt, answer, prediction`` rows in the input order, atomically (temp file + rename).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass

from easysft.config import DataConfig, InferConfig, ModelConfig
from easysft.config.paths import check_output_file
from easysft.errors import ConfigError, DataError
from easysft.files import atomic_open, disk_full_reason

DEBUG_ROWS = 32
COLUMNS = ("prompt", "answer", "prediction")


@dataclass
class InferResult:
    """What one `easysft infer` run produced (``output_path`` is None on ranks other than 0)."""

    output_path: str | None
    num_prompts: int
    num_generated_tokens: int
    seconds: float


def load_split(data_cfg: DataConfig, split: str, seed: int, skipped: list | None = None,
               conversations: bool = False) -> list:
    """Rows of ``split`` through :func:`easysft.data.sources.load_examples`; rows it drops go to ``skipped``.
    ``conversations`` (--template chat): a conversation row asks for its next assistant turn (or, when it ends
    with one, that last turn again from the turns before it). Rows are read as inference rows
    (:func:`easysft.data.adapters.inference_rows`): the answer may be absent (a list of prompts, a dialogue
    ending with a user turn); it is then written empty."""
    from easysft.data.adapters import inference_rows
    from easysft.data.sources import load_examples

    with inference_rows():
        return load_examples(data_cfg.data_path, split=split, data_split=data_cfg.data_split,
                             eval_fraction=data_cfg.eval_fraction, seed=seed, skipped=skipped,
                             conversation_turns="next" if conversations else None)


FORMAT_BY_EXTENSION = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


def resolve_output_format(infer_cfg: InferConfig, given: dict) -> None:
    """``--output_format`` from the ``--inference_output_path`` extension (.jsonl/.json: jsonl, .csv: csv) when
    the flag is not given; a given format that contradicts the extension is a ConfigError."""
    path = infer_cfg.inference_output_path
    implied = FORMAT_BY_EXTENSION.get(os.path.splitext(path)[1].lower())
    if implied is None:
        return
    if given.get("output_format") is None:
        infer_cfg.output_format = implied
    elif infer_cfg.output_format != implied:
        raise ConfigError(f"--inference_output_path {path} names a .{implied} file but --output_format is "
                          f"{infer_cfg.output_format}: change the extension or the format (or drop "
                          "--output_format to follow the extension).")


def write_predictions(path: str, rows: list[dict], output_format: str) -> None:
    """Write rows atomically: a temp file in the target folder, then ``os.replace`` (never a half file; an
    existing file is replaced as a whole). A full disk is one line; the temp file is gone, the target as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        _write_rows(path, rows, output_format)
    except Exception as exc:
        why = disk_full_reason(exc)
        if why is None:
            raise
        raise ConfigError(f"--inference_output_path {path}: cannot write the predictions ({why}); nothing was "
                          "written: free space (or give another path), then rerun.") from None


def _write_rows(path: str, rows: list[dict], output_format: str) -> None:
    with atomic_open(path, newline="") as out:
        if output_format == "csv":
            with_calls = any("tool_calls" in row for row in rows)  # conversation rows: the parsed calls as JSON
            writer = csv.DictWriter(out, fieldnames=(*COLUMNS, "tool_calls") if with_calls else COLUMNS)
            writer.writeheader()
            writer.writerows({**row, "tool_calls": json.dumps(row["tool_calls"], ensure_ascii=False)}
                             if "tool_calls" in row else row for row in rows)
        else:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")


def prediction_row(example, prediction: str) -> dict:
    """One output row; a conversation turn also gets the tool calls parsed from its prediction."""
    row = {"prompt": example.prompt, "answer": example.answer if isinstance(example.answer, str) else "",
           "prediction": prediction}
    if example.messages is not None:
        from easysft.scoring import parse_tool_calls

        row["tool_calls"] = parse_tool_calls(prediction)
    return row


def run_inference(model_cfg: ModelConfig, data_cfg: DataConfig, infer_cfg: InferConfig, given: dict) -> InferResult:
    """Generate predictions for ``infer_cfg.split`` of ``data_cfg.data_path``.

    ``given`` holds only the flags the user typed; they override what ``easysft.json`` saved (template, max
    lengths, generation defaults).
    """
    import torch

    from easysft import generate as G
    from easysft.distributed import DistInfo, init_process_group
    from easysft.dtypes import dtype_for_device, torch_dtype
    from easysft.generate.prompts import example_prompt_ids
    from easysft.models.load import load_model, load_tokenizer, resolve_model_path

    if not data_cfg.data_path:
        raise ConfigError("--data_path is required: a data folder, file or dataset to generate answers for.")
    resolve_output_format(infer_cfg, given)
    check_output_file(infer_cfg.inference_output_path, flag="--inference_output_path",  # before any generation
                      may_exist=infer_cfg.overwrite_output_dir)
    limit_flag, other_flag = (("max_eval_rows", "max_train_rows") if infer_cfg.split == "eval"
                              else ("max_train_rows", "max_eval_rows"))
    if getattr(data_cfg, other_flag) is not None:
        raise ConfigError(f"--{other_flag} limits the {other_flag[4:-5]} split, but infer reads --split "
                          f"{infer_cfg.split}: use --{limit_flag} instead.")
    dist = DistInfo.from_env()
    init_process_group(dist)
    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code,
                               chat_template=model_cfg.chat_template)
    settings = G.resolve_settings(resolved.meta, tokenizer, given)

    unreadable: list = []  # rows the reader dropped (broken JSON line, missing column): counted in the note
    examples = load_split(data_cfg, infer_cfg.split, infer_cfg.seed, skipped=unreadable,
                          conversations=settings.template.kind == "chat")
    if infer_cfg.debug:
        examples = examples[:DEBUG_ROWS]
    if getattr(data_cfg, limit_flag) is not None:
        examples = examples[: getattr(data_cfg, limit_flag)]
    prompts, kept = [], []
    for example in examples:
        # A row without a usable prompt cannot be rendered; the answer may be missing (nothing to compare).
        if example.messages is not None or (isinstance(example.prompt, str) and example.prompt.strip()):
            prompts.append(example_prompt_ids(tokenizer, settings.template, example, settings.max_prompt_len,
                                              settings.max_prompt_len + settings.max_new_tokens))
            kept.append(example)
    if not prompts:
        paths = data_cfg.data_path if isinstance(data_cfg.data_path, str) else ", ".join(map(str, data_cfg.data_path))
        first = (f" (first skipped: {unreadable[0].location} {unreadable[0].reason}"
                 f"{': ' + unreadable[0].detail if unreadable[0].detail else ''})" if unreadable else "")
        raise DataError(f"{paths}: split {infer_cfg.split!r} has no row with a non-empty prompt to generate "
                        f"for{first}.")
    skipped = len(examples) - len(kept) + len(unreadable)

    def start_progress(num_prompts: int) -> G.Progress:
        # Started after the model loads so its own loading bars do not interleave with ours.
        return G.Progress(total=num_prompts, enabled=dist.is_main)

    torch.manual_seed(infer_cfg.seed)
    dtype = dtype_for_device(infer_cfg.dtype, dist.device)  # --dtype auto: bf16 on a bf16 GPU, else fp32
    if infer_cfg.backend == "vllm":
        G.require_vllm()
        if dist.is_distributed:
            raise ConfigError("--backend vllm runs as one process (it uses the GPUs itself): do not start it "
                              "under deepspeed/torchrun.")
        stop_ids = [tokenizer.eos_token_id]
        generated = G.generate_ids_vllm(resolved.path, resolved.tokenizer_path, resolved.adapter_path, prompts,
                                        settings.generation, max_new_tokens=settings.max_new_tokens,
                                        seed=infer_cfg.seed, dtype=dtype, stop_ids=stop_ids)
        progress = start_progress(len(prompts))
        progress(len(prompts), sum(len(ids) for ids in generated))
    else:
        model = load_model(resolved.path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                           adapter_path=resolved.adapter_path)
        model.eval()
        use_tp = infer_cfg.tensor_parallel and dist.is_distributed and dist.device.type == "cuda"
        if infer_cfg.tensor_parallel and not use_tp and dist.is_main:
            print("easysft: --tensor_parallel needs several CUDA processes; sharding prompts (data parallel) "
                  "instead.", file=sys.stderr)
        if use_tp:
            model = G.apply_tensor_parallel(model, dist.world_size, torch_dtype(dtype))
            progress = start_progress(len(prompts))
            generated = G.generate_ids(model, tokenizer, prompts, settings.generation,
                                       max_new_tokens=settings.max_new_tokens,
                                       batch_size=infer_cfg.per_device_eval_batch_size, on_batch=progress)
        else:
            model.to(dist.device)
            progress = start_progress(len(G.shard_for_rank(prompts, dist.rank, dist.world_size)))
            generated = G.generate_ids_data_parallel(model, tokenizer, prompts, settings.generation,
                                                     max_new_tokens=settings.max_new_tokens,
                                                     batch_size=infer_cfg.per_device_eval_batch_size,
                                                     on_batch=progress)
    progress.close()

    result = InferResult(None, len(prompts), progress.num_tokens, progress.seconds)
    if dist.is_main:
        rows = [prediction_row(ex, tokenizer.decode(ids, skip_special_tokens=True))
                for ex, ids in zip(kept, generated, strict=True)]
        write_predictions(infer_cfg.inference_output_path, rows, infer_cfg.output_format)
        result.output_path = infer_cfg.inference_output_path
        first = f"; first: {unreadable[0].location} {unreadable[0].reason}" if unreadable else ""
        note = f" ({skipped} rows skipped: unreadable or without a prompt{first})" if skipped else ""
        print(f"easysft: wrote {len(rows)} predictions to {infer_cfg.inference_output_path}{note}",
              file=sys.stderr)
    return result
