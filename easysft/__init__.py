"""easysft: easy, fast and affordable supervised fine-tuning of decoder-only language models.

The public API is small and lazily imported (``import easysft`` does not import torch)::

    easysft.load_examples(data_path, split="train", **options)   # rows -> Example(prompt, answer)
    easysft.tokenize_example(tokenizer, prompt, answer, max_prompt_len=..., max_ans_len=..., template="qa")
    easysft.collate(samples, pad_token_id)                       # right-padded tensors
    easysft.train(model_cfg, data_cfg, train_cfg, lora_cfg)      # -> TrainResult
    easysft.evaluate(model, samples, ...)                        # -> EvalResult(loss, perplexity, num_tokens)
"""

from __future__ import annotations

from easysft import quiet

__version__ = "0.1.0"

# Every entry point (the CLI, `python -m easysft.demo`, the Python API) imports this package first: the filters of
# the known-harmless third-party import lines (easysft/quiet.py) are in place before transformers is imported.
quiet.install()

_LAZY = {
    "load_examples": "easysft.data.sources",
    "Example": "easysft.data.sources",
    "tokenize_example": "easysft.data.tokenize",
    "Skip": "easysft.data.tokenize",
    "collate": "easysft.data.collate",
    # Implemented in modules whose names differ from the functions: importing ``easysft.training.loop`` sets the
    # attribute ``easysft.training``, never ``easysft.train``, so these names can not be shadowed by a submodule.
    "train": "easysft.training.loop",
    "TrainResult": "easysft.training.run",
    "evaluate": "easysft.evaluation",
    "EvalResult": "easysft.evaluation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'easysft' has no attribute {name!r}")
