"""The HTTP server: the standard library's ThreadingHTTPServer, JSON endpoints, server-sent events, the token check.

Endpoints (all GET unless said; ``id`` is a run id):
    /                       the page (static/index.html); /static/NAME its scripts, styles, uPlot
    /api/runs               the runs list (the page polls it: new runs appear without a reload)
    /api/run?id=            details: summary, resolved config, checkpoints, data report, prediction steps
    /api/metrics?id=&from=  metrics.jsonl records from index ``from``
    /api/events?id=&from=   server-sent events: ``metrics`` (new records, checked every 0.5 s) and ``summary``
    /api/predictions?id=&step=   eval_predictions/step-N.jsonl rows
    /api/file?id=&path=     a file inside the run folder (e.g. loss.png); paths leading out are refused (403)
    /api/compare?ids=a,b    records of each run and their config differences
    POST /api/chat          JSON {id, model, text, history, system, generation, seed} -> event stream
                            ``token`` {text} ... then ``done`` {answer} or ``error`` {message}

Safety: with a token (required off localhost) every request must carry it: ``Authorization: Bearer T``, the
``easysft_dashboard`` cookie, or ``?token=T`` (which also sets the cookie). Without a token (local only) the
``Host`` header must name a local address, so a web page cannot reach the server through DNS rebinding; chat
requires ``Content-Type: application/json``, which a cross-site form cannot send without a CORS preflight that
this server never grants.
"""

from __future__ import annotations

import hmac
import json
import mimetypes
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from easysft.dashboard.api import Api, static_file
from easysft.dashboard.runs import Forbidden, NotFound, finite
from easysft.errors import EasySFTError

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "easysft_dashboard"
EVENT_POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 10.0
MAX_BODY_BYTES = 1 << 20
LOCAL_HOST_NAMES = ("127.0.0.1", "localhost", "[::1]")


def host_name(header: str) -> str:
    """The host part of a ``Host`` header: ``127.0.0.1:7860`` -> ``127.0.0.1``, ``[::1]:80`` -> ``[::1]``."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True  # open event streams must not keep the process alive at exit
    allow_reuse_address = True

    def __init__(self, address, api: Api, chat_host, token: str | None):
        self.api, self.chat_host, self.token = api, chat_host, token
        self.stopping = threading.Event()
        super().__init__(address, Handler)

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 -- quiet: the terminal is the user's
        pass

    # --- plumbing -----------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(finite(value), ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", headers)

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _event(self, name: str, data) -> None:
        payload = json.dumps(finite(data), ensure_ascii=False, allow_nan=False)
        self.wfile.write(f"event: {name}\ndata: {payload}\n\n".encode())
        self.wfile.flush()

    # --- the token ----------------------------------------------------------------------------------------
    def _authorized(self, query: dict) -> tuple[bool, dict]:
        """(allowed, extra response headers): see the module docstring."""
        token = self.server.token
        if token is None:
            return host_name(self.headers.get("Host") or "") in LOCAL_HOST_NAMES, {}
        offered = []
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            offered.append(auth[7:].strip())
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                offered.append(value)
        from_query = query.get("token", [None])[0]
        if from_query:
            offered.append(from_query)
        if not any(hmac.compare_digest(o.encode(), token.encode()) for o in offered):
            return False, {}
        cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/" if from_query else None
        return True, ({"Set-Cookie": cookie} if cookie else {})

    # --- requests -----------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 -- the stdlib's name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        allowed, headers = self._authorized(query)
        if not allowed:
            self._error(401, "missing or wrong token: open the URL printed at start-up (it carries ?token=...)")
            return
        try:
            if method == "POST" and url.path == "/api/chat":
                self._chat()
            elif method != "GET":
                self._error(405, f"{method} is not allowed here")
            elif url.path in ("/", "/index.html"):
                self._file(STATIC / "index.html", headers)
            elif url.path.startswith("/static/"):
                self._file(static_file(STATIC, url.path[len("/static/"):]), headers)
            elif url.path == "/api/events":
                self._events(query["id"][0], int(query.get("from", ["0"])[0]))
            elif url.path == "/api/file":
                self._file(self.server.api.run_file(query["id"][0], query["path"][0]), headers)
            else:
                self._json(self._get_json(url.path, query), headers=headers)
        except Forbidden:
            self._error(403, "that path leads outside the dashboard's folders")
        except (NotFound, FileNotFoundError):
            self._error(404, "not found")
        except (KeyError, ValueError, IndexError):
            self._error(400, "missing or malformed query parameter")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _get_json(self, path: str, query: dict):
        api = self.server.api
        if path == "/api/runs":
            return {"runs": api.runs(), "now": time.time()}
        if path == "/api/run":
            return api.run(query["id"][0])
        if path == "/api/metrics":
            return {"records": api.metrics(query["id"][0], int(query.get("from", ["0"])[0]))}
        if path == "/api/predictions":
            return api.predictions(query["id"][0], int(query["step"][0]))
        if path == "/api/compare":
            ids = [i for i in query["ids"][0].split(",") if i]
            return api.compare(ids)
        raise NotFound(path)

    def _file(self, path: Path, headers: dict) -> None:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        self._send(200, path.read_bytes(), content_type, headers)

    def _events(self, run_id: str, start: int) -> None:
        """Stream new metrics records (and the run's summary with them) until the client goes away."""
        api = self.server.api
        api.roots.run_folder(run_id)  # 404 before the stream starts
        self._start_events()
        sent, last_write = start, time.monotonic()
        while not self.server.stopping.is_set():
            records = api.metrics(run_id)
            if len(records) < sent:  # the file was cut back (a resume): start over
                sent = 0
                self._event("reset", {})
            if len(records) > sent:
                self._event("metrics", {"from": sent, "records": records[sent:]})
                self._event("summary", api.summary(run_id))
                sent, last_write = len(records), time.monotonic()
            elif time.monotonic() - last_write > KEEPALIVE_SECONDS:
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
                last_write = time.monotonic()
            time.sleep(EVENT_POLL_SECONDS)

    def _chat(self) -> None:
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            self._error(415, "chat requests must be application/json")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._error(413, "request too large")
            return
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
            folder = self.server.api.roots.run_folder(str(request["id"]))
            text = str(request["text"])
        except (ValueError, KeyError, TypeError):
            self._error(400, "chat needs JSON with id, model and text")
            return
        self._start_events()
        try:
            answer = self.server.chat_host.reply(
                folder, str(request.get("model") or "final"), text, history=request.get("history"),
                system=request.get("system"), generation=request.get("generation"),
                seed=int(request.get("seed") or 1234), on_text=lambda piece: self._event("token", {"text": piece}))
        except EasySFTError as exc:
            self._event("error", {"message": str(exc)})
            return
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as exc:  # noqa: BLE001 -- a model that fails to load or generate: say so on the page
            self._event("error", {"message": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            return
        self._event("done", {"answer": answer})
