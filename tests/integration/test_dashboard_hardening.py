"""`easysft dashboard` against bad input (hunt cases D2-D9): a run folder with pathological files, symlinks out of
the runs folder, malformed request bodies, stalled clients, two dashboards on one host, foreign Host headers."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest
from dashboard_runs import PREDICTION_ROWS, train_record, write_run

from easysft.config import DashboardConfig
from easysft.dashboard import api as api_module
from easysft.dashboard import runs as runs_module
from easysft.dashboard import start, start_in_thread
from easysft.dashboard.server import Handler
from easysft.errors import ConfigError

DEEP = 200_000  # nesting that makes the json module raise RecursionError


@pytest.fixture
def dashboard(request):
    """``open(runs_folder, **config) -> (server, base URL)``; every server is shut down at the end."""
    servers = []

    def open_(folder, **config):
        server, url = start_in_thread(DashboardConfig(runs=[str(folder)], port=0, **config))
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/"

    yield open_
    for server in servers:
        server.shutdown()
        server.server_close()


def fetch(url: str, headers: dict | None = None, timeout: float = 20):
    """(status, headers, body bytes) of a GET, HTTP errors included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def raw(port: int, data: bytes, *, timeout: float = 5.0, close_write: bool = False) -> bytes:
    """Send ``data`` on a fresh connection and read the answer until the server closes it (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


# --- rule 1: one run's error never takes the runs list down (D2) ----------------------------------------------
def test_a_run_with_json_nested_200000_deep_is_listed_as_unreadable_and_the_others_still_are(tmp_path, dashboard):
    write_run(tmp_path / "good", state="running", steps=3)
    deep_metrics = write_run(tmp_path / "deep-metrics", state="running", steps=3)
    (deep_metrics / "metrics.jsonl").write_text(json.dumps(train_record(1)) + "\n" + "[" * DEEP + "\n")
    deep_config = write_run(tmp_path / "deep-config", state="running", steps=3)
    (deep_config / "train_config.json").write_text('{"a": ' + "[" * DEEP)
    server, base = dashboard(tmp_path)

    status, _, body = fetch(base + "api/runs")
    assert status == 200
    runs = {r["id"]: r for r in json.loads(body)["runs"]}
    assert runs["0/good"]["status"] == "running" and runs["0/good"]["steps_done"] == 3
    for bad in ("0/deep-metrics", "0/deep-config"):
        assert runs[bad]["status"] == "unreadable"
        assert "RecursionError" in runs[bad]["error"] and len(runs[bad]["error"]) < 300
    # the run's own page gets an answer too (not a dropped connection)
    status, headers, body = fetch(base + "api/run?id=0/deep-config")
    assert status == 500 and "RecursionError" in json.loads(body)["error"]


# --- rule 2: every file read or served for a run stays inside it, is regular and capped (D3) ---------------------
def test_run_files_that_lead_out_of_the_runs_folder_or_are_not_regular_files_are_refused(tmp_path, dashboard):
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(json.dumps({"prompt": "SECRET", "reference": "x", "prediction": "y"}) + "\n")
    (outside / "secret.json").write_text(json.dumps({"model_name_or_path": "SECRET"}))
    good = write_run(runs / "good", state="running", steps=3, predictions={10: PREDICTION_ROWS})
    os.symlink(outside / "secret.jsonl", good / "eval_predictions" / "step-77.jsonl")
    symcfg = write_run(runs / "symcfg", state="running", steps=3)
    (symcfg / "train_config.json").unlink()
    os.symlink(outside / "secret.json", symcfg / "train_config.json")
    symmetrics = write_run(runs / "symmetrics", state="running", steps=3)
    (symmetrics / "metrics.jsonl").unlink()
    os.symlink(outside / "secret.jsonl", symmetrics / "metrics.jsonl")
    zero = write_run(runs / "zero", state="running", steps=3)
    (zero / "data_report.json").unlink()
    os.symlink("/dev/zero", zero / "data_report.json")  # would be read forever
    fifo = write_run(runs / "fifo", state="running", steps=3)
    (fifo / "data_report.json").unlink()
    os.mkfifo(fifo / "data_report.json")  # would block the request thread
    server, base = dashboard(runs)

    status, _, body = fetch(base + "api/runs")
    assert status == 200 and b"SECRET" not in body
    listed = {r["id"]: r for r in json.loads(body)["runs"]}
    assert listed["0/good"]["status"] == "running"
    for bad in ("0/symcfg", "0/symmetrics"):
        assert listed[bad]["status"] == "unreadable" and "leads outside" in listed[bad]["error"]

    assert fetch(base + "api/predictions?id=0/good&step=10")[0] == 200
    status, _, body = fetch(base + "api/predictions?id=0/good&step=77")
    assert status == 403 and b"SECRET" not in body
    status, _, body = fetch(base + "api/run?id=0/symcfg")
    assert status == 403 and b"SECRET" not in body
    assert fetch(base + "api/metrics?id=0/symmetrics")[0] == 403
    assert fetch(base + "api/run?id=0/zero", timeout=10)[0] == 403
    status, _, body = fetch(base + "api/run?id=0/fifo", timeout=10)
    assert status == 404 and b"not a regular file" in body
    os.symlink(outside / "secret.json", good / "link.json")
    assert fetch(base + "api/file?id=0/good&path=link.json")[0] == 403
    assert fetch(base + "api/file?id=0/good&path=eval_predictions")[0] == 404  # a folder


def test_run_files_are_capped_and_served_as_inert_content(tmp_path, dashboard, monkeypatch):
    run = write_run(tmp_path / "a", state="running", steps=3)
    (run / "page.html").write_text("<script>alert(document.cookie)</script>")
    (run / "image.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    (run / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    server, base = dashboard(tmp_path)

    for name in ("page.html", "image.svg", "train_config.json", "loss.png"):
        status, headers, _ = fetch(base + f"api/file?id=0/a&path={name}")
        assert status == 200
        assert headers["Content-Type"].split(";")[0] in ("text/plain", "application/json", "image/png"), name
        assert headers["X-Content-Type-Options"] == "nosniff" and "sandbox" in headers["Content-Security-Policy"]
    assert fetch(base + "api/file?id=0/a&path=page.html")[1]["Content-Type"].startswith("text/plain")
    assert fetch(base + "api/file?id=0/a&path=loss.png")[1]["Content-Type"] == "image/png"

    monkeypatch.setattr(api_module, "MAX_SERVED_BYTES", 50)
    status, _, body = fetch(base + "api/file?id=0/a&path=loss.png")
    assert status == 404 and b"larger than" in body
    monkeypatch.setattr(runs_module, "MAX_JSON_BYTES", 50)  # train_config.json is longer
    status, _, body = fetch(base + "api/runs")
    row = json.loads(body)["runs"][0]
    assert row["status"] == "unreadable" and "larger than" in row["error"]


# --- rule 3: request bodies are bounded before they are read (D4) ---------------------------------------------
@pytest.mark.parametrize("length_header, status", [
    ("Content-Length: -1\r\n", 400), ("Content-Length: abc\r\n", 400), ("Content-Length: 1_0\r\n", 400),
    ("Content-Length: 5\r\nContent-Length: 6\r\n", 400), ("", 411), ("Transfer-Encoding: chunked\r\n", 411),
    (f"Content-Length: {2 << 20}\r\n", 413)])
def test_chat_bodies_need_a_sane_content_length_and_are_refused_before_reading(tmp_path, dashboard,
                                                                               length_header, status):
    write_run(tmp_path / "a", state="running", steps=2)
    server, _ = dashboard(tmp_path)
    head = ("POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{length_header}\r\n").encode()
    # the body keeps coming (the write side stays open): an answer means the server did not wait to read it all
    answer = raw(server.server_address[1], head + b" " * 4096)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]


# --- rule 4: backlog and socket timeouts (D6, D8) --------------------------------------------------------------
def test_stalled_clients_time_out_but_live_event_streams_do_not(tmp_path, dashboard, monkeypatch):
    assert Handler.timeout is not None and 0 < Handler.timeout <= 60  # the default; shortened here to test it
    monkeypatch.setattr(Handler, "timeout", 1.0)
    run = write_run(tmp_path / "a", state="running", steps=2)
    server, base = dashboard(tmp_path)
    assert server.request_queue_size == 128
    port = server.server_address[1]

    started = time.monotonic()
    assert raw(port, b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n", timeout=8) == b""  # never finishes its headers
    assert time.monotonic() - started < 6

    records = len((run / "metrics.jsonl").read_text().splitlines())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /api/events?id=0/a&from={records} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        time.sleep(2.5)  # longer than the socket timeout: the stream stays open
        with open(run / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(train_record(3)) + "\n")
        received = b""
        while b"event: metrics" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")


# --- rule 5: cookie per port, Host refusals and --host errors say what is wrong (D7, D9, DB5) -------------------
def test_cookie_name_carries_the_port_and_refusals_name_their_cause(tmp_path, dashboard):
    write_run(tmp_path / "a", state="running", steps=2)
    first, first_base = dashboard(tmp_path, host="0.0.0.0", auth_token="first-token-123456")
    second, second_base = dashboard(tmp_path, host="0.0.0.0", auth_token="second-token-123456")
    for server, base, token in ((first, first_base, "first-token-123456"), (second, second_base, "second-token-123456")):
        status, headers, _ = fetch(base + f"?token={token}")
        assert status == 200 and headers["Set-Cookie"].startswith(f"easysft_dashboard_{server.server_address[1]}=")
    # the browser sends both cookies to both ports: each dashboard picks its own
    both = {"Cookie": f"easysft_dashboard_{first.server_address[1]}=first-token-123456; "
                      f"easysft_dashboard_{second.server_address[1]}=second-token-123456"}
    assert fetch(first_base + "api/runs", both)[0] == 200 and fetch(second_base + "api/runs", both)[0] == 200
    assert fetch(first_base + "api/runs", {"Cookie": "easysft_dashboard=first-token-123456"})[0] == 401

    local, local_base = dashboard(tmp_path)
    for host in ("myhost:7860", "127.0.0.1:7861@evil.com"):
        status, _, body = fetch(local_base + "api/runs", {"Host": host})
        message = json.loads(body)["error"]
        assert status == 401 and "Host" in message and "not allowed" in message and "token" not in message

    with pytest.raises(ConfigError, match="--host") as raised:
        start(DashboardConfig(runs=[str(tmp_path)], host="999.1.1.1", port=0))
    assert "--port" not in str(raised.value)
