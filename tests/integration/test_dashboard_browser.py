"""`easysft dashboard` driven in a real headless Chromium (Selenium + Debian's chromium/chromium-driver).

The run folders are written file by file (tests/dashboard_runs.py); the chat loads a real tiny model. Screenshots
of each page go to the test's temporary folder. Without a browser these tests skip with one line, except under
CI=true where a missing browser is a failure (`.ci/run` / `make setup` install it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request

import pytest
from dashboard_runs import PREDICTION_ROWS, eval_record, train_record, write_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not CHROMIUM or not CHROMEDRIVER:
        return "no chromium/chromedriver (apt-get install -y chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _browser_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests need a browser on CI: {reason}")
        pytest.skip(f"browser tests skipped: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, tiny_model_dir):
    """A dashboard (in a thread) over a finished run with a real tiny model and a running run."""
    from easysft.config import DashboardConfig
    from easysft.dashboard import start_in_thread

    root = tmp_path_factory.mktemp("runs")
    write_run(root / "finished-run", state="finished", steps=40, model_dir=tiny_model_dir, checkpoint_steps=(20, 40),
              predictions={20: PREDICTION_ROWS[:2], 40: PREDICTION_ROWS})
    write_run(root / "sweep" / "running-run", state="running", steps=12, learning_rate=1e-4)
    server, url = start_in_thread(DashboardConfig(runs=[str(root)], port=0))
    yield root, url
    server.shutdown()
    server.server_close()


def wait_for(condition, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_runs_list_shows_finished_and_running_runs(browser, dashboard, tmp_path):
    root, url = dashboard
    browser.get(url)
    rows = wait_for(lambda: css(browser, "#runs tr[data-run]"), what="the runs table")
    statuses = {r.get_attribute("data-run"): r.find_element("css selector", ".badge").text for r in rows}
    assert statuses == {"0/finished-run": "finished", "0/sweep/running-run": "running"}
    finished = css(browser, 'tr[data-run="0/finished-run"] td')
    assert "40 / 40" in [td.text for td in finished]
    # a new run appears without a reload
    write_run(root / "late-run", state="running", steps=3)
    wait_for(lambda: css(browser, 'tr[data-run="0/late-run"]'), what="the new run in the list")
    browser.save_screenshot(str(tmp_path / "runs.png"))


def test_appended_metrics_move_the_running_runs_chart(browser, dashboard, tmp_path):
    root, url = dashboard
    browser.get(url + "#/run/" + "0%2Fsweep%2Frunning-run")
    chart = wait_for(lambda: css(browser, '[data-chart="loss"][data-points]'), what="the loss chart")[0]
    before = int(chart.get_attribute("data-points"))
    assert chart.get_attribute("data-last-step") == "12"
    generation_charts = {c.get_attribute("data-chart") for c in css(browser, "[data-chart]")}
    assert {"eval_ppl", "eval_exact_match", "eval_rouge_l", "lr", "tokens_per_s", "grad_norm"} <= generation_charts
    with open(root / "sweep" / "running-run" / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(train_record(13)) + "\n" + "{not json\n" + json.dumps(train_record(14)) + "\n")
        handle.write(json.dumps(eval_record(14)) + "\n" + '{"step": 15, "loss": 0.5')  # the last line is half-written
    started = time.monotonic()
    wait_for(lambda: chart.get_attribute("data-last-step") == "14", timeout=5.0, what="the chart to reach step 14")
    moved_after = time.monotonic() - started
    assert int(chart.get_attribute("data-points")) == before + 3  # 2 train points + 1 eval point, bad lines skipped
    assert moved_after < 5.0
    browser.save_screenshot(str(tmp_path / "running-run.png"))


def test_data_report_and_predictions_render(browser, dashboard, tmp_path):
    _, url = dashboard
    browser.get(url + "#/run/0%2Ffinished-run")
    wait_for(lambda: css(browser, "#predictions tr.match"), what="the predictions table")
    cells = [[td.text for td in tr.find_elements("css selector", "td")] for tr in css(browser, "#predictions tr")[1:]]
    assert [c[1:] for c in cells] == [[r["prompt"], r["reference"], r["prediction"]] for r in PREDICTION_ROWS]
    assert not css(browser, "#predictions b")  # file text is shown as text, never parsed as HTML
    report = css(browser, "#data-report")[0].text
    assert "10 samples kept of 12 rows" in report and "empty_answer" in report and "data/train.json:7" in report
    assert len(css(browser, "#data-report .hist svg")) == 3  # prompt, answer and sample length histograms
    assert [c.text for c in css(browser, "#checkpoints td:first-child")] == ["step-20", "step-40"]
    assert "learning_rate" in css(browser, ".kv")[0].text
    browser.save_screenshot(str(tmp_path / "finished-run.png"))


def test_compare_overlays_runs_and_lists_config_differences(browser, dashboard, tmp_path):
    _, url = dashboard
    browser.get(url + "#/compare/0%2Ffinished-run,0%2Fsweep%2Frunning-run")
    rows = wait_for(lambda: css(browser, "#config-diff tr"), what="the config differences")
    keys = [r.find_elements("css selector", "td")[0].text for r in rows[1:]]
    assert "learning_rate" in keys and "seed" not in keys
    assert css(browser, '#compare-charts [data-chart="loss"]')
    browser.save_screenshot(str(tmp_path / "compare.png"))


def test_chat_streams_an_answer_from_the_tiny_model(browser, dashboard, tmp_path):
    _, url = dashboard
    browser.get(url + "#/run/0%2Ffinished-run")
    box = wait_for(lambda: css(browser, "#chat-input"), what="the chat input")[0]
    assert [o.get_attribute("value") for o in css(browser, "#chat-model option")] == ["final", "step-40", "step-20"]
    box.send_keys("What is 2 + 2?\n")
    turn = wait_for(lambda: css(browser, '.turn.assistant[data-state="done"], .turn.assistant[data-state="error"]'),
                    timeout=60, what="the answer")[0]
    assert turn.get_attribute("data-state") == "done", turn.text
    answer = turn.find_element("css selector", ".answer")
    assert answer.text.strip() and int(answer.get_attribute("data-pieces")) >= 2  # streamed in pieces
    browser.save_screenshot(str(tmp_path / "chat.png"))


def _status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_dot_dot_path_is_refused(dashboard):
    root, url = dashboard
    base = url.split("?")[0]
    (root / "secret.txt").write_text("no", encoding="utf-8")
    assert _status(base + "api/file?id=0%2Ffinished-run&path=metrics.jsonl") == 200
    assert _status(base + "api/file?id=0%2Ffinished-run&path=../secret.txt") == 403
    assert _status(base + "api/file?id=0%2Ffinished-run&path=%2Fetc%2Fpasswd") == 403
    assert _status(base + "api/run?id=0%2F..%2F..") == 403
    assert _status(base + "static/..%2Fserver.py") == 404
