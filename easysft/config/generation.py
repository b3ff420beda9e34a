"""Generation settings and the settings of the commands that generate or score (infer, eval, export)."""

from __future__ import annotations

from dataclasses import dataclass, field

from easysft.config.fields import BACKENDS, _help
from easysft.config.values import normalise_fields
from easysft.dtypes import DTYPE_CHOICES, DTYPES
from easysft.errors import ConfigError

AUTO_DTYPE_HELP = "auto (bf16 on a CUDA GPU with bf16, Ampere or newer; fp32 on CPU), fp32, bf16 or fp16."

EXPORT_FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# The original design's sampling settings, kept as ``--generation_preset original``. Its repetition penalty 2.0
# punishes every token already in the prompt, so answers that must copy words from the prompt come out mangled.
ORIGINAL_PRESET = {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "top_k": 50, "repetition_penalty": 2.0,
                   "num_beams": 1}
# transformers' neutral values (GenerationConfig()): what a model without its own generation_config.json gets.
NEUTRAL_VALUES = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0,
                  "num_beams": 1}
GENERATION_PRESETS = ("model", "original")
SAMPLING_FIELDS = tuple(NEUTRAL_VALUES)


@dataclass
class GenerateConfig:
    """Generation settings for infer, chat and generation eval.

    A sampling field left unset (None) comes from ``--generation_preset``: 'model' (default) takes the model's
    own ``generation_config.json`` (transformers' neutral values where it says nothing: greedy, repetition
    penalty 1.0); 'original' takes the original design's values (sampling at 0.7, repetition penalty 2.0).
    Settings saved with a model (easysft.json) and typed flags override the preset (models/meta.py).
    """

    max_new_tokens: int | None = field(default=None, metadata=_help("Tokens to generate (default: max_ans_len)."))
    temperature: float | None = field(default=None, metadata=_help("Sampling temperature (default: the preset's)."))
    do_sample: bool | None = field(default=None, metadata=_help("Sample (true) or greedy (false) (default: the preset's)."))
    top_p: float | None = field(default=None, metadata=_help("Nucleus sampling mass (default: the preset's)."))
    top_k: int | None = field(default=None, metadata=_help("Top-k sampling (default: the preset's)."))
    repetition_penalty: float | None = field(
        default=None, metadata=_help("Repetition penalty, 1.0 = off (default: the preset's; 'original': 2.0)."))
    num_beams: int | None = field(default=None, metadata=_help("Beam search width (default: the preset's)."))
    generation_preset: str = field(
        default="model",
        metadata=_help("Where unset generation flags come from: 'model' (the model's generation_config.json, "
                       "else greedy with repetition penalty 1.0) or 'original' (the original design: sampling, "
                       "temperature 0.7, top_k 50, repetition penalty 2.0)."),
    )

    def __post_init__(self) -> None:
        normalise_fields(self)
        if self.generation_preset not in GENERATION_PRESETS:
            raise ConfigError(f"--generation_preset {self.generation_preset!r} is unknown; choose one of: "
                              f"{', '.join(GENERATION_PRESETS)}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature is not None and self.temperature <= 0 and self.do_sample is not False:
            raise ConfigError("--temperature must be positive when sampling; use --do_sample false for greedy.")
        if self.num_beams is not None and self.num_beams < 1:
            raise ConfigError(f"--num_beams must be at least 1, got {self.num_beams}.")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition_penalty must be positive, got {self.repetition_penalty}.")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"--top_k must be 0 (off) or a positive number of tokens, got {self.top_k}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}.")

    @property
    def is_filled(self) -> bool:
        return all(getattr(self, name) is not None for name in SAMPLING_FIELDS)

    def filled(self, model_defaults: dict | None = None) -> GenerateConfig:
        """Every sampling field set: the values given here, else the preset's ('model': ``model_defaults``, a
        model's ``generation_config`` as a dict, then transformers' neutral values)."""
        if self.is_filled:
            return self
        if self.generation_preset == "original":
            base = dict(ORIGINAL_PRESET)
        else:
            base = dict(NEUTRAL_VALUES)
            base.update({k: v for k, v in (model_defaults or {}).items() if k in base and v is not None})
        values = {name: getattr(self, name) if getattr(self, name) is not None else base[name]
                  for name in SAMPLING_FIELDS}
        if values["temperature"] <= 0:  # some generation_config.json files say 0 for greedy; it is unused then
            values["temperature"] = 1.0
        return GenerateConfig(max_new_tokens=self.max_new_tokens, generation_preset=self.generation_preset, **values)


