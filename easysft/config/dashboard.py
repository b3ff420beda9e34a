"""Settings of `easysft dashboard` (the local web page over output folders)."""

from __future__ import annotations

from dataclasses import dataclass, field

from easysft.config.fields import _help
from easysft.dtypes import DTYPE_CHOICES
from easysft.errors import ConfigError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class DashboardConfig:
    """Which folders the dashboard shows and where it listens."""

    runs: list[str] = field(
        default_factory=lambda: ["."],
        metadata=_help("Folders searched (recursively) for easysft output folders; only files under them are "
                       "served.", nargs="+"),
    )
    host: str = field(default="127.0.0.1", metadata=_help(
        "Address to bind. Anything but 127.0.0.1/localhost/::1 requires a token on every request."))
    port: int = field(default=7860, metadata=_help("Port to bind (0 picks a free one)."))
    auth_token: str | None = field(default=None, metadata=_help(
        "Token every request must carry (?token=T once, then a cookie; or 'Authorization: Bearer T'). Required "
        "off localhost: when not given there, a random one is generated and printed at start-up."))
    dtype: str = field(default="auto", metadata=_help(
        "dtype of the model loaded for chat: auto (bf16 on a CUDA GPU with bf16, fp32 on CPU), fp32, bf16 or fp16."))

    def __post_init__(self) -> None:
        if isinstance(self.runs, str):
            self.runs = [self.runs]
        if not self.runs:
            raise ConfigError("--runs needs at least one folder.")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}.")
        if self.auth_token is not None and len(self.auth_token) < 8:
            raise ConfigError("--auth_token must be at least 8 characters long.")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPE_CHOICES)}.")

    @property
    def is_local(self) -> bool:
        """True when only this machine can reach the server (no token needed)."""
        return self.host in LOCAL_HOSTS
