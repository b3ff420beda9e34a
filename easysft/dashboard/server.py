"""The HTTP server: the standard library's ThreadingHTTPServer, JSON endpoints, server-sent events, the token check.

Endpoints (all GET unless said; ``id`` is a run id):
    /                       the page (static/index.html); /static/NAME its scripts, styles, uPlot
    /api/runs               the runs list (the page polls it: new runs appear without a reload)
    /api/run?id=            details: summary, resolved config, checkpoints, data report, prediction steps
    /api/metrics?id=&from=  metrics.jsonl records from index ``from``
    /api/events?id=&from=   server-sent events: ``metrics`` (new records, checked every 0.5 s) and ``summary``
    /api/predictions?id=&step=   eval_predictions/step-N.jsonl rows
    /api/file?id=&path=     a file inside the run folder (e.g. loss.png); paths leading out are refused (403);
                            served inert: images as such, JSON as JSON, anything else as text/plain, sandboxed
    /api/compare?ids=a,b    records of each run and their config differences
    POST /api/chat          JSON {id, model, text, history, system, generation, seed} -> event stream
                            ``token`` {text} ... then ``done`` {answer} or ``error`` {message}

Safety: with a token (required off localhost) every request must carry it: ``Authorization: Bearer T``, the
``easysft_dashboard_<port>`` cookie (one per port: two dashboards on one host do not overwrite each other's), or
``?token=T`` (which also sets the cookie). Without a token (local only) the ``Host`` header must name a local
address, so a web page cannot reach the server through DNS rebinding; chat requires ``Content-Type:
application/json``, which a cross-site form cannot send without a CORS preflight that this server never grants.
Bounds: POST bodies need a ``Content-Length`` of at most :data:`MAX_BODY_BYTES`; sockets time out after
:data:`SOCKET_TIMEOUT_SECONDS` of no progress (a stalled client frees its thread; event streams write at least
every :data:`KEEPALIVE_SECONDS`, so a reading client never hits it); the listen backlog is 128.
"""

from __future__ import annotations

import hmac
import json
import mimetypes
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from easysft.dashboard.api import Api, static_file
from easysft.dashboard.runs import Forbidden, NotFound, Refused, finite
from easysft.errors import EasySFTError

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "easysft_dashboard"  # + "_<port>": see cookie_name
EVENT_POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 10.0
MAX_BODY_BYTES = 1 << 20
SOCKET_TIMEOUT_SECONDS = 60.0
LOCAL_HOST_NAMES = ("127.0.0.1", "localhost", "[::1]")
_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")
_DIGITS = re.compile(r"[0-9]{1,15}")
# Served as themselves by /api/file; anything else is text/plain (never HTML, SVG or script of this origin).
INERT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".json": "application/json; charset=utf-8"}


def host_name(header: str) -> str:
    """The host part of a ``Host`` header: ``127.0.0.1:7860`` -> ``127.0.0.1``, ``[::1]:80`` -> ``[::1]``; ""
    for anything else (``127.0.0.1:80@evil.com``)."""
    match = _HOST_HEADER.fullmatch(header.strip())
    return match.group(1) if match else ""


