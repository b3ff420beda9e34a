"""Our LR schedules equal transformers' get_scheduler of the same name at every step (resume and the curves
users compare with other tools depend on it)."""

import pytest
import torch

from easysft.config.fields import LR_SCHEDULERS
from easysft.engines.optim import build_scheduler


def _rates(make, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    scheduler = make(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name", LR_SCHEDULERS)
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 17), (5, 5), (2, 1)])
def test_schedule_equals_transformers(name, warmup, total):
    from transformers import get_scheduler

    if name == "polynomial" and warmup == total:
        pytest.skip("transformers' polynomial schedule divides by zero when warmup == total (ours gives the peak rate at that one step)")
    ours = _rates(lambda opt: build_scheduler(opt, name=name, num_warmup_steps=warmup, num_training_steps=total),
                  total + 4)
    theirs = _rates(lambda opt: get_scheduler(name, optimizer=opt, num_warmup_steps=warmup,
                                              num_training_steps=max(total, 1)), total + 4)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_a_plain_training_schedule_does_not_import_peft_or_bitsandbytes():
    import subprocess
    import sys

    code = ("import sys, torch; from easysft.engines.optim import build_scheduler; "
            "o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0); "
            "build_scheduler(o, name='cosine', num_warmup_steps=1, num_training_steps=5); "
            "print(sorted(m for m in ('peft', 'bitsandbytes', 'transformers.trainer_utils') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
