"""The HTTP server against the official `openai` client and plain HTTP: outputs equal the engine's
own, streaming, continuous batching, disconnects, keys, limits, errors, metrics, masking.

Every server here listens on 127.0.0.1 on a free port, runs in a thread of this process, and is
stopped by its fixture; every request has a timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from llmclock.config import preset  # noqa: E402
from llmclock.engine import Engine, SamplingParams  # noqa: E402
from llmclock.model import GPT  # noqa: E402
from llmclock.server import ServerConfig, create_app  # noqa: E402
from llmclock.server.security import luhn_ok, redact  # noqa: E402
from llmclock.tokenizer import Tokenizer  # noqa: E402

from conftest import CORPUS  # noqa: E402

KEY = "sk-test-0123456789abcdef"
PROMPTS = ["First Citizen:\n", "All:\nSpeak", "You are all resolved", "Caius Marcius is"]


@pytest.fixture(scope="session")
def bpe_tok():
    return Tokenizer.train_bpe([CORPUS], vocab_size=320)  # byte-level: any text the fuzzer sends round-trips


@pytest.fixture(scope="session")
def model(bpe_tok):
    torch.manual_seed(0)
    return GPT(preset("test", vocab_size=bpe_tok.vocab_size, block_size=256)).eval()


class Served:
    """A running server: base URL, its app (engine, metrics) and the log lines it wrote."""

    def __init__(self, url: str, app, logs: list[str]):
        self.url, self.app, self.logs = url, app, logs
        self.state = app.state.server

    def client(self, key: str | None = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", timeout=30, max_retries=0, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def slow(self, seconds: float) -> None:
        """Make every engine cycle take at least `seconds` (to watch things happen mid-generation)."""
        eng = self.state.engine
        step = eng.step

        def slow_step():
            time.sleep(seconds)
            return step()

        eng.step = slow_step


_ids = itertools.count()


class _Lines:
    def __init__(self, out: list[str]):
        self.out = out

    def write(self, s: str) -> None:
        self.out.extend(x for x in s.splitlines() if x)

    def flush(self) -> None: ...


@contextlib.contextmanager
def serving(model, tok, **cfg):
    """Start a server on a free loopback port in a thread; stop it (and its engine loop) on exit."""
    import uvicorn

    from llmclock.server.run import configure_logging, draining_server, listen

    config = ServerConfig(**{"slots": 8, "model_name": "tiny", **cfg})
    logs: list[str] = []
    access = logging.getLogger(f"llmclock.test.access{next(_ids)}")  # one per server: tests read their own
    app = create_app(config, model=model, tokenizer=tok, access_log=access)
    configure_logging(config, _Lines(logs), access)
    sock = listen("127.0.0.1", 0)
    server = draining_server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5),
                             app.state.server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    served = Served(url, app, logs)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError("server did not become ready")
        served.server = server
        yield served
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


SHARED = {"api_keys": [KEY], "queue": 32, "max_tokens": 200}


@pytest.fixture(scope="module", params=["thread", "process"])
def srv(request, model, bpe_tok, tmp_path_factory):
    """The shared server, twice: the engine on a thread (the model in memory), and in a process of its
    own (the same model from a checkpoint, as `llmclock serve --ckpt` runs it)."""
    if request.param == "thread":
        with serving(model, bpe_tok, **SHARED) as s:
            yield s
        return
    from llmclock.checkpoint import write_checkpoint

    ckpt = tmp_path_factory.mktemp("srv") / "tiny"
    write_checkpoint(ckpt, model, bpe_tok)
    with serving(None, None, ckpt=str(ckpt), **SHARED) as s:
        assert s.state.engine is None
        yield s


@pytest.fixture(scope="module")
def tsrv(model, bpe_tok):
    """The engine on a thread of the server, for tests that slow its cycles or look at it."""
    with serving(model, bpe_tok, **SHARED) as s:
        yield s


def engine_text(model, tok, prompt: str, **kw) -> str:
    """The reference: the same request on the engine alone, one slot."""
    return Engine(model, tok, slots=1).complete([prompt], SamplingParams(**kw))[0].text


def metric(served: Served, name: str, labels: str = "") -> float:
    text = httpx.get(served.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else "")) and labels in line or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------------------ the OpenAI client


def test_completions_match_the_engine(srv, model, bpe_tok):
    c = srv.client()
    r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert r.choices[0].text == engine_text(model, bpe_tok, PROMPTS[0], max_new_tokens=20, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(bpe_tok.encode(PROMPTS[0]))
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    streamed = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [m.id for m in c.models.list().data] == ["tiny"]


def test_chat_uses_the_chat_template(srv, model, bpe_tok):
    from llmclock.chat import STOP, render

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak."}]
    want = engine_text(model, bpe_tok, render(msgs), max_new_tokens=24, temperature=0, stop=STOP)
    c = srv.client()
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want


def test_stop_logprobs_and_seed(srv):
    c = srv.client()
    full = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0).choices[0].text
    stop = full[8:10]
    cut = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"

    lp = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=3).choices[0]
    assert len(lp.logprobs.tokens) == len(lp.logprobs.token_logprobs) == len(lp.logprobs.top_logprobs) == 8
    for tok, v, top in zip(lp.logprobs.tokens, lp.logprobs.token_logprobs, lp.logprobs.top_logprobs):
        assert v <= 0 and len(top) <= 3 and max(top.values()) == pytest.approx(v, abs=1e-5)  # greedy: chosen is top
    ch = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                   temperature=0, logprobs=True, top_logprobs=2).choices[0]
    assert len(ch.logprobs.content) == 5 and all(len(t.top_logprobs) == 2 for t in ch.logprobs.content)

    def sample(seed):
        return c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=1.0, seed=seed,
                                    n=2).choices

    a, b, other = sample(7), sample(7), sample(8)
    assert [x.text for x in a] == [x.text for x in b]
    assert a[0].text != a[1].text and [x.text for x in a] != [x.text for x in other]


def test_sixteen_concurrent_streams_equal_their_solo_runs(tsrv, model, bpe_tok):
    prompts = [PROMPTS[i % 4] + " " * (i // 4) for i in range(16)]
    want = [engine_text(model, bpe_tok, p, max_new_tokens=40, temperature=0) for p in prompts]
    c = tsrv.client()

    def stream(p):
        return "".join(ch.choices[0].text for ch in c.completions.create(
            model="tiny", prompt=p, max_tokens=40, temperature=0, stream=True))

    tsrv.slow(0.002)  # so the 16 overlap: slots fill, the rest queue and join as slots free
    try:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(stream, prompts))
    finally:
        del tsrv.state.engine.step
    assert got == want
    assert metric(tsrv, "llmclock_busy_slots") == 0 and metric(tsrv, "llmclock_queue_depth") == 0


def test_trace_over_http(srv):
    c = srv.http(headers={"Authorization": f"Bearer {KEY}"})
    body = {"prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0, "llmclock": {"trace": True}}
    r = c.post("/v1/completions", json=body).json()
    recs = r["llmclock"]["trace"]
    assert [x["kind"] for x in recs] == ["prefill"] + ["tick"] * 5
    assert [x["position"] for x in recs] == list(range(recs[0]["position"], recs[0]["position"] + 6))
    assert {"embed", "block0", "head", "sample"} <= set(recs[1]["stages"]) and len(recs[1]["top"]) == 5
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        frames = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [rec for f in frames for rec in f.get("llmclock", {}).get("trace", [])]
    assert [x["token_id"] for x in streamed] == [x["token_id"] for x in recs]
    if srv.state.engine is not None:  # on a thread: no traced request in flight, so the engine runs probe-free
        assert srv.state.engine.probe is None


# ------------------------------------------------------------------------------ batching, disconnects


def test_disconnect_frees_the_slot_within_two_cycles(tsrv, bpe_tok):
    eng = tsrv.state.engine
    tsrv.slow(0.02)
    try:
        with tsrv.http(headers={"Authorization": f"Bearer {KEY}"}) as c:
            body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True,
                    "logit_bias": {str(bpe_tok.eot_id): -100}}
            with c.stream("POST", "/v1/completions", json=body) as s:
                lines = s.iter_lines()
                while not next(lines).startswith("data: {"):
                    pass
                assert len(eng.running) == 1
            cycle = eng.cycle  # the response is closed: the client is gone
        deadline = time.monotonic() + 5
        while eng.running and time.monotonic() < deadline:
            time.sleep(0.002)
        assert not eng.running and eng.cycle - cycle <= 2
    finally:
        del eng.step
    assert tsrv.state.loop.inflight == 0


def test_full_queue_is_429_with_an_estimated_retry_after(model, bpe_tok):
    """Retry-After = the cycles until the running sequence frees its slot x the measured cycle time."""
    with serving(model, bpe_tok, slots=1, queue=0) as s:
        s.slow(0.01)
        no_eot = {str(bpe_tok.eot_id): -100}  # so it cannot end early
        with s.http() as c, c.stream("POST", "/v1/completions", json={
                "prompt": "x", "max_tokens": 240, "stream": True, "logit_bias": no_eot,
                "logprobs": 0}) as first:  # logprobs: one event per token
            events = (x for x in first.iter_lines() if x.startswith("data: {"))
            seen = [next(events) for _ in range(10)]
            r = c.post("/v1/completions", json={"prompt": "y", "max_tokens": 5})
            early, cycle_s = int(r.headers["retry-after"]), s.state.loop._cycle_s
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert cycle_s >= 0.01 and 2 <= early <= 2 * 240 * cycle_s + 2  # ~230 cycles left, >= 0.01 s each
            seen += [next(events) for _ in range(200)]
            late = int(c.post("/v1/completions", json={"prompt": "y", "max_tokens": 5}).headers["retry-after"])
            assert 1 <= late < early  # 30 cycles left now
            assert late <= 2 * 30 * s.state.loop._cycle_s + 2


def test_cycles_until_enough_sequences_finish():
    from llmclock.server.loop import cycles_until

    assert cycles_until(0, [5, 10], [], 2) == 0
    assert cycles_until(1, [5, 10], [8], 2) == 5  # the first running one
    assert cycles_until(2, [5, 10], [8], 2) == 10
    assert cycles_until(3, [5, 10], [8], 2) == 13  # the waiting one took the slot freed at 5
    assert cycles_until(1, [7], [3, 3], 2) == 3  # a free slot runs a waiting one at once
    assert cycles_until(3, [], [], 4) == 1  # nothing known: one round of the slots


def test_a_huge_prompt_does_not_hold_up_other_streams(model, bpe_tok, monkeypatch):
    """Tokenising a prompt of a megabyte takes a second or more; it runs on a worker thread (the Rust
    batch encoder releases the GIL), so the event loop keeps sending another stream's tokens
    meanwhile. Were it tokenised on the event loop, no token could be sent during that time."""
    huge = (CORPUS * (1 + 1_000_000 // len(CORPUS)))[:1_000_000]
    window = []
    encode_batch = bpe_tok.encode_batch

    def timed(texts):
        t0 = time.perf_counter()
        try:
            return encode_batch(texts)
        finally:
            if len(texts[0]) == len(huge):
                window[:] = [t0, time.perf_counter()]

    monkeypatch.setattr(bpe_tok, "encode_batch", timed)
    with serving(model, bpe_tok, max_body=2 << 20) as s:
        s.slow(0.005)
        arrivals: list[float] = []
        started, done = threading.Event(), threading.Event()

        def stream():
            body = {"prompt": "x", "max_tokens": 250, "stream": True, "logprobs": 0,
                    "logit_bias": {str(bpe_tok.eot_id): -100}}
            with s.http() as c, c.stream("POST", "/v1/completions", json=body) as r:
                for _ in r.iter_lines():
                    arrivals.append(time.perf_counter())
                    started.set()
                    if done.is_set():
                        return

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(20)
        with s.http() as c:
            r = c.post("/v1/completions", json={"prompt": huge, "max_tokens": 1})
        done.set()
        reader.join(30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"  # it was tokenised
    t0, t1 = window
    during = [t for t in arrivals if t0 <= t <= t1]
    assert t1 - t0 > 0.3 and len(during) >= 3, (t1 - t0, len(during))


# ------------------------------------------------------------------------------ security


def test_api_keys(srv, tmp_path, monkeypatch):
    assert srv.http().post("/v1/completions", json={"prompt": "x"}).status_code == 401
    wrong = srv.http(headers={"Authorization": "Bearer sk-wrong-0123456789abcdef"}).get("/v1/models")
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert srv.http(headers={"Authorization": f"Basic {KEY}"}).get("/v1/models").status_code == 401
    assert srv.http(headers={"Authorization": f"Bearer {KEY}"}).get("/v1/models").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        srv.client("sk-nope-0123456789").models.list()
    for path in ("/health", "/ready", "/metrics", "/"):
        assert srv.http().get(path).status_code == 200
    assert not any(KEY in line for line in srv.logs)  # logs name a key only by its fingerprint

    keys = tmp_path / "keys"
    keys.write_text("# ops team\nkey-from-file-123\n\n")
    monkeypatch.setenv("LLMCLOCK_API_KEYS", "env-key-1234567, env-key-7654321")
    assert ServerConfig(api_keys=["flag-key-12345"], api_keys_file=str(keys)).keys() == [
        "flag-key-12345", "key-from-file-123", "env-key-1234567", "env-key-7654321"]


def test_rate_limits(model, bpe_tok):
    """Retry-After: when the key's buckets hold enough again (they refill continuously)."""
    with serving(model, bpe_tok, rpm=2, tpm=400) as s, s.http() as c:
        ok = [c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code for _ in range(2)]
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert ok == [200, 200] and r.status_code == 429 and 29 <= int(r.headers["retry-after"]) <= 30  # 60 s / 2
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
    with serving(model, bpe_tok, tpm=300) as s, s.http() as c:
        x = len(bpe_tok.encode("x"))
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 100}).status_code == 200
        waits = []
        for more in (20, 50):  # need this many tokens beyond what is left: 0.2 s per token at 300/min
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 300 - 100 - 2 * x + more})
            assert r.status_code == 429
            waits.append(int(r.headers["retry-after"]))
        assert 3 <= waits[0] <= 4 and 9 <= waits[1] <= 10
        never = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 200, "n": 2})  # over a minute's worth
        assert never.status_code == 429 and "retry-after" not in never.headers


