"""torchrun + PyTorch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over ranks.

Launch: ``torchrun --nproc_per_node N -m easysft train ... --engine fsdp``. gloo on CPU, nccl on CUDA.

Wrapping: ``fully_shard`` on every decoder layer (the classes the model lists in ``_no_split_modules``), then on
the root, so one layer's full weights exist at a time. With ``--dtype bf16`` a ``MixedPrecisionPolicy`` computes
in bf16 and reduces gradients in fp32; the sharded master weights and the optimizer stay fp32.

Gradient math: FSDP AVERAGES gradients over ranks (reduce-scatter), so ``grad_scale = world_size`` (see
``engines/base.py``). Gradients are reduce-scattered after every micro-batch, not only the last: FSDP2's
"no sync" mode would keep a full, unsharded gradient per rank, which is the memory FSDP exists to save.

Saving: :meth:`full_state_dict` is a collective (every rank gathers its shards) and hands rank 0 the full weights
on CPU; the loop passes them to ``save_pretrained``.
"""

from __future__ import annotations

import math

import torch

from easysft.engines.process_group import start_process_group
from easysft.errors import ConfigError
from easysft.train.optim import build_optimizer, build_scheduler


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: modules whose class the HF model names in ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"--engine fsdp: cannot find the decoder layers of {type(model).__name__} (no _no_split_modules); "
            "use --engine ddp or --deepspeed."
        )
    return layers


class FSDPEngine:
    name = "fsdp"
    gathers_state_dict = True  # the loop must save the gathered dict, not the sharded module's own

    def __init__(self, dist_info) -> None:
        self.dist = dist_info
        self.device = dist_info.device
        start_process_group(dist_info)
        self.model: torch.nn.Module | None = None
        self.optimizer = None
        self.scheduler = None

    def setup(self, model: torch.nn.Module, *, train_cfg, num_training_steps: int) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if train_cfg.dtype == "fp16":
            raise ConfigError("--engine fsdp supports --dtype fp32 or bf16 (fp16 needs a loss scaler); use bf16.")
        if train_cfg.torch_compile:
            raise ConfigError("--torch_compile with --engine fsdp is not supported here; drop one of them.")
        kwargs = {}
        if train_cfg.dtype == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = model.to(self.device)
        self._model_class = type(model)
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)  # the root: embeddings, final norm and (tied) LM head
        self.model = model
        self.optimizer = build_optimizer(
            model, learning_rate=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
            device_type=self.device.type,
        )
        self.scheduler = build_scheduler(
            self.optimizer, name=train_cfg.lr_scheduler_type, num_warmup_steps=train_cfg.num_warmup_steps,
            num_training_steps=num_training_steps,
        )

    @property
    def grad_scale(self) -> float:
        return float(self.dist.world_size)

    def accumulate(self, is_last_micro_batch: bool):
        import contextlib

        return contextlib.nullcontext()  # reduce-scatter every micro-batch (see the module docstring)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm_and_step(self, max_grad_norm: float, *, skip: bool = False) -> float:
        # Gradients are DTensor shards: clip_grad_norm_ reduces the norm over ranks, so every rank gets the same
        # value and takes the same skip decision.
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not skip and math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def unwrapped_model(self) -> torch.nn.Module:
        return self.model

    def full_state_dict(self):
        """Gather every shard (a collective EVERY rank must join); rank 0 gets the full weights on CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return None
        # A tied weight (the LM head sharing the embedding) comes back once per name as separate copies; keep
        # the first name only, as save_pretrained writes an unsharded tied model.
        first_name: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in first_name:
                state.pop(name, None)
            else:
                first_name[id(param)] = name
        return state
