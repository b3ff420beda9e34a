"""--torch_compile compiles once for packed rows of any length (no recompile per row length)."""

from __future__ import annotations

import logging

import pytest
import torch

from easysft.config import DataConfig, ModelConfig, TrainConfig
from easysft.training.loop import train


class _RecompileCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.recompiles: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "Recompiling function" in record.getMessage():
            self.recompiles.append(record.getMessage())


@pytest.mark.slow  # dynamo traces the model (~1 min on 2 shared cores), even with the eager backend
def test_eight_packed_steps_of_different_lengths_recompile_at_most_twice(tiny_model_dir, qa_data_dir, tmp_path,
                                                                         monkeypatch):
    real_compile = torch.compile
    # Recompiles are decided by dynamo's guards, before any backend: the eager backend counts them as inductor
    # would, without compiling kernels.
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **(kw | {"backend": "eager"})))
    torch._dynamo.reset()
    counter = _RecompileCounter()
    torch._logging.set_logs(recompiles=True)
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(counter)
    try:
        result = train(ModelConfig(model_name_or_path=tiny_model_dir), DataConfig(data_path=[qa_data_dir]),
                       TrainConfig(output_dir=str(tmp_path / "o"), torch_compile=True, per_device_train_batch_size=1,
                                   max_steps=8, learning_rate=1e-3, tensorboard=False))
    finally:
        logger.removeHandler(counter)
        torch._logging.set_logs()
        torch._dynamo.reset()
    assert len(result.losses) == 8
    assert len(counter.recompiles) <= 2, counter.recompiles
