"""`llmclock serve --ray`: the same app as replicas on Ray Serve, autoscaled on ongoing requests.

The cluster test starts Ray's local cluster with 2 CPUs (one per replica): ~1-2 minutes, marked slow.
"""

import asyncio
import importlib
import os
import socket
import time

import pytest
import torch

from llmclock.checkpoint import write_checkpoint
from llmclock.config import preset
from llmclock.errors import LLMClockError
from llmclock.model import GPT
from llmclock.server.config import ServerConfig
from llmclock.server.replicas import ReplicaConfig

KEY = "ray-test-key-1"


def _require(module: str):
    """Skip without the `ray` extra, but fail under CI (env CI set), where `make setup` installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        msg = f"needs {module} (pip install 'llmclock[ray]')"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def test_replica_config_checks_its_bounds():
    auto = ReplicaConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=4).autoscaling()
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (
        1, 1, 3, 4)
    with pytest.raises(LLMClockError, match="--max-replicas 1 is below --min-replicas 2"):
        ReplicaConfig(min_replicas=2, max_replicas=1)
    with pytest.raises(LLMClockError, match="target_ongoing_requests must be"):
        ReplicaConfig(target_ongoing_requests=0)


def _completions_by_replica(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["replica"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "llmclock_requests_total" and s.labels["route"] == "/v1/completions"
            and s.labels["status"] == "200"}


def test_metrics_of_several_replicas_merge_into_one_export():
    from llmclock.server.metrics import Metrics, merge

    a, b = Metrics(), Metrics()
    a.requests.labels("/v1/completions", "200").inc(3)
    b.requests.labels("/v1/completions", "200").inc(4)
    b.ttft.observe(0.02)
    text = merge({"r1": a.render()[0], "r2": b.render()[0]}).decode()
    assert _completions_by_replica(text) == {"r1": 3.0, "r2": 4.0}
    assert 'llmclock_time_to_first_token_seconds_count{replica="r2"} 1.0' in text
    assert text.count("# TYPE llmclock_requests_total counter") == 1  # one family, a sample per replica


@pytest.mark.slow
def test_ray_serve_scales_to_two_replicas_under_a_burst_and_back(tmp_path, char_tok, monkeypatch):
    ray = _require("ray")
    httpx = _require("httpx")
    from llmclock.server.replicas import replica_count, start, stop

    # replicas report their load every 0.5 s (Ray's default: 10 s), so the test sees decisions quickly
    monkeypatch.setenv("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "ckpt", GPT(preset("test", vocab_size=char_tok.vocab_size, block_size=128)), char_tok)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(ckpt=str(tmp_path / "ckpt"), port=port, slots=2, queue=16, api_keys=[KEY])
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": config.model_name, "prompt": "First Citizen:", "max_tokens": 48, "temperature": 1.0}
    try:
        start(config, ReplicaConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0.5,
                                    downscale_delay_s=5, look_back_period_s=2))
        assert replica_count() == 1
        assert httpx.get(base + "/ready").json()["status"] == "ready"  # started = model loaded
        assert httpx.post(base + "/v1/completions", json=body).status_code == 401  # the app's keys, per replica
        # Streaming through Ray Serve's proxy: server-sent events, one per token, then [DONE].
        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, headers=auth,
                          timeout=60) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert len(events) > 2 and events[-1] == "data: [DONE]"

        statuses, seen = [], []

        async def burst():
            stop_at = None

            async def client(c):
                while stop_at is None or time.monotonic() < stop_at:
                    r = await c.post(base + "/v1/completions", json=body, headers=auth)
                    statuses.append(r.status_code)

            async with httpx.AsyncClient(timeout=120) as c:
                clients = [asyncio.create_task(client(c)) for _ in range(6)]
                deadline = time.monotonic() + 150
                while stop_at is None:
                    await asyncio.sleep(0.5)
                    seen.append(await asyncio.to_thread(replica_count))
                    if seen[-1] == 2 or time.monotonic() > deadline:
                        stop_at = time.monotonic() + 3  # a few more seconds across both replicas
                await asyncio.gather(*clients)

        asyncio.run(burst())
        assert max(seen) == 2, f"did not scale up: replica counts {seen}"
        assert statuses and set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
        # /metrics through the proxy, whichever replica answers: every replica's, labelled with its id,
        # adding up to all the completions answered (replicas push theirs every second)
        answered, deadline = len(statuses) + 1, time.monotonic() + 10  # + the streamed one
        while True:
            per = _completions_by_replica(httpx.get(base + "/metrics", timeout=10).text)
            if len(per) == 2 and sum(per.values()) == answered or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert len(per) == 2 and sum(per.values()) == answered and min(per.values()) > 0, (per, answered)
        deadline = time.monotonic() + 90
        while replica_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replica_count() == 1  # quiet again: back down to min_replicas
    finally:
        stop()
