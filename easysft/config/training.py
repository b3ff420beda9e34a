"""LoRA and the training run: optimisation, schedule, logging, saving and the distributed engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from easysft.config.fields import ATTN_IMPLEMENTATIONS, ENGINES, LR_SCHEDULERS, _help
from easysft.dtypes import DTYPES
from easysft.errors import ConfigError


@dataclass
class LoraConfig:
    """LoRA through PEFT (rank 0 = off)."""

    lora_dim: int = field(default=0, metadata=_help("LoRA rank; 0 disables LoRA.", resume_sensitive=True))
    lora_alpha: float | None = field(default=None, metadata=_help("LoRA alpha (default: 2 x lora_dim)."))
    lora_dropout: float = field(default=0.0, metadata=_help("Dropout on the LoRA path."))
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
        if self.lora_dim < 0:
            raise ConfigError(f"--lora_dim must be 0 (off) or a positive rank, got {self.lora_dim}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

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
    dtype: str = field(default="fp32", metadata=_help("fp32, bf16 or fp16 (autocast where supported)."))
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
                       "for the backward pass and recompute the rest, norm outputs included (about 45% less "
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
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPES)}.")
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
        if self.bf16_weights and self.dtype != "bf16":
            raise ConfigError("--bf16_weights needs --dtype bf16 (it keeps the weights in bf16); add --dtype bf16.")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"--max_nonfinite_steps must be at least 1, got {self.max_nonfinite_steps}.")


