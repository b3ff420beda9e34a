"""User-facing errors.

Every error a user can cause (bad flag, bad file, bad model path) is an :class:`EasySFTError`. The CLI prints
its message as ONE line and exits with ``exit_code``; no stack trace. Exit codes are documented in the README.
"""

from __future__ import annotations


class EasySFTError(Exception):
    """Base class: a problem with the user's input, reported as one line."""

    exit_code = 2


class ConfigError(EasySFTError):
    """A flag or config-file value is invalid or a combination is unsupported."""

    exit_code = 2


class DataError(EasySFTError):
    """A data file or dataset cannot be read, or yields no usable sample."""

    exit_code = 3


class ModelError(EasySFTError):
    """A model path does not exist or is not a causal language model."""

    exit_code = 4


class CheckpointError(EasySFTError):
    """A checkpoint is missing, incomplete or corrupted."""

    exit_code = 5


class TrainingError(EasySFTError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""

    exit_code = 6

