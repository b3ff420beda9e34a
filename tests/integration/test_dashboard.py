"""`easysft dashboard` without a browser: run status from files, the metrics reader, the token, path escapes,
and the files a real (tiny) training run leaves for it, including chat from a resumable checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from dashboard_runs import train_record, write_run

from easysft.config import DashboardConfig
from easysft.dashboard import start, start_in_thread
from easysft.dashboard.api import Api, config_diff
from easysft.dashboard.runs import Forbidden, MetricsCache, Roots, resolve_inside, summarize
from easysft.errors import ConfigError


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def status_of(folder) -> str:
    return summarize("0", folder, MetricsCache())["status"]


def test_status_comes_from_the_files(tmp_path):
    assert status_of(write_run(tmp_path / "running", state="running", steps=3)) == "running"
    assert status_of(write_run(tmp_path / "killed", state="running", steps=3, pid=dead_pid())) == "failed"
    assert status_of(write_run(tmp_path / "preempted", state="preempted", steps=3)) == "preempted"
    assert status_of(write_run(tmp_path / "failed", state="failed", steps=3)) == "failed"
    finished = write_run(tmp_path / "finished", state="running", steps=3, pid=dead_pid())
    (finished / "config.json").write_text("{}")
    (finished / "easysft.json").write_text("{}")
    assert status_of(finished) == "finished"  # the final model is there, whatever the status file says

    # folders from before run_status.json: the newest checkpoint's reason, then the age of metrics.jsonl
    legacy = write_run(tmp_path / "legacy", state="running", steps=3, checkpoint_steps=(2,))
    (legacy / "run_status.json").unlink()
    assert status_of(legacy) == "running"
    (legacy / "checkpoints" / "step-2" / "trainer_state.json").write_text(json.dumps({"reason": "preempted"}))
    assert status_of(legacy) == "preempted"
    (legacy / "checkpoints" / "step-2" / "trainer_state.json").write_text(json.dumps({"reason": "save_steps"}))
    old = time.time() - 3600
    os.utime(legacy / "metrics.jsonl", (old, old))
    assert status_of(legacy) == "failed"


def test_metrics_reader_skips_malformed_lines_and_waits_for_a_half_written_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    cache = MetricsCache()
    path.write_text(json.dumps(train_record(1)) + "\n[1, 2]\n{broken\n" + '{"step": 2, "loss": Na', encoding="utf-8")
    assert [r["step"] for r in cache.records(path)] == [1]
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('N}\n{"step": 3, "loss": Infinity}\n')
    records = cache.records(path)
    assert [r["step"] for r in records] == [1, 2, 3] and records[1]["loss"] is None and records[2]["loss"] is None
    # --resume cuts the file back atomically (a new, shorter file): it is read again from the start
    path.write_text(json.dumps(train_record(1)) + "\n", encoding="utf-8")
    assert [r["step"] for r in cache.records(path)] == [1]


def test_paths_never_leave_the_roots(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "a", state="running", steps=2)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "a" / "link")
    for bad in ("../outside", "/etc", "a/../../outside", "a/link"):
        with pytest.raises(Forbidden):
            resolve_inside(root.resolve(), bad)
    roots = Roots([str(root)])
    assert [run_id for run_id, _ in roots.discover()] == ["0/a"]
    with pytest.raises(Forbidden):
        Api(roots).run_file("0/a", "link/x")


def test_config_diff_lists_only_differences():
    assert config_diff([{"a": 1, "b": [1]}, {"a": 2, "b": [1], "c": None}]) == [
        {"key": "a", "values": [1, 2]}, {"key": "c", "values": [None, None]}]


def _get(url: str, headers: dict | None = None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_token_is_required_off_localhost(tmp_path):
    write_run(tmp_path / "a", state="running", steps=2)
    server, url = start_in_thread(DashboardConfig(runs=[str(tmp_path)], host="0.0.0.0", port=0))
    try:
        token = url.split("?token=")[1]  # generated, and printed in the URL at start-up
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        assert _get(base)[0] == 401
        assert _get(base + "api/runs")[0] == 401
        assert _get(base + "api/runs?token=wrong-token")[0] == 401
        assert _get(base + "api/runs", {"Authorization": "Bearer wrong-token"})[0] == 401
        status, headers = _get(base + f"?token={token}")
        assert status == 200 and token in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
        assert _get(base + "api/runs", {"Cookie": f"easysft_dashboard_{server.server_address[1]}={token}"})[0] == 200
        assert _get(base + "api/runs", {"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_local_dashboard_refuses_foreign_host_headers_and_bad_flags(tmp_path):
    server, url = start_in_thread(DashboardConfig(runs=[str(tmp_path)], port=0))
    try:
        assert "token" not in url and _get(url)[0] == 200
        assert _get(url, {"Host": "attacker.example:80"})[0] == 401  # DNS rebinding
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ConfigError, match="--runs"):
        start(DashboardConfig(runs=[str(tmp_path / "missing")]))
    with pytest.raises(ConfigError, match="--auth_token"):
        DashboardConfig(runs=[str(tmp_path)], auth_token="short")


def test_cli_dashboard_help_and_error_are_one_line(tmp_path):
    from easysft.cli import main

    assert main(["dashboard", "--runs", str(tmp_path / "missing")]) == 2


def _chat_events(url: str, body: dict) -> list[tuple[str, dict]]:
    request = urllib.request.Request(url + "api/chat", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for frame in response.read().decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
            if "event" in lines:
                events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_a_real_run_writes_its_status_and_chats_from_final_model_and_checkpoints(
        tiny_model_dir, qa_data_dir, tmp_path, monkeypatch):
    from easysft.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
    from easysft.training.loop import train
    from easysft.training.signals import Preempted

    data = DataConfig(data_path=[qa_data_dir], max_prompt_len=32, max_ans_len=16)
    train(ModelConfig(tiny_model_dir), data, TrainConfig(output_dir=str(tmp_path / "full"), max_steps=2, save_steps=2,
                                                        per_device_train_batch_size=4, tensorboard=False))
    monkeypatch.setenv("EASYSFT_STOP_AFTER_STEP", "1")
    with pytest.raises(Preempted):
        train(ModelConfig(tiny_model_dir), data, TrainConfig(output_dir=str(tmp_path / "lora"), max_steps=3,
                                                            per_device_train_batch_size=4, tensorboard=False),
              LoraConfig(lora_dim=4))
    full = json.loads((tmp_path / "full" / "run_status.json").read_text())
    assert full["state"] == "finished" and full["pid"] == os.getpid()
    assert json.loads((tmp_path / "lora" / "run_status.json").read_text())["state"] == "preempted"

    server, url = start_in_thread(DashboardConfig(runs=[str(tmp_path)], port=0))
    try:
        runs = {r["id"]: r for r in Api(Roots([str(tmp_path)])).runs()}
        assert (runs["0/full"]["status"], runs["0/full"]["steps_done"]) == ("finished", 2)
        assert runs["0/lora"]["status"] == "preempted" and runs["0/lora"]["lora_dim"] == 4
        greedy = {"do_sample": False, "max_new_tokens": 8}
        answers = {}
        for run_id, model in (("0/full", "final"), ("0/full", "step-2"), ("0/lora", "step-1")):
            events = _chat_events(url, {"id": run_id, "model": model, "text": "What is 2 + 2?", "generation": greedy,
                                        "history": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
            names = [name for name, _ in events]
            assert names[-1] == "done", events
            answers[model] = events[-1][1]["answer"]
            streamed = "".join(data["text"] for name, data in events if name == "token")
            assert streamed.strip() == answers[model]
        # the checkpoint of the last step holds the final weights: same greedy answer
        assert answers["final"] == answers["step-2"]
        assert server.chat_host.loaded[1] == "step-1"  # one model at a time: the last one asked for
        error = _chat_events(url, {"id": "0/full", "model": "step-9", "text": "hi"})
        assert error[-1][0] == "error"
    finally:
        server.shutdown()
        server.server_close()
