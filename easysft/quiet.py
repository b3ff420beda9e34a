"""Known-harmless third-party log lines, kept off the console of every easysft command.

Importing transformers imports the optional low-memory packages when they are installed (torchao through its
quantizers, deepspeed through its integrations), on runs that use none of them, and their import-time lines read
like failures to a user. Each filter below drops exactly one message, and says why it is harmless; anything else
those loggers say still prints.
"""

from __future__ import annotations

import logging

# (logger name, text the message starts with or contains, why it is harmless)
HARMLESS = (
    ("torchao", "Failed to load ",
     "torchao's optional compiled kernels (mxfp8, CUTLASS) exist only for some CUDA builds; nothing of easysft's "
     "default path calls them, and --optim adamw_4bit fails with its own message if torchao cannot run"),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported",
     "a deprecation notice about torchao's enum registration at import, not about this run"),
    ("DeepSpeed", "Setting accelerator to CPU",
     "DeepSpeed's note that it found no GPU, printed whenever transformers asks it about ZeRO-3 on a CPU machine"),
)


class _DropHarmless(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a malformed record is not ours to judge: let it through
            return True
        return self.text not in message


def install() -> None:
    """Attach the filters (idempotent); call before transformers is imported."""
    for name, text, _why in HARMLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) and f.text == text for f in logger.filters):
            logger.addFilter(_DropHarmless(text))