def model_generation_defaults(model) -> dict:
    """The sampling fields of ``model.generation_config`` (its generation_config.json; {} when it has none)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    return {name: getattr(config, name, None) for name in SAMPLING_FIELDS}


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
    dtype: str = field(default="auto", metadata=_help(AUTO_DTYPE_HELP))
    overwrite_output_dir: bool = field(
        default=False, metadata=_help("Replace an existing --inference_output_path file (as a whole).")
    )
    local_rank: int = field(default=-1, metadata=_help("Set by the deepspeed launcher; leave alone."))
    tensor_parallel: bool = field(
        default=False,
        metadata=_help(
            "Under `deepspeed --num_gpus N` on CUDA: split the model across the GPUs (DeepSpeed init_inference) "
            "for models that do not fit one GPU. Off: each process generates its share of the prompts."
        ),
    )

    def __post_init__(self) -> None:
        normalise_fields(self)
        if self.split not in ("eval", "train"):
            raise ConfigError(f"--split must be 'eval' or 'train', got {self.split!r}.")
        if self.output_format not in ("csv", "jsonl"):
            raise ConfigError(f"--output_format must be 'csv' or 'jsonl', got {self.output_format!r}.")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is unknown; choose one of: {', '.join(BACKENDS)}.")
        if self.per_device_eval_batch_size < 1:
            raise ConfigError(f"--per_device_eval_batch_size must be at least 1, got {self.per_device_eval_batch_size}.")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPE_CHOICES)}.")




@dataclass
class EvalConfig:
    """What `easysft eval` scores and how (the model and data come from ModelConfig / DataConfig)."""

    split: str = field(default="eval", metadata=_help("Which split to score: eval or train."))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Samples per batch."))
    seed: int = field(default=1234, metadata=_help("Seed used to hold out eval rows from single files."))
    dtype: str = field(default="auto", metadata=_help(AUTO_DTYPE_HELP))
    generate: int = field(
        default=0, metadata=_help("Also generate answers for the first N rows of the split and score them "
                                  "(exact_match, rouge_l, chrf, bleu, --eval_metric), as training's --eval_generate."))
    eval_metric: str | None = field(
        default=None, metadata=_help("With --generate: your metric, 'path/to/file.py:function' or 'module:function'."))

    def __post_init__(self) -> None:
        normalise_fields(self)
        if self.split not in ("eval", "train"):
            raise ConfigError(f"--split must be 'eval' or 'train', got {self.split!r}.")
        if self.per_device_eval_batch_size < 1:
            raise ConfigError(f"--per_device_eval_batch_size must be at least 1, got {self.per_device_eval_batch_size}.")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPE_CHOICES)}.")
        if self.generate is None or self.generate < 0:
            raise ConfigError(f"--generate must be 0 (off) or a number of rows, got {self.generate}.")
        if self.eval_metric and not self.generate:
            raise ConfigError("--eval_metric scores generated answers: add --generate N (rows to generate).")


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
        normalise_fields(self)
        if not self.output_dir:
            raise ConfigError("--output_dir is required: the folder to write the exported model into.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPES)}.")
        if self.format not in EXPORT_FORMATS:
            raise ConfigError(f"--format {self.format!r} is unknown; choose one of: {', '.join(EXPORT_FORMATS)}.")
        if self.gguf_type not in GGUF_TYPES:
            raise ConfigError(f"--gguf_type {self.gguf_type!r} is unknown; choose one of: {', '.join(GGUF_TYPES)}.")


@dataclass
class ChatConfig:
    """`easysft chat`: one answer with --prompt, else the REPL. Unset overrides keep the model's saved values."""

    prompt: str | None = field(default=None, metadata=_help("Answer this one prompt on stdout and exit (no REPL)."))
    system: str | None = field(
        default=None, metadata=_help("System prompt (default: the one saved with the template, if any)."))
    tools: str | None = field(
        default=None, metadata=_help("A JSON file listing function schemas: passed to the chat template; tool calls "
                                     "are shown as such, /tool <result> answers them."))
    template: str | None = field(
        default=None, metadata=_help("Override the saved template: 'qa', 'chat' or a string with {prompt}."))
    max_prompt_len: int | None = field(
        default=None, metadata=_help("Prompt tokens kept; older turns are dropped first."))
    max_ans_len: int | None = field(
        default=None, metadata=_help("Default for --max_new_tokens (saved value, else 256)."))
    dtype: str = field(default="auto", metadata=_help(AUTO_DTYPE_HELP))
    seed: int = field(default=1234, metadata=_help("Sampling seed."))

    def __post_init__(self) -> None:
        normalise_fields(self)
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPE_CHOICES)}.")
        for name in ("max_prompt_len", "max_ans_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}.")


@dataclass
class PrepareConfig:
    """`easysft prepare`: tokenize and cache, print the data report."""

    seed: int = field(default=1234, metadata=_help("Seed for the eval hold-out and --data_split."))
    debug: bool = field(default=False, metadata=_help("Only the first 64 train / 32 eval rows (as train --debug)."))
    output_dir: str | None = field(default=None, metadata=_help("Also write data_report.json into this folder."))
    show: int = field(default=0, metadata=_help("Print the first N training samples with the supervised tokens "
                                                "marked ([[...]], or green on a terminal)."))
    show_format: str = field(default="text", metadata=_help("--show as 'text', or 'jsonl': one JSON object per "
                                                             "sample (input_ids, labels with -100) on stdout, "
                                                             "the report on stderr."))

    def __post_init__(self) -> None:
        normalise_fields(self)
        if self.show is None or self.show < 0:
            raise ConfigError(f"--show must be 0 or more samples, got {self.show}.")
        if self.show_format not in ("text", "jsonl"):
            raise ConfigError(f"--show_format must be 'text' or 'jsonl', got {self.show_format!r}.")