def test_rate_limiter_waits_until_the_window_frees_enough():
    from llmclock.server.security import RateLimiter

    now = [0.0]
    lim = RateLimiter(rpm=2, tpm=100, clock=lambda: now[0])
    assert lim.acquire("k", 80) == 0.0 and lim.acquire("j", 10) == 0.0  # keys are separate
    assert lim.acquire("k", 50) == pytest.approx(18.0)  # 30 tokens short at 100/min
    now[0] = 6.0
    assert lim.acquire("k", 50) == pytest.approx(12.0)  # 10 tokens came back
    now[0] = 18.0
    assert lim.acquire("k", 50) == 0.0
    assert lim.acquire("k", 1) == pytest.approx(12.0)  # requests: 0.6 left of 2, 0.4 short at 2/min
    assert lim.acquire("k", 101) == float("inf")


def test_body_cap_cors_and_redacted_logs(model, bpe_tok):
    with serving(model, bpe_tok, max_body=2000, redact=True, log_prompts=True) as s, s.http() as c:
        r = c.post("/v1/completions", json={"prompt": "x" * 3000})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        chunked = c.post("/v1/completions", content=iter([b'{"prompt": "', b"y" * 3000, b'"}']))
        assert chunked.status_code == 413
        pre = c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in pre.headers  # CORS off unless configured
        secret = "mail bob@example.com from 10.0.0.1, card 4111 1111 1111 1111, key sk-abcdefghijklmnop1234"
        assert c.post("/v1/completions", json={"prompt": secret, "max_tokens": 2}).status_code == 200
    logged = [json.loads(x) for x in s.logs if x.startswith("{") and '"path"' in x]
    line = json.dumps([x for x in logged if x.get("prompt")][0])
    assert "[EMAIL]" in line and "[IP]" in line and "[CARD]" in line and "[SECRET]" in line
    assert "bob@" not in line and "4111" not in line and "10.0.0.1" not in line and "sk-abc" not in line
    with serving(model, bpe_tok, cors_origins=["http://app.example"]) as s:
        r = httpx.get(s.url + "/health", headers={"Origin": "http://app.example"}, timeout=10)
        assert r.headers["access-control-allow-origin"] == "http://app.example"


