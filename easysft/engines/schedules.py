"""Learning-rate schedules (``--lr_scheduler_type``): the multiplier of the peak learning rate at each step.

The same curves as transformers' ``get_scheduler`` of the same names (``tests/unit/test_schedules.py`` compares them
step by step), built on ``torch.optim.lr_scheduler.LambdaLR`` here because importing ``transformers.optimization``
pulls in ``transformers.trainer_utils`` and, through it, peft, bitsandbytes and torchao: seconds of start-up and
lines of import noise on every run that uses none of them.

Every schedule warms up linearly from 0 over ``num_warmup_steps``; then ``constant*`` stays at 1, ``linear``
falls to 0 at ``num_training_steps``, ``cosine`` follows half a cosine to 0, ``cosine_with_restarts`` one hard
restart cycle, ``polynomial`` decays linearly (power 1) to an end rate of 1e-7.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim.lr_scheduler import LambdaLR

POLYNOMIAL_END_LR = 1e-7


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _constant(step: int, warmup: int, total: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, warmup: int, total: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _progress(step: int, warmup: int, total: int) -> float:
    return (step - warmup) / max(1, total - warmup)


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup, total))))


def _cosine_with_restarts(step: int, warmup: int, total: int, cycles: int = 1) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = _progress(step, warmup, total)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


def _polynomial(step: int, warmup: int, total: int, peak: float, end: float = POLYNOMIAL_END_LR,
                power: float = 1.0) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return end / peak
    remaining = 1 - (step - warmup) / max(1, total - warmup)  # transformers divides by zero when equal
    return ((peak - end) * remaining**power + end) / peak


SCHEDULES = {"linear": _linear, "cosine": _cosine, "cosine_with_restarts": _cosine_with_restarts,
             "polynomial": _polynomial, "constant": _constant, "constant_with_warmup": _constant_with_warmup}


def build_schedule(optimizer, name: str, num_warmup_steps: int, num_training_steps: int) -> LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` following the schedule ``name`` (module docstring)."""
    curve = SCHEDULES[name]
    if name == "polynomial":
        peak = optimizer.defaults["lr"]
        if not peak > POLYNOMIAL_END_LR:
            raise ValueError(f"polynomial schedule: the learning rate {peak} must exceed its end {POLYNOMIAL_END_LR}")
        curve = partial(curve, peak=peak)
    return LambdaLR(optimizer, partial(_call, curve, num_warmup_steps, num_training_steps))


def _call(curve, warmup: int, total: int, step: int) -> float:
    return curve(step, warmup, total)
