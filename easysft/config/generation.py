"""Generation settings and the settings of the commands that generate or score (infer, eval, export)."""

from __future__ import annotations

from dataclasses import dataclass, field

from easysft.config.fields import BACKENDS, _help
from easysft.dtypes import DTYPES
from easysft.errors import ConfigError

EXPORT_FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GenerateConfig:
    """Sampling settings for infer and chat (the original design's defaults)."""

    max_new_tokens: int | None = field(default=None, metadata=_help("Tokens to generate (default: max_ans_len)."))
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature."))
    do_sample: bool = field(default=True, metadata=_help("Sample (true) or greedy (false)."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass."))
    top_k: int = field(default=50, metadata=_help("Top-k sampling."))
    repetition_penalty: float = field(default=2.0, metadata=_help("Repetition penalty (original default 2.0)."))
    num_beams: int = field(default=1, metadata=_help("Beam search width."))

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature <= 0 and self.do_sample:
            raise ConfigError("--temperature must be positive when sampling; use --do_sample false for greedy.")
        if self.num_beams < 1:
            raise ConfigError(f"--num_beams must be at least 1, got {self.num_beams}.")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition_penalty must be positive, got {self.repetition_penalty}.")


@dataclass
class InferConfig:
    """Where `easysft infer` reads and writes."""

    split: str = field(default="eval", metadata=_help("Which split to generate for: eval or train."))
    inference_output_path: str = field(default="predictions.csv", metadata=_help("Output file."))
    output_format: str = field(default="csv", metadata=_help("csv or jsonl."))
    backend: str = field(default="hf", metadata=_help("hf (transformers generate) or vllm."))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Prompts per generation batch."))
    seed: int = field(default=1234, metadata=_help("Sampling seed."))
    debug: bool = field(default=False, metadata=_help("Only the first 32 rows."))
    dtype: str = field(default="fp32", metadata=_help("fp32, bf16 or fp16."))
    local_rank: int = field(default=-1, metadata=_help("Set by the deepspeed launcher; leave alone."))
    tensor_parallel: bool = field(
        default=False,
        metadata=_help(
            "Under `deepspeed --num_gpus N` on CUDA: split the model across the GPUs (DeepSpeed init_inference) "
            "for models that do not fit one GPU. Off: each process generates its share of the prompts."
        ),
    )

    def __post_init__(self) -> None:
        if self.split not in ("eval", "train"):
            raise ConfigError(f"--split must be 'eval' or 'train', got {self.split!r}.")
        if self.output_format not in ("csv", "jsonl"):
            raise ConfigError(f"--output_format must be 'csv' or 'jsonl', got {self.output_format!r}.")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is unknown; choose one of: {', '.join(BACKENDS)}.")
        if self.per_device_eval_batch_size < 1:
            raise ConfigError(f"--per_device_eval_batch_size must be at least 1, got {self.per_device_eval_batch_size}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPES)}.")




@dataclass
class EvalConfig:
    """What `easysft eval` scores and how (the model and data come from ModelConfig / DataConfig)."""

    split: str = field(default="eval", metadata=_help("Which split to score: eval or train."))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Samples per batch."))
    seed: int = field(default=1234, metadata=_help("Seed used to hold out eval rows from single files."))
    dtype: str = field(default="fp32", metadata=_help("fp32, bf16 or fp16."))

    def __post_init__(self) -> None:
        if self.split not in ("eval", "train"):
            raise ConfigError(f"--split must be 'eval' or 'train', got {self.split!r}.")
        if self.per_device_eval_batch_size < 1:
            raise ConfigError(f"--per_device_eval_batch_size must be at least 1, got {self.per_device_eval_batch_size}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPES)}.")


@dataclass
class ExportConfig:
    """What `easysft export` writes."""

    output_dir: str | None = field(default=None, metadata=_help("Folder to write the exported model into (required)."))
    merge: bool = field(default=False, metadata=_help("Fold a LoRA adapter into the base weights (full checkpoint)."))
    dtype: str = field(default="fp32", metadata=_help("dtype of the written weights: fp32, bf16 or fp16."))
    overwrite_output_dir: bool = field(default=False, metadata=_help("Allow writing into a non-empty folder."))
    format: str = field(default="hf", metadata=_help(
        "hf (a Hugging Face checkpoint folder) or gguf (model.gguf + an Ollama Modelfile for llama.cpp-family "
        "runtimes; a LoRA adapter is merged first)."))
    gguf_type: str = field(default="f16", metadata=_help(
        "--format gguf: type of the 2-D weights: f32, f16, bf16 or q8_0 (norms stay f32)."))

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("--output_dir is required: the folder to write the exported model into.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPES)}.")
        if self.format not in EXPORT_FORMATS:
            raise ConfigError(f"--format {self.format!r} is unknown; choose one of: {', '.join(EXPORT_FORMATS)}.")
        if self.gguf_type not in GGUF_TYPES:
            raise ConfigError(f"--gguf_type {self.gguf_type!r} is unknown; choose one of: {', '.join(GGUF_TYPES)}.")