def test_redact_prompts_masks_before_the_model(model, bpe_tok):
    with serving(model, bpe_tok, redact_prompts=True) as s, s.http() as c:
        prompt = "call +1 415-555-0132 or mail a@b.io"
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == len(bpe_tok.encode(redact(prompt))) != len(bpe_tok.encode(prompt))


@pytest.mark.parametrize("text, masked", [
    ("write to jane.doe+x@mail.example.org today", "write to [EMAIL] today"),
    ("phone (415) 555-0132 or +44 20 7946 0958", "phone [PHONE] or [PHONE]"),
    ("visa 4111-1111-1111-1111, amex 378282246310005", "visa [CARD], amex [CARD]"),
    ("not a card 4111 1111 1111 1112", "not a card 4111 1111 1111 1112"),
    ("from 192.168.1.20 and 2001:db8::8a2e:370:7334", "from [IP] and [IP]"),
    ("version 1.2.3.4000 stays", "version 1.2.3.4000 stays"),
    ("token sk-proj-Abcdefghijklmnop1234 and AKIAIOSFODNN7EXAMPLE", "token [SECRET] and [SECRET]"),
    ("Authorization: Bearer abcdef1234567890xyz", "Authorization: [SECRET]"),
    ("api_key=hunter2hunter2 done", "[SECRET] done"),
    ("ghp_0123456789abcdefghijABCDEFGHIJ012345", "[SECRET]"),
    ("plain prose with 42 apples, 2024-05-01", "plain prose with 42 apples, 2024-05-01"),
])
def test_redaction_of_each_kind(text, masked):
    assert redact(text) == masked


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005") and not luhn_ok("4111111111111112")


