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

Checkpoints (``--save_steps``/``--resume``): torch.distributed.checkpoint (DCP), sharded: every rank writes and
reads its own part of the trainable weights and the optimizer state under ``step-N/fsdp/``; rank 0 adds the LR
scheduler. DCP's ``.metadata`` file is a pickle: it is read with a restricted unpickler (only DCP's metadata
classes and torch's plain types), so loading a checkpoint cannot run code, as ``torch.load(weights_only=True)``
guarantees for the other engines' files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from easysft.distributed import init_process_group
from easysft.engines.base import build_training_state, clip_and_step
from easysft.errors import CheckpointError, ConfigError
from easysft.models.layers import decoder_layers


def _layers_to_shard(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (:func:`easysft.models.layers.decoder_layers`)."""
    layers = decoder_layers(model)
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
        init_process_group(dist_info, single_process=True)
        self.model: torch.nn.Module | None = None
        self.optimizer = None
        self.scheduler = None

    def prepare_model(self, model: torch.nn.Module, train_cfg) -> torch.nn.Module:
        """No patches: FSDP2 gathers weights in module hooks, which the fused MLP tail of the lean ops bypasses."""
        return model

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
        for layer in _layers_to_shard(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)  # the root: embeddings, final norm and (tied) LM head
        self.model = model
        # fp16 is refused above, so no GradScaler (the third value) is ever built here.
        self.optimizer, self.scheduler, _ = build_training_state(model, train_cfg, num_training_steps, self.device)

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
        return clip_and_step(self.model.parameters(), self.optimizer, self.scheduler, max_grad_norm, skip)

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

    # ---- checkpoints: torch.distributed.checkpoint (DCP), sharded, every rank writes and reads its own part ----

    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=_dcp_options())
        return {"model": model_state, "optimizer": optim_state}

    def save_checkpoint(self, path) -> None:
        """``path/fsdp/``: DCP files (``*.distcp`` per rank + ``.metadata``) of the sharded trainable weights and
        optimizer state; ``path/scheduler.pt`` (rank 0). A collective: every rank calls it."""
        import torch.distributed.checkpoint as dcp

        from easysft.checkpoint import tensors as checkpoint

        dcp.save(self._sharded_state(), checkpoint_id=Path(path) / DCP_DIR)
        if self.dist.is_main:
            checkpoint.save_torch_state(self.scheduler.state_dict(), Path(path) / "scheduler.pt")

    def load_checkpoint(self, path) -> None:
        """Read every rank's shards back (the world size may differ: DCP reshards), then the scheduler."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from easysft.checkpoint import tensors as checkpoint

        folder = Path(path) / DCP_DIR
        if not (folder / ".metadata").is_file():
            raise CheckpointError(f"checkpoint {path} has no FSDP state ({folder}/.metadata); was it written by "
                                  "another engine? Resume with the engine that wrote it.")
        state = self._sharded_state()
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(folder))
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 -- CheckpointException is a BaseException
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"checkpoint {folder} cannot be loaded into this model: {first[:300]}") from None
        # strict=False: the keys are exactly those get_state_dict produced (frozen weights left out on purpose,
        # they come back from --model_name_or_path); dcp.load already failed if the checkpoint lacked one.
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        try:
            self.scheduler.load_state_dict(checkpoint.load_torch_state(Path(path) / "scheduler.pt"))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint file {Path(path) / 'scheduler.pt'} does not fit this run: {exc}") from None


DCP_DIR = "fsdp"


def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Trainable state only (the LoRA adapter under LoRA): frozen weights are not part of a resume.
    return StateDictOptions(ignore_frozen_params=True)


def _safe_unpickler(file):
    """An unpickler for DCP's ``.metadata`` that builds only DCP's own metadata classes and torch's plain types.

    DCP reads ``.metadata`` with a bare ``pickle.load``, which can run arbitrary code from a crafted checkpoint;
    easysft's rule is that loading a checkpoint never runs code (``weights_only=True`` everywhere). The tensor
    payload (``*.distcp``) is raw storage bytes, and DCP reads non-tensor entries with weights-only ``torch.load``,
    so the metadata is the one pickle that needs guarding.
    """
    import builtins
    import collections
    import copyreg
    import pickle

    allowed_torch = {"Size", "dtype", "device", "layout", "memory_format", "_utils"}

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module.startswith("torch.distributed.checkpoint"):
                return super().find_class(module, name)
            if module == "torch" and (name in allowed_torch or isinstance(getattr(torch, name, None),
                                                                            (torch.dtype, torch.layout,
                                                                             torch.memory_format))):
                return getattr(torch, name)
            if module == "torch.serialization" and name == "_get_layout":  # layout by name, e.g. "torch.strided"
                return super().find_class(module, name)
            if module == "collections" and name in ("OrderedDict", "defaultdict"):
                return getattr(collections, name)
            if module == "copyreg" and name in ("__newobj__", "_reconstructor"):
                return getattr(copyreg, name)
            if module == "builtins" and name in ("object", "set", "frozenset", "tuple", "list", "dict", "slice"):
                return getattr(builtins, name)
            if module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath"):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refused to load {module}.{name} from a checkpoint's DCP metadata")

    return Restricted(file)


def _make_safe_reader():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeFileSystemReader(FileSystemReader):
        """FileSystemReader whose ``read_metadata`` uses :func:`_safe_unpickler` instead of ``pickle.load``."""

        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as handle:
                metadata = _safe_unpickler(handle).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeFileSystemReader


def SafeFileSystemReader(path):  # noqa: N802 -- a factory standing in for the class (imported lazily)
    return _make_safe_reader()(path)
