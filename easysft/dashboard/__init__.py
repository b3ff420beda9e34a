"""`easysft dashboard`: a local web page over easysft output folders (runs, live curves, config, checkpoints, data
report, eval predictions, comparison, chat with any saved model).

Modules: :mod:`~easysft.dashboard.runs` (which folders are runs, their status and metrics, from files only),
:mod:`~easysft.dashboard.api` (the JSON the page reads), :mod:`~easysft.dashboard.chat_host` (one model at a
time, answers through :class:`easysft.chat.ChatSession`), :mod:`~easysft.dashboard.server` (HTTP, events,
token). The page is ``static/index.html`` + ``static/app.js``; the charts are uPlot (MIT, ``static/uPlot.*``),
shipped in the package: nothing is fetched from the network.
"""

from __future__ import annotations

import secrets
import threading

from easysft.config import DashboardConfig
from easysft.errors import ConfigError


def start(cfg: DashboardConfig):
    """Bind the server (it serves nothing until ``serve_forever``); returns ``(server, url)``.

    Off localhost without ``--auth_token`` a random token is generated; the returned URL carries it."""
    from pathlib import Path

    from easysft.dashboard.api import Api
    from easysft.dashboard.chat_host import ChatHost
    from easysft.dashboard.runs import Roots
    from easysft.dashboard.server import DashboardServer

    for folder in cfg.runs:
        if not Path(folder).expanduser().is_dir():
            raise ConfigError(f"--runs {folder}: no such folder; give the folder(s) holding your --output_dir runs.")
    token = cfg.auth_token or (None if cfg.is_local else secrets.token_urlsafe(18))
    try:
        server = DashboardServer((cfg.host, cfg.port), Api(Roots(cfg.runs)), ChatHost(cfg.dtype), token)
    except OSError as exc:
        raise ConfigError(listen_error(cfg.host, cfg.port, exc)) from None
    host = cfg.host if ":" not in cfg.host else f"[{cfg.host}]"
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{server.server_address[1]}/" + (f"?token={token}" if token else "")
    return server, url


def listen_error(host: str, port: int, exc: OSError) -> str:
    """Why binding failed, naming the flag to change: a host that does not resolve or is not an address of this
    machine is --host's fault, a port in use or not allowed is --port's."""
    import errno
    import socket

    reason = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on --host {host} ({reason}); give an address of this machine: 127.0.0.1 (this "
                "machine only) or 0.0.0.0 (every interface).")
    return f"cannot listen on {host}:{port} ({reason}); pick another --port."


def serve(cfg: DashboardConfig, *, ready=None) -> int:
    """Run the dashboard until Ctrl-C; prints the URL (with the token) first. ``ready(url)`` is for callers
    that start it in a thread."""
    server, url = start(cfg)
    print(f"easysft dashboard: {url}  (Ctrl-C stops it)", flush=True)
    if ready is not None:
        ready(url)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stopping.set()
        server.server_close()
    return 0


def start_in_thread(cfg: DashboardConfig):
    """``(server, url)`` with the server already answering in a daemon thread (tests, notebooks)."""
    server, url = start(cfg)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return server, url
