"""LoRA and the training run: optimisation, schedule, logging, saving and the distributed engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from easysft.config.fields import (
    ATTN_IMPLEMENTATIONS,
    ENGINES,
    LR_SCHEDULERS,
    OPTIMIZERS,
    QUANTIZATIONS,
    _help,
)
from easysft.config.values import normalise_fields
from easysft.dtypes import DTYPE_CHOICES
from easysft.errors import ConfigError


@dataclass
class LoraConfig:
    """LoRA through PEFT (rank 0 = off)."""

    lora_dim: int = field(default=0, metadata=_help("LoRA rank; 0 disables LoRA.", resume_sensitive=True,
                                                    bounds="[0, inf)"))
    lora_alpha: float | None = field(default=None, metadata=_help(
        "LoRA alpha, > 0: the update is scaled by alpha / lora_dim (default: 2 x lora_dim).", bounds="(0, inf)"))
    lora_dropout: float = field(default=0.0, metadata=_help("Dropout on the LoRA path, in [0, 1).",
                                                            bounds="[0, 1)"))
    lora_module_name: str = field(
        default="all-linear",
        metadata=_help(
            "Which linear layers get adapters: 'all-linear', a comma list such as 'q_proj,v_proj', or a name "
            "pattern as in the original design (e.g. 'layers.').",
            resume_sensitive=True,
        ),
    )
    only_optimize_lora: bool = field(
        default=True, metadata=_help("Freeze everything but the LoRA weights (original flag).")
    )

    def __post_init__(self) -> None:
        normalise_fields(self)  # type, finiteness and the bounds of lora_dim, lora_alpha, lora_dropout

    @property
    def enabled(self) -> bool:
        return self.lora_dim > 0


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging, saving and the distributed engine."""

    output_dir: str | None = field(default=None, metadata=_help("Where the model, metrics and checkpoints go."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Samples per micro-batch per device.", resume_sensitive=True))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Samples per eval batch per device."))
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (never on biases and norms)."))
    num_train_epochs: float = field(default=1, metadata=_help("Epochs over the training split."))
    max_steps: int | None = field(default=None, metadata=_help("Stop after this many optimizer steps."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step.", resume_sensitive=True))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("One of: " + ", ".join(LR_SCHEDULERS)))
    num_warmup_steps: int = field(default=0, metadata=_help("Linear warmup steps."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (0 = off)."))
    seed: int = field(default=1234, metadata=_help("Seed for shuffling, dropout and init.", resume_sensitive=True))
    dtype: str = field(default="auto", metadata=_help(
        "auto (bf16 autocast on a CUDA GPU with bf16, Ampere or newer; fp32 on CPU, where bf16 is slower), fp32, "
        "bf16 or fp16 (autocast where supported)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations to save memory."))
    packing: bool | None = field(
        default=None,
        metadata=_help("Pack samples into padding-free rows (attention never crosses samples; same steps, weighting "
                       "and losses as padded batches). Default: on, unless --group_by_length is given (which "
                       "then pads); --packing false pads.", resume_sensitive=True),
    )
    packing_max_tokens: int | None = field(
        default=None,
        metadata=_help("With --packing: best-fit rows of at most this many tokens. Default: each row packs exactly the "
                       "per_device_train_batch_size samples of an unpacked micro-batch (same steps, no padding).", resume_sensitive=True),
    )
    group_by_length: bool = field(
        default=False, metadata=_help("Batch samples of similar length together (seeded) to cut padding.", resume_sensitive=True)
    )
    torch_compile: bool = field(default=False, metadata=_help("Compile the model with torch.compile."))
    lean_activations: bool = field(
        default=True,
        metadata=_help("Single process or DDP, Llama-style models: RMSNorm and SwiGLU MLP keep only their inputs "
                       "for the backward pass and recompute the rest, norm outputs included (about 45 percent less "
                       "activation memory, same outputs); single process: the LM head's weight gradient is added "
                       "after the backward pass."),
    )
    release_cpu_memory: bool = field(
        default=True,
        metadata=_help("CPU (single process or DDP): give memory freed by each training step back to the OS "
                       "(glibc malloc_trim after each training forward and during the backward pass), lowering peak "
                       "resident memory. Changes no numbers."),
    )
    eval_steps: int | None = field(default=None, metadata=_help("Evaluate every N optimizer steps."))
    print_loss: bool = field(default=False, metadata=_help("Print each step's loss."))
    debug: bool = field(default=False, metadata=_help("Quick debug run: 64 train / 32 eval rows, a few steps."))
    save_steps: int | None = field(default=None, metadata=_help("Write a resumable checkpoint every N steps."))
    save_total_limit: int | None = field(default=None, metadata=_help("Keep at most K checkpoints."))
    resume: str | None = field(
        default=None,
        metadata=_help("Resume: 'latest' (newest complete checkpoint in output_dir) or a checkpoint path.",
                       nargs="?", const="latest"),
    )
    overwrite_output_dir: bool = field(default=False, metadata=_help("Allow writing into a used output_dir."))
    max_nonfinite_steps: int = field(
        default=5, metadata=_help("Stop after this many non-finite steps in a row.")
    )
    engine: str = field(default="auto", metadata=_help("One of: " + ", ".join(ENGINES)))
    deepspeed: bool = field(default=False, metadata=_help("Train with DeepSpeed (original flag)."))
    zero_stage: int = field(default=0, metadata=_help("DeepSpeed ZeRO stage 0-3 (original flag)."))
    offload: bool = field(default=False, metadata=_help("DeepSpeed: offload optimizer (and ZeRO-3 params) to CPU."))
    deepspeed_config: str | None = field(default=None, metadata=_help("A DeepSpeed JSON config to pass through."))
    local_rank: int = field(default=-1, metadata=_help("Set by the deepspeed launcher; leave alone."))
    tensorboard: bool = field(default=True, metadata=_help("Write TensorBoard event files."))
    optim: str = field(
        default="adamw",
        metadata=_help("Optimizer: adamw (fused torch AdamW), adamw_8bit (bitsandbytes, 8-bit state), "
                       "paged_adamw_8bit (bitsandbytes, CUDA: state paged to CPU under pressure), adamw_4bit "
                       "(torchao, 4-bit state). Single process, DDP."),
    )
    offload_activations: bool = field(
        default=False,
        metadata=_help("Keep the activations saved for the backward pass in (pinned) CPU memory and bring them back "
                       "for the backward pass: less GPU memory for long rows, at the cost of transfers."),
    )
    skip_memory_check: bool = field(
        default=False, metadata=_help("Start even when the memory estimate says the run does not fit the device.")
    )
    quantization: str = field(
        default="none",
        metadata=_help("QLoRA: load the frozen base weights quantized with bitsandbytes, '4bit' (NF4, bf16 compute) "
                       "or '8bit' (LLM.int8); needs --lora_dim. Other frozen weights are kept in bf16.",
                       resume_sensitive=True),
    )
    double_quant: bool = field(
        default=False, metadata=_help("With --quantization 4bit: also quantize the block scales (~0.4 bit/weight less).")
    )
    eval_generate: int = field(
        default=0, metadata=_help("At every eval, generate answers for the first N eval rows and score them "
                                  "(exact_match, rouge_l, chrf, bleu, --eval_metric); 0 = off."))
    eval_max_new_tokens: int | None = field(
        default=None, metadata=_help("Tokens generated per answer in generation eval (default: --max_new_tokens, "
                                     "else max_ans_len)."))
    eval_metric: str | None = field(
        default=None, metadata=_help("Your own generation metric: 'path/to/file.py:function' or 'module:function', "
                                     "called as function(predictions, references, prompts) -> {name: float}."))
    metric_for_best_model: str | None = field(
        default=None, metadata=_help("Eval record field that ranks evals: eval_loss, eval_exact_match, eval_rouge_l, "
                                     "eval_chrf, eval_bleu, eval_<your metric>, probe_nll, probe_kl (default with "
                                     "--load_best_model_at_end / --early_stopping_patience: eval_loss)."))
    greater_is_better: bool | None = field(
        default=None, metadata=_help("Override the direction of --metric_for_best_model (default: lower is better "
                                     "for loss/ppl/nll/kl, higher for everything else)."))
    load_best_model_at_end: bool = field(
        default=False, metadata=_help("The final model is the best eval's weights (a checkpoint is kept for it)."))
    early_stopping_patience: int | None = field(
        default=None, metadata=_help("Stop after this many evals in a row without improvement of "
                                     "--metric_for_best_model; saves and exits 0."))
    early_stopping_threshold: float = field(
        default=0.0, metadata=_help("An eval improves only when it beats the best by more than this (absolute)."))
    probe_data: str | None = field(
        default=None, metadata=_help("Forgetting monitor: text (.txt, one passage a line) or prompt/answer rows not "
                                     "trained on; logs probe_nll and probe_kl (from the starting model) at each eval."))
    attn_implementation: str = field(
        default="auto",
        metadata=_help("Attention kernel: " + ", ".join(ATTN_IMPLEMENTATIONS) + ". auto: on CUDA the fastest exact "
                       "variable-length one installed (flash_attention_2, else torch varlen for bf16, else flex), "
                       "so packed rows cost attention per sample, not per row; sdpa on CPU."),
    )
    bf16_weights: bool = field(
        default=False,
        metadata=_help("With --dtype bf16 (single process or DDP): keep the model's weights in bf16 (half the weight "
                       "memory, no autocast casts) and an fp32 master copy in the optimizer, which takes the update "
                       "in fp32 and copies it back rounded."),
    )

    def __post_init__(self) -> None:
        normalise_fields(self)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.learning_rate is None or self.learning_rate < 0:
            raise ConfigError(f"--learning_rate must be non-negative, got {self.learning_rate}.")
        if self.num_train_epochs <= 0:
            raise ConfigError(f"--num_train_epochs must be positive, got {self.num_train_epochs}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max_steps must be at least 1, got {self.max_steps}.")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ConfigError(
                f"--lr_scheduler_type {self.lr_scheduler_type!r} is unknown; choose one of: {', '.join(LR_SCHEDULERS)}."
            )
        if self.num_warmup_steps < 0:
            raise ConfigError(f"--num_warmup_steps must be non-negative, got {self.num_warmup_steps}.")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPE_CHOICES)}.")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine {self.engine!r} is unknown; choose one of: {', '.join(ENGINES)}.")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}.")
        for name in ("eval_steps", "save_steps", "save_total_limit", "packing_max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}.")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max_grad_norm must be non-negative, got {self.max_grad_norm}.")
        if self.packing and self.group_by_length:
            raise ConfigError(
                "--group_by_length does nothing with --packing (packed rows hold no padding to cut); drop one "
                "(--group_by_length alone trains on padded batches)."
            )
        if self.packing is None:  # the exact fast path by default; grouping by length only means something padded
            self.packing = not self.group_by_length
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"--attn_implementation {self.attn_implementation!r} is unknown; choose one of: "
                              f"{', '.join(ATTN_IMPLEMENTATIONS)}.")
        if self.bf16_weights and self.dtype not in ("bf16", "auto"):
            raise ConfigError("--bf16_weights needs --dtype bf16 or auto (it keeps the weights in bf16); drop --dtype "
                              "or use --dtype bf16.")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"--max_nonfinite_steps must be at least 1, got {self.max_nonfinite_steps}.")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"--optim {self.optim!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}.")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization {self.quantization!r} is unknown; choose one of: "
                              f"{', '.join(QUANTIZATIONS)}.")
        if self.double_quant and self.quantization != "4bit":
            raise ConfigError("--double_quant applies to --quantization 4bit only; add it or drop --double_quant.")
        if self.eval_generate is None or self.eval_generate < 0:
            raise ConfigError(f"--eval_generate must be 0 (off) or a number of rows, got {self.eval_generate}.")
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1:
            raise ConfigError(f"--eval_max_new_tokens must be at least 1, got {self.eval_max_new_tokens}.")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError(f"--early_stopping_patience must be at least 1, got {self.early_stopping_patience}.")
        if self.early_stopping_threshold < 0:
            raise ConfigError(f"--early_stopping_threshold must be non-negative, got {self.early_stopping_threshold}.")
        if self.metric_for_best_model is None and (self.load_best_model_at_end or self.early_stopping_patience):
            self.metric_for_best_model = "eval_loss"
        if self.metric_for_best_model is not None and not self.metric_for_best_model.startswith(("eval_", "probe_")):
            self.metric_for_best_model = "eval_" + self.metric_for_best_model  # 'exact_match' -> 'eval_exact_match'
