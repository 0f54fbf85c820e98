"""The server from the outside: alert rules under promtool, the Grafana dashboard against the real
metric names, a schemathesis fuzz of /openapi.json (no 5xx), and the playground in headless Chromium.

The tools are Debian packages that .ci/run installs; locally each test skips without its tool,
under CI (env CI set) it fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import requires_tool  # noqa: E402
from test_server import KEY, bpe_tok, model, serving  # noqa: E402,F401  (fixtures)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_alert_rules_pass_promtool():
    requires_tool("promtool")
    rules = DEPLOY / "prometheus" / "alerts.yml"
    check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 7 rules found" in check.stdout
    unit = subprocess.run(["promtool", "test", "rules", str(rules.with_name("alerts_test.yml"))],
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_dashboard_and_alerts_use_metrics_the_server_exports(model, bpe_tok):  # noqa: F811
    with serving(model, bpe_tok) as s:
        httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
        exported = set(re.findall(r"^(llmclock_\w+?)(?:\{| )", httpx.get(s.url + "/metrics", timeout=10).text, re.M))
    dash = json.loads((DEPLOY / "grafana" / "llmclock.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    used = set(re.findall(r"\bllmclock_\w+", " ".join(exprs) + rules))
    assert used and used <= exported, used - exported
    assert len(dash["panels"]) >= 6


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(model, bpe_tok, tmp_path):  # noqa: F811
    st = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed")
    with serving(model, bpe_tok, api_keys=[KEY], max_tokens=8) as s:
        run = subprocess.run(
            [st, "run", s.url + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "25",
             "--seed", "1", "--workers", "1",  # 2 workers: hypothesis hit CPython 3.11's ast.parse thread bug
             "--request-timeout", "60", "--no-color",
             "--header", f"Authorization: Bearer {KEY}", "--generation-database", "none",
             "--phases", "examples,coverage,fuzzing"],
            capture_output=True, text=True, timeout=400, cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        served = httpx.get(s.url + "/metrics", timeout=10).text
    assert "No issues found" in run.stdout or "passed" in run.stdout, run.stdout[-3000:]
    statuses = re.findall(r'llmclock_requests_total\{route="([^"]+)",status="(\d+)"\} (\S+)', served)
    assert sum(float(n) for r, code, n in statuses if r.startswith("/v1/")) > 50  # it really called the API
    assert not [(r, code) for r, code, _ in statuses if code.startswith("5") and r != "/ready"]  # /ready: 503 while loading


@pytest.fixture
def browser():
    requires_tool("chromium", "chromedriver")
    from selenium import webdriver

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_playground_streams_and_shows_the_clock(browser, model, bpe_tok):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(model, bpe_tok, api_keys=[KEY]) as s:
        want = httpx.post(s.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=10, json={
            "prompt": "First Citizen", "max_tokens": 30, "temperature": 0}).json()["choices"][0]["text"]
        browser.get(s.url + "/")
        find = browser.find_element
        find(By.ID, "key").send_keys(KEY)
        for field, value in (("prompt", "First Citizen"), ("max_tokens", "30"), ("temperature", "0")):
            find(By.ID, field).clear()
            find(By.ID, field).send_keys(value)
        s.slow(0.03)  # ~1 s of generation: time to see it arrive token by token
        find(By.ID, "send").click()
        wait = WebDriverWait(browser, 30, poll_frequency=0.01)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#strip .tok"))
        partial = len(browser.find_elements(By.CSS_SELECTOR, "#strip .tok"))
        status = find(By.ID, "status").text
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        del s.state.engine.step
        assert status == "streaming…" and partial < 30  # tokens showed up before the reply was complete
        assert find(By.ID, "output").text == want.strip() or find(By.ID, "output").get_attribute("textContent") == want
        cells = browser.find_elements(By.CSS_SELECTOR, "#strip .tok")
        assert len(cells) == 30 and all(c.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)" for c in cells)
        ActionChains(browser).move_to_element(cells[3]).perform()
        tip = find(By.ID, "tip")
        wait.until(lambda d: tip.is_displayed())
        assert len(tip.find_elements(By.CSS_SELECTOR, "#alts tr")) == 5
        stages = [r.text.split()[0] for r in tip.find_elements(By.CSS_SELECTOR, "#stages tr")]
        assert {"embed", "block0", "head", "sample"} <= set(stages)
        Select = __import__("selenium.webdriver.support.select", fromlist=["Select"]).Select
        before = cells[3].value_of_css_property("background-color")
        Select(find(By.ID, "colour")).select_by_value("latency")
        assert cells[3].value_of_css_property("background-color") != before or len(set(
            c.value_of_css_property("background-color") for c in cells)) > 1


@pytest.mark.slow
def test_llmclock_serve_answers_then_drains_on_sigterm(model, bpe_tok, tmp_path):  # noqa: F811
    import signal

    from llmclock.checkpoint import write_checkpoint
    from llmclock.server.run import listen

    ckpt = tmp_path / "run" / "ckpt"
    write_checkpoint(ckpt, model, bpe_tok)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# test key\n{KEY}\n")
    with listen("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "llmclock", "serve", "--ckpt", str(ckpt), "--port", str(port), "--slots", "4",
           "--api-keys-file", str(keys), "--redact", "--drain-timeout", "120", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(url + "/ready", timeout=5).json()["model"] == "run"
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"prompt": "First", "max_tokens": 40, "temperature": 0, "stream": True,
                "logit_bias": {str(bpe_tok.eot_id): -100}, "user": "mail me at x@y.org"}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=120) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)  # mid-stream: the server must finish this response
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert f"serving run on http://127.0.0.1:{port}" in out
    access = [json.loads(x) for x in err.splitlines() if x.startswith('{"ts"') and '"path"' in x]
    assert any(a["path"] == "/v1/completions" and a["status"] == 200 and a["completion_tokens"] == 40 for a in access)
    assert KEY not in err


def test_serve_command_rejects_bad_input(tmp_path, capsys):
    from llmclock.cli import main

    (tmp_path / "keys").write_text("short\n")
    for argv, why in ((["--ckpt", str(tmp_path / "missing")], "not found"),
                      (["--ckpt", str(tmp_path), "--slots", "0"], "--slots"),
                      (["--ckpt", str(tmp_path), "--port", "70000"], "--port"),
                      (["--ckpt", str(tmp_path), "--api-keys-file", str(tmp_path / "nokeys")], "keys file"),
                      (["--ckpt", str(tmp_path), "--api-keys-file", str(tmp_path / "keys")], "at least 8")):
        assert main(["serve", *argv]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("llmclock: error:") and why in err[0], err