# ------------------------------------------------------------------------------ errors: 4xx, never 500

BAD = [
    ("/v1/completions", {}, 400),
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "x", "n": 5}, 400),  # beyond the server's cap (4)
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, 400),  # beyond the context
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 201}, 400),  # beyond the server's cap (200)
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400),
    ("/v1/completions", {"prompt": [99999]}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, 400),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": "hello"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 600}]}, 400),  # no room to answer
    ("/v1/nothing", {"prompt": "x"}, 404),
]


@pytest.mark.parametrize("path, body, status", BAD)
def test_bad_requests_get_openai_errors(srv, path, body, status):
    r = srv.http(headers={"Authorization": f"Bearer {KEY}"}).post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and "Traceback" not in err["message"]


def test_malformed_json_and_wrong_method(srv):
    c = srv.http(headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert c.post("/v1/completions", content=b"{not json").status_code == 400
    assert c.post("/v1/completions", content=b"[1, 2]").status_code == 400
    assert c.get("/v1/completions").status_code == 405


# ------------------------------------------------------------------------------ operations


def test_health_ready_metrics(srv):
    c = srv.http(headers={"Authorization": f"Bearer {KEY}"})
    assert c.get("/health").json() == {"status": "ok"}
    assert c.get("/ready").json()["status"] == "ready"
    c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "temperature": 0})
    text = c.get("/metrics").text
    for name in ("llmclock_requests_total", "llmclock_prompt_tokens_total", "llmclock_generated_tokens_total",
                 "llmclock_time_to_first_token_seconds_bucket", "llmclock_inter_token_latency_seconds_bucket",
                 "llmclock_queue_depth", "llmclock_busy_slots", "llmclock_tokens_per_second"):
        assert name in text
    assert metric(srv, "llmclock_requests_total", 'route="/v1/completions",status="200"') >= 1
    assert metric(srv, "llmclock_time_to_first_token_seconds_count") >= 1
    access = [json.loads(x) for x in srv.logs if x.startswith('{"ts"') and '"path"' in x]
    assert any(a["path"] == "/v1/completions" and a["status"] == 200 and a["completion_tokens"] == 4 for a in access)


def test_not_ready_while_the_model_fails_to_load(tmp_path):
    from fastapi.testclient import TestClient

    (tmp_path / "config.json").write_text("{}")
    app = create_app(ServerConfig(ckpt=str(tmp_path)))
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while app.state.server.load_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 503


def test_sigterm_drains_in_flight_requests(model, bpe_tok):
    import signal

    with serving(model, bpe_tok) as s:
        s.slow(0.01)
        with s.http() as c, c.stream("POST", "/v1/completions", json={
                "prompt": "x", "max_tokens": 60, "stream": True, "temperature": 0}) as r:
            lines = r.iter_lines()
            next(lines)
            s.server.handle_exit(signal.SIGTERM, None)
            assert s.state.loop.draining  # /ready now says so, and new requests get 503
            rest = [x for x in lines if x]
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert rest[-1] == "data: [DONE]" and finish[-1] in ("stop", "length")