def cookie_name(port: int) -> str:
    """``easysft_dashboard_<port>``: cookies ignore ports, so one name per port keeps two dashboards on one
    host from logging each other out (and one's token from being sent to the other)."""
    return f"{COOKIE}_{port}"


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True  # open event streams must not keep the process alive at exit
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops connections when tabs, polls and streams arrive together

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
    timeout = SOCKET_TIMEOUT_SECONDS  # per socket operation: a client that stalls mid-request frees its thread

    def log_message(self, format, *args) -> None:  # noqa: A002 -- quiet: the terminal is the user's
        pass

    # --- plumbing -----------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self._responded = True
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
        self._responded = True
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
    def _authorized(self, query: dict) -> tuple[str | None, dict]:
        """(None when allowed, else why not; extra response headers): see the module docstring."""
        token = self.server.token
        cookie_key = cookie_name(self.server.server_address[1])
        if token is None:
            host = self.headers.get("Host") or ""
            if host_name(host) in LOCAL_HOST_NAMES:
                return None, {}
            return (f"Host {host[:100]!r} is not allowed: this dashboard listens on a local address only; open it as "
                    "http://127.0.0.1:PORT/ or http://localhost:PORT/, or start it with --host 0.0.0.0 "
                    "to reach it by another name"), {}
        offered = []
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            offered.append(auth[7:].strip())
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == cookie_key:
                offered.append(value)
        from_query = query.get("token", [None])[0]
        if from_query:
            offered.append(from_query)
        if not any(hmac.compare_digest(o.encode(), token.encode()) for o in offered):
            return "missing or wrong token: open the URL printed at start-up (it carries ?token=...)", {}
        cookie = f"{cookie_key}={token}; HttpOnly; SameSite=Strict; Path=/" if from_query else None
        return None, ({"Set-Cookie": cookie} if cookie else {})

    # --- requests -----------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 -- the stdlib's name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._responded = False
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        refusal, headers = self._authorized(query)
        if refusal is not None:
            self.close_connection = self.close_connection or method == "POST"  # its body is left unread
            self._error(401, refusal)
            return
        try:
            if method == "POST" and url.path == "/api/chat":
                self._chat()
            elif method != "GET":
                self.close_connection = True
                self._error(405, f"{method} is not allowed here")
            elif url.path in ("/", "/index.html"):
                self._file(STATIC / "index.html", headers)
            elif url.path.startswith("/static/"):
                self._file(static_file(STATIC, url.path[len("/static/"):]), headers)
            elif url.path == "/api/events":
                self._events(query["id"][0], int(query.get("from", ["0"])[0]))
            elif url.path == "/api/file":
                self._run_file(query["id"][0], query["path"][0], headers)
            else:
                self._json(self._get_json(url.path, query), headers=headers)
        except Forbidden:
            self._error(403, "that path leads outside the dashboard's folders")
        except Refused as exc:
            self._error(404, f"not served: {exc}")
        except (NotFound, FileNotFoundError):
            self._error(404, "not found")
        except (KeyError, ValueError, IndexError):
            self._error(400, "missing or malformed query parameter")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 -- e.g. RecursionError from a run's JSON: an answer, not a dropped
            self.close_connection = True  # connection and a traceback on the user's terminal
            if not self._responded:
                detail = str(exc).splitlines()[0][:200] if str(exc) else ""
                self._error(500, f"cannot answer this request: {type(exc).__name__}: {detail}")

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
        """A file of the page itself (easysft/dashboard/static)."""
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        self._send(200, path.read_bytes(), content_type, headers)

    def _run_file(self, run_id: str, relative: str, headers: dict) -> None:
        """A file of a run folder, as inert content: an image or JSON as such, anything else as text/plain (an
        .html or .svg someone left in a run folder must not become a page of the dashboard's origin); the
        sandbox policy keeps even a mis-sniffed body from running script."""
        body = self.server.api.run_file(run_id, relative)
        content_type = INERT_TYPES.get(Path(relative).suffix.lower(), "text/plain; charset=utf-8")
        self._send(200, body, content_type, {**headers, "Content-Security-Policy": "sandbox; default-src 'none'"})

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

    def _body(self) -> bytes | None:
        """The request body, or None after refusing it: a ``Content-Length`` is required (411), must be one
        plain non-negative integer (400) and at most :data:`MAX_BODY_BYTES` (413); checked before reading."""
        values = self.headers.get_all("Content-Length") or []
        if not values:
            status, message = 411, "a Content-Length header is required"
        elif len(set(v.strip() for v in values)) != 1 or not _DIGITS.fullmatch(values[0].strip()):
            status, message = 400, "malformed Content-Length"
        elif int(values[0]) > MAX_BODY_BYTES:
            status, message = 413, "request too large"
        else:
            return self.rfile.read(int(values[0]))
        self.close_connection = True  # the body (if any) is left unread
        self._error(status, message)
        return None

    def _chat(self) -> None:
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            self.close_connection = True  # its body is left unread
            self._error(415, "chat requests must be application/json")
            return
        body = self._body()
        if body is None:
            return
        try:
            request = json.loads(body or b"{}")
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
