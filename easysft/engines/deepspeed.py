"""DeepSpeed ZeRO 0/1/2/3 (+ CPU offload): the original design's engine.

Launch: ``deepspeed --num_gpus N --module easysft train ... --deepspeed --zero_stage {0,1,2,3} [--offload]``
(the launcher appends ``--local_rank=N``, which the CLI accepts). On a machine without GPUs DeepSpeed picks its
CPU accelerator and gloo by itself, so ``deepspeed --num_gpus 2`` starts 2 CPU processes (that is how the tests
run). Without a launcher, ``--deepspeed`` runs on a one-process group.

Who does what:
- easysft builds the DeepSpeed config (:func:`build_ds_config`), or takes the user's ``--deepspeed_config`` JSON
  and fills only batch sizes, accumulation and precision, saying (rank 0) when it overrides a value.
- The optimizer is easysft's AdamW parameter groups (``engines/optim.py``); with ``--offload`` DeepSpeedCPUAdam when
  its C++ op builds here, else torch AdamW on CPU (slower; a message says so). A user JSON with an ``optimizer``
  or ``scheduler`` section keeps its own.
- easysft steps the LR scheduler once per APPLIED optimizer step (not DeepSpeed), so a skipped step does not
  advance the schedule.
- Checkpoints (``--save_steps``/``--resume``) are DeepSpeed's own ``save_checkpoint``/``load_checkpoint`` (every
  rank writes its ZeRO partition) plus easysft's scheduler state; see :meth:`DeepSpeedEngine.load_checkpoint`.
- DeepSpeed owns backward, accumulation boundaries, gradient reduction, clipping (``gradient_clipping`` =
  ``--max_grad_norm``) and the update: ``engine.backward`` + ``engine.step`` after EVERY micro-batch; the update
  happens at the accumulation boundary.

Gradient math: DeepSpeed divides the loss by ``gradient_accumulation_steps`` and AVERAGES gradients over ranks.
The loop's loss is already normalised by the supervised tokens of the whole step on all ranks, so
``grad_scale = gradient_accumulation_steps * world_size`` cancels both and the update equals the single-process
one. Uneven token counts across ranks therefore weigh each token equally.

Non-finite steps (what DeepSpeed allows): the norm is only known inside ``engine.step()``, and DeepSpeed offers no
"discard this step" call. With ZeRO 1-3 (fp32, bf16 with ``check_grad_overflow``, fp16) DeepSpeed itself skips an
update whose global gradient norm is inf/NaN, on every rank alike (the overflow flag is all-reduced); easysft then
does not step the scheduler and reports the norm as inf. With ZeRO-0 in fp32 (plain torch optimizer, gradients
already all-reduced and identical on every rank) easysft checks the norm first and, if it is non-finite, drops
the gradients without calling ``engine.step()``, so the weights stay as they were. A step the loop asks to skip
(non-finite loss) whose gradients are finite cannot be withdrawn under ZeRO 1-3: that is reported once as a
warning.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch

from easysft.distributed import init_process_group, print0
from easysft.engines.optim import build_optimizer, build_scheduler, param_groups
from easysft.errors import CheckpointError, ConfigError

# Quiet by default: DeepSpeed prints a progress line every `steps_per_print` steps; easysft logs its own.
_QUIET_STEPS = 10**9


def _read_user_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path}: no such file.") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed_config {path}:{exc.lineno}: not valid JSON ({exc.msg}).") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--deepspeed_config {path}: the top level must be a JSON object.")
    return config


def build_ds_config(train_cfg, world_size: int, user_config: dict | None = None) -> tuple[dict, list[str]]:
    """The DeepSpeed config for this run, and the override notes to print (one per value easysft replaced).

    Without ``user_config``: ZeRO ``--zero_stage`` (+ CPU offload of the optimizer, and of the parameters at stage
    3, with ``--offload``), ``gradient_clipping = --max_grad_norm``, bf16/fp16 per ``--dtype``.
    With ``user_config`` (``--deepspeed_config``): a copy of it where ONLY the batch sizes, the accumulation steps
    and the precision sections are set from easysft's flags; a value it had (other than "auto") that differs is
    reported in the notes.
    """
    mbs, gas = train_cfg.per_device_train_batch_size, train_cfg.gradient_accumulation_steps
    ours = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": gas,
        "train_batch_size": mbs * gas * world_size,
    }
    precision = {"bf16": train_cfg.dtype == "bf16", "fp16": train_cfg.dtype == "fp16"}
    notes: list[str] = []
    if user_config is None:
        zero: dict = {"stage": train_cfg.zero_stage}
        if train_cfg.offload:
            zero["offload_optimizer"] = {"device": "cpu"}
            if train_cfg.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu"}
        config = {
            **ours,
            "gradient_clipping": train_cfg.max_grad_norm,
            "zero_optimization": zero,
            "steps_per_print": _QUIET_STEPS,
            "wall_clock_breakdown": False,
        }
    else:
        config = copy.deepcopy(user_config)
        for key, value in ours.items():
            old = config.get(key)
            if old is not None and old != "auto" and old != value:
                notes.append(f"deepspeed_config: {key} {old} -> {value} (from easysft's batch flags and world size)")
            config[key] = value
    for section, enabled in precision.items():
        block = config.get(section)
        block = dict(block) if isinstance(block, dict) else {}
        old = block.get("enabled")
        if user_config is not None and old is not None and old != "auto" and bool(old) != enabled:
            notes.append(f"deepspeed_config: {section}.enabled {old} -> {enabled} (from --dtype {train_cfg.dtype})")
        block["enabled"] = enabled
        if section == "bf16" and enabled:
            block.setdefault("check_grad_overflow", True)  # so a non-finite bf16 step is skipped, not applied
        config[section] = block
    # easysft passes torch AdamW (or DeepSpeedCPUAdam); ZeRO only accepts "untested" optimizers when told.
    config.setdefault("zero_allow_untested_optimizer", True)
    return config, notes


def _cpu_adam(groups: list[dict], train_cfg):
    """DeepSpeedCPUAdam (fast fused C++ AdamW on CPU) if its op builds here; None (and a message) if not."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=train_cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                adamw_mode=True)
    except Exception as exc:  # the op compiles on first use; a missing compiler shows up as any exception
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print0(f"--offload: DeepSpeedCPUAdam is not available here ({first_line[:160]}); using torch AdamW on "
               "CPU instead (correct, slower). Install a C++ compiler and ninja to build the fast one.")
        return None


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, dist_info) -> None:
        self.dist = dist_info
        self.device = dist_info.device
        # DeepSpeed reads LOCAL_RANK itself; without a launcher there is none (one-process group).
        os.environ.setdefault("LOCAL_RANK", str(dist_info.local_rank))
        init_process_group(dist_info, single_process=True)
        self.model = None  # the DeepSpeed engine: forward, backward and step go through it
        self.scheduler = None  # ours, stepped per applied update; None when the user's JSON has a scheduler
        self.zero_stage = 0
        self.gathers_state_dict = False
        self._is_last = True
        self._warned_unskippable = False

    def prepare_model(self, model: torch.nn.Module, train_cfg) -> torch.nn.Module:
        """No patches: ZeRO-3 gathers weights in module hooks, which the fused MLP tail of the lean ops bypasses."""
        return model

    def setup(self, model: torch.nn.Module, *, train_cfg, num_training_steps: int) -> None:
        import deepspeed

        if train_cfg.torch_compile:
            raise ConfigError("--torch_compile with --deepspeed is not supported here; drop one of them.")
        user = _read_user_config(train_cfg.deepspeed_config) if train_cfg.deepspeed_config else None
        config, notes = build_ds_config(train_cfg, self.dist.world_size, user)
        for note in notes:
            print0(note)
        zero = config.get("zero_optimization") or {}
        self.zero_stage = int(zero.get("stage", 0))
        if user is None and train_cfg.offload and self.zero_stage == 0:
            raise ConfigError("--offload needs ZeRO: add --zero_stage 1, 2 or 3 (3 also offloads the weights).")
        if user is not None and train_cfg.zero_stage not in (0, self.zero_stage):
            print0(f"deepspeed_config: ZeRO stage {self.zero_stage} from the file is used (--zero_stage "
                   f"{train_cfg.zero_stage} is ignored with --deepspeed_config)")
        offloading = any(
            str((zero.get(key) or {}).get("device", "none")) not in ("none", "None")
            for key in ("offload_optimizer", "offload_param")
        )

        optimizer = None
        if "optimizer" in config:
            print0("deepspeed_config: using the file's optimizer section")
            model_parameters = [p for p in model.parameters() if p.requires_grad]
        else:
            model_parameters = None
            if offloading:
                optimizer = _cpu_adam(param_groups(model, train_cfg.weight_decay), train_cfg)
                if optimizer is None:
                    config["zero_force_ds_cpu_optimizer"] = False  # accept torch AdamW with offload
            if optimizer is None:
                optimizer = build_optimizer(model, learning_rate=train_cfg.learning_rate,
                                            weight_decay=train_cfg.weight_decay, device_type=self.device.type)
        if "scheduler" in config:
            print0("deepspeed_config: using the file's scheduler section (DeepSpeed steps it)")
        elif optimizer is not None:
            # Built on the client optimizer, whose param_groups ZeRO keeps using: setting their lr is enough.
            self.scheduler = build_scheduler(
                optimizer, name=train_cfg.lr_scheduler_type, num_warmup_steps=train_cfg.num_warmup_steps,
                num_training_steps=num_training_steps,
            )
        # ZeRO-3 partitions the already-loaded weights here (each rank keeps 1/world of every tensor); loading
        # straight into partitions (deepspeed.zero.Init) would avoid the one full copy per rank at start-up.
        self.model, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=model_parameters, config=config,
        )
        self.gathers_state_dict = self.zero_stage == 3
        self._plain_optimizer = self.zero_stage == 0 and train_cfg.dtype == "fp32"

    @property
    def grad_scale(self) -> float:
        # Cancels DeepSpeed's 1/gradient_accumulation_steps and its average over ranks (module docstring).
        return float(self.model.gradient_accumulation_steps() * self.dist.world_size)

    def accumulate(self, is_last_micro_batch: bool):
        import contextlib

        # The loop, not DeepSpeed's micro-step counter, says where a step ends: an epoch's last step may hold
        # fewer than gradient_accumulation_steps micro-batches. (DeepSpeed's 1/gas loss scale is still applied
        # and still cancelled by grad_scale; the loss is normalised by the step's real token count.)
        self._is_last = is_last_micro_batch
        self.model.set_gradient_accumulation_boundary(is_last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        if not self._is_last:
            self.model.step()  # no update between boundaries: DeepSpeed only advances its micro-step counter

    def grad_norm_and_step(self, max_grad_norm: float, *, skip: bool = False) -> float:
        # max_grad_norm is already in the DeepSpeed config (gradient_clipping); DeepSpeed clips inside step().
        if self._plain_optimizer:
            return self._plain_step(skip)
        self.model.step()
        applied = bool(self.model.was_step_applied())
        norm = self.model.get_global_grad_norm()
        norm = float("inf") if not applied else float(norm) if norm is not None else float("nan")
        if applied and skip and not self._warned_unskippable:
            self._warned_unskippable = True
            print0("warning: a non-finite loss came with finite gradients; DeepSpeed applied that update "
                   "(ZeRO offers no way to withdraw it)")
        if applied and self.scheduler is not None:
            self.scheduler.step()
        return norm

    def _plain_step(self, skip: bool) -> float:
        """ZeRO-0 fp32: gradients are all-reduced (identical on all ranks) before step(); check them first."""
        params = [p for p in self.model.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
        if skip or not math.isfinite(norm):
            # No engine.step(): it would still clip and step (DeepSpeed's clipping even fails on zero gradients).
            # Dropping the gradients is all a skipped step needs; the loop marks the accumulation boundaries
            # itself, so DeepSpeed's micro-step counter falling one behind changes nothing.
            for p in params:
                p.grad = None
            return norm
        self.model.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return norm

    def current_lr(self) -> float:
        return float(self.model.get_lr()[0])

    def unwrapped_model(self) -> torch.nn.Module:
        return self.model.module

    def full_state_dict(self):
        """ZeRO-3: gather every partition (a collective EVERY rank must join), full weights on rank 0 (CPU).
        ZeRO 0-2 keep full weights on every rank: rank 0 returns its own module's."""
        if self.zero_stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()
            return state if self.dist.is_main else None
        return self.model.module.state_dict() if self.dist.is_main else None

    # ---- checkpoints: DeepSpeed's own (per-rank ZeRO partitions), plus easysft's LR scheduler ------------------

    def save_checkpoint(self, path) -> None:
        """``path/deepspeed/state/``: ``engine.save_checkpoint`` (model states on rank 0, every rank's ZeRO
        optimizer partition); ``path/scheduler.pt`` (rank 0) for easysft's scheduler, which DeepSpeed does not
        know about. A collective: every rank calls it."""
        from easysft.checkpoint import tensors as checkpoint

        self.model.save_checkpoint(str(Path(path) / DS_DIR), tag=DS_TAG, save_latest=False)
        if self.scheduler is not None and self.dist.is_main:
            checkpoint.save_torch_state(self.scheduler.state_dict(), Path(path) / "scheduler.pt")

    def load_checkpoint(self, path) -> None:
        """``engine.load_checkpoint`` with the optimizer states; the LR scheduler from DeepSpeed only when the
        user's JSON has one (DeepSpeed steps it), else easysft's from ``scheduler.pt``.

        Security: DeepSpeed unpickles its files without the weights-only restriction (they hold pickled Python
        objects such as its loss scaler) and offers no option to change that: the one place easysft loads a full
        pickle. Resume only from checkpoints you trust (README, "Security defaults")."""
        from easysft.checkpoint import tensors as checkpoint

        folder = Path(path) / DS_DIR
        if not (folder / DS_TAG).is_dir():
            raise CheckpointError(f"checkpoint {path} has no DeepSpeed state ({folder / DS_TAG}); was it written by "
                                  "another engine? Resume with the engine that wrote it.")
        try:
            loaded, _ = self.model.load_checkpoint(
                str(folder), tag=DS_TAG, load_optimizer_states=True,
                load_lr_scheduler_states=self.scheduler is None,
            )
        except Exception as exc:  # noqa: BLE001 -- DeepSpeed raises assorted types for missing/damaged files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"checkpoint {folder} cannot be loaded by DeepSpeed: {first[:300]}") from None
        if loaded is None:
            raise CheckpointError(f"checkpoint {folder}: DeepSpeed found no state to load.")
        if self.scheduler is not None:
            file = Path(path) / "scheduler.pt"
            try:
                self.scheduler.load_state_dict(checkpoint.load_torch_state(file))
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"checkpoint file {file} does not fit this run: {exc}") from None
            # The LR the next update uses must be the schedule's, whatever DeepSpeed restored into the groups.
            for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr


DS_DIR = "deepspeed"
DS_TAG = "state"
