"""The trace: records equal the engine's output, exports are well formed, replay is exact, diffs are found."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmclock.checkpoint import load_checkpoint, write_checkpoint
from llmclock.config import preset
from llmclock.engine import Engine, SamplingParams
from llmclock.errors import LLMClockError
from llmclock.model import GPT
from llmclock.trace import Tracer, diff, load, parse_layers, replay

PROMPTS = ["First Citizen:\n", "All:\nSpeak", "You are all resolved rather to die"]
STAGES = ["embed", "block0", "block1", "head", "sample", "post"]
SRC = str(Path(__file__).parents[1] / "src")


def _params(lengths=(5, 14, 6), **kw):
    kw = {"temperature": 0.9, "top_k": 20, "ignore_eos": True} | kw
    return [SamplingParams(max_new_tokens=n, **kw) for n in lengths]


def _ref(model, ids):
    """The model's own next-token log-distribution after `ids`, from a full forward (no cache)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0, -1].float(), -1)


def test_records_match_the_engines_events_and_a_full_forward(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok, slots=2)  # 3 prompts, 2 slots: the third reuses a slot mid-run
    params = _params(seed=None)
    params[0].seed = 3
    with Tracer(eng, top_n=4) as tr:
        events = list(eng.generate(PROMPTS, params))
    assert eng.probe is None  # detached on exit
    assert len(tr.records) == len(events) == 5 + 14 + 6
    seqs = {q["request_id"]: q for q in tr.requests}
    outputs = {rid: [] for rid in seqs}
    bpp = eng.cache.nbytes // (eng.cache.slots * eng.cache.max_len)
    for ev, r in zip(events, tr.records):
        assert (r.cycle, r.slot, r.request_id, r.position, r.token_id, r.text, r.logprob, r.finish_reason) == (
            ev.cycle, ev.slot, ev.request_id, ev.position, ev.token_id, ev.text, ev.logprob, ev.finish_reason)
        assert r.kind == ("prefill" if not outputs[r.request_id] else "tick")
        assert r.token == char_tok.decode([r.token_id])
        ref = _ref(tiny_model, seqs[r.request_id]["prompt_ids"] + outputs[r.request_id])
        assert r.entropy == pytest.approx(float(-(ref.exp() * ref).sum()), abs=1e-4)
        v, i = ref.topk(4)
        assert [t for t, _, _ in r.top] == i.tolist()
        assert [p for _, _, p in r.top] == pytest.approx(v.exp().tolist(), abs=1e-5)
        assert [s for _, s, _ in r.top] == [char_tok.decode([t]) for t in i.tolist()]
        assert list(r.stages) == STAGES
        offsets = [o for o, _ in r.stages.values()]
        assert offsets == sorted(offsets) and all(d >= 0 for _, d in r.stages.values())
        assert r.dur >= sum(d for _, d in r.stages.values()) - 1e-9 and r.probe >= 0
        assert r.kv_bytes == r.position * bpp
        outputs[r.request_id].append(r.token_id)
    assert [len(q["prompt_ids"]) for q in tr.requests] == [len(char_tok.encode(p)) for p in PROMPTS]
    assert tr.requests[0]["params"]["seed"] == 3 and all(q["params"]["seed"] is not None for q in tr.requests)
    assert tr.requests[2]["cycle"] > 1  # admitted when a slot freed
    by_cycle = {}
    for r in tr.records:
        by_cycle.setdefault(r.cycle, []).append(r)
    # In a tick the slots ran one batched forward: the same stage times; in use: both slots' positions.
    tick = next(rs for rs in by_cycle.values() if rs[0].kind == "tick" and len(rs) == 2)
    assert tick[0].stages == tick[1].stages
    assert tick[0].kv_total == sum(r.position for r in tick) * bpp


def test_tracing_off_leaves_the_output_identical(tiny_model, char_tok):
    def run(trace):
        eng = Engine(tiny_model, char_tok, slots=2)
        if not trace:
            return eng.complete(PROMPTS, _params(seed=7))
        with Tracer(eng, logit_lens="all", top_n=10):
            return eng.complete(PROMPTS, _params(seed=7))

    off, on, off_again = run(False), run(True), run(False)
    for a, b, c in zip(off, on, off_again):
        assert a.token_ids == b.token_ids == c.token_ids and a.text == b.text
        assert a.logprobs == b.logprobs == c.logprobs


def test_logit_lens(tiny_model, char_tok):
    """After the last block the lens is the model's own output; after block 0, the head on block 0's output."""
    eng = Engine(tiny_model, char_tok, slots=2)
    with Tracer(eng, logit_lens=[0, -1], top_n=5) as tr:
        eng.complete(PROMPTS, _params(lengths=(4, 12, 5), seed=1))
    seqs = {q["request_id"]: q for q in tr.requests}
    outputs = {rid: [] for rid in seqs}
    for r in tr.records:
        assert sorted(r.lens) == [0, 1]
        assert [t for t, _, _ in r.lens[1]] == [t for t, _, _ in r.top]
        assert [p for _, _, p in r.lens[1]] == pytest.approx([p for _, _, p in r.top], abs=1e-5)
        ids = seqs[r.request_id]["prompt_ids"] + outputs[r.request_id]
        with torch.no_grad():
            T = len(ids)
            x = tiny_model.transformer.h[0](tiny_model.embed(torch.tensor([ids]), torch.arange(T)))
            v, i = torch.softmax(tiny_model.head(x[0, -1]), -1).topk(5)
        assert [t for t, _, _ in r.lens[0]] == i.tolist()
        assert [p for _, _, p in r.lens[0]] == pytest.approx(v.tolist(), abs=1e-5)
        outputs[r.request_id].append(r.token_id)
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("2,-1,0", 3) == [0, 2]
    with pytest.raises(LLMClockError, match="outside"):
        parse_layers("5", 2)


def test_exports_are_well_formed(tiny_model, char_tok, tmp_path):
    eng = Engine(tiny_model, char_tok, slots=2)
    with Tracer(eng, logit_lens="all") as tr:
        eng.complete(PROMPTS, _params(seed=2))
    paths = tr.write(tmp_path / "out")
    header, records = load(paths["jsonl"])
    assert header["requests"] == tr.requests and header["model"]["n_layer"] == 2
    assert records == tr.records  # JSON round trip, floats bit for bit
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    events = json.loads(paths["perfetto"].read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {1: "slot 0", 2: "slot 1"}
    for e in events:
        assert e["ph"] in ("X", "C", "M") and isinstance(e["pid"], int) and isinstance(e["name"], str)
        if e["ph"] in ("X", "C"):
            assert isinstance(e["ts"], int) and e["ts"] >= 0
        if e["ph"] == "X":
            assert isinstance(e["dur"], int) and e["dur"] >= 0 and e["tid"] in names
    slices = [e for e in events if e["ph"] == "X"]
    cyc = [e for e in slices if e["cat"] in ("prefill", "tick")]
    stages = [e for e in slices if e["cat"] == "stage"]
    assert len(cyc) == len(records) and len(stages) == len(records) * len(STAGES)
    for tid in names:
        mine = sorted((e for e in cyc if e["tid"] == tid), key=lambda e: e["ts"])
        for a, b in itertools.pairwise(mine):
            assert a["ts"] + a["dur"] <= b["ts"]  # cycle slices on a track never overlap
        kids = sorted((e for e in stages if e["tid"] == tid), key=lambda e: e["ts"])
        for a, b in itertools.pairwise(kids):
            assert a["ts"] + a["dur"] <= b["ts"]
        for k in kids:  # every stage lies inside exactly one cycle slice of its own track
            assert sum(c["ts"] <= k["ts"] and k["ts"] + k["dur"] <= c["ts"] + c["dur"] for c in mine) == 1
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"entropy slot 0", "logprob slot 1", "kv cache"} <= counters
    assert "cycles" in tr.summary() and "blocks" in tr.summary()


@pytest.fixture
def ckpt(tiny_model, char_tok, tmp_path):
    write_checkpoint(tmp_path / "ck", tiny_model, char_tok)
    return tmp_path / "ck"


def test_replay_is_exact_with_and_without_a_seed(ckpt, tmp_path):
    model, tok = load_checkpoint(ckpt)
    eng = Engine(model, tok, slots=2)
    params = _params(temperature=1.3, top_p=0.95)
    params[1].seed = 42
    with Tracer(eng, top_n=3) as tr:
        done = eng.complete(PROMPTS, params)
    paths = tr.write(tmp_path / "t", tr.header(ckpt=ckpt))
    header, _ = load(paths["jsonl"])
    assert header["requests"][1]["params"]["seed"] == 42 and header["requests"][0]["params"]["seed"] is not None
    r = replay(paths["jsonl"])
    assert r.divergence is None and r.max_logprob_diff == 0.0
    assert [x.token_id for x in r.replayed] == [x.token_id for x in r.recorded]
    assert r.cycles == len({x.cycle for x in tr.records})
    assert sum(len(c.token_ids) for c in done) == len(r.replayed)

    lines = paths["jsonl"].read_text().splitlines()  # tamper with one cycle: replay names it
    rec = json.loads(lines[9])
    rec["token_id"] = (rec["token_id"] + 1) % tok.vocab_size
    lines[9] = json.dumps(rec)
    paths["jsonl"].write_text("\n".join(lines) + "\n")
    d = replay(paths["jsonl"]).divergence
    assert (d.cycle, d.slot) == (rec["cycle"], rec["slot"]) and d.a.token_id == rec["token_id"]


def test_diff_finds_the_first_divergent_cycle(tiny_model, char_tok):
    def trace(params):
        eng = Engine(tiny_model, char_tok)
        with Tracer(eng, top_n=3) as tr:
            done = eng.complete([PROMPTS[1]], params)[0]
        return done, tr.records

    base, a = trace(SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))
    j = next(j for j in range(2, 30) if base.token_ids[j] not in base.token_ids[:j])  # a token first chosen late
    t = base.token_ids[j]
    _, b = trace(SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True, logit_bias={t: -100.0}))
    d = diff(a, b)
    assert (d.cycle, d.slot) == (j + 1, 0)  # cycle 1 is the prefill, which emits output token 0
    assert d.a.token_id == t and d.b.token_id != t
    assert d.a.top == d.b.top and d.b.top[0][0] == t  # same state: the bias hides t but the model still prefers it
    assert f"cycle {j + 1}" in d.describe()
    assert diff(a, a) is None

    s1, a = trace(SamplingParams(max_new_tokens=30, temperature=1.5, ignore_eos=True, seed=1))
    s2, b = trace(SamplingParams(max_new_tokens=30, temperature=1.5, ignore_eos=True, seed=2))
    k = next(k for k, (x, y) in enumerate(zip(s1.token_ids, s2.token_ids)) if x != y)
    assert diff(a, b).cycle == k + 1


def _cli(*args, ok=True):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-m", "llmclock", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_cli_trace_and_replay(ckpt, tmp_path, char_tok):
    out = tmp_path / "tr"
    p = _cli("trace", "--ckpt", ckpt, "--prompt", "First", "--prompt", "All:\nSpeak", "--out", out,
             "--max-new-tokens", "10", "--ignore-eos", "--logit-lens", "all", "--top-n", "3")
    assert "cycles" in p.stdout and "tokens/s" in p.stdout
    for f in ("trace.jsonl", "trace.perfetto.json", "trace.png"):
        assert (out / f).stat().st_size > 0
    header, records = load(out / "trace.jsonl")
    assert len(records) == 20 and {r.slot for r in records} == {0, 1} and header["logit_lens"] == [0, 1]
    assert header["weights_sha256"] and header["tokenizer_sha256"] == char_tok.hash and header["torch"]
    p = _cli("replay", out / "trace.jsonl")
    assert p.stdout.strip() == "replay: identical (10 cycles)"

    _cli("trace", "--ckpt", ckpt, "--prompt", "First", "--prompt", "All:\nSpeak", "--out", tmp_path / "tr2",
         "--max-new-tokens", "10", "--ignore-eos", "--seed", "5")
    p = _cli("replay", out / "trace.jsonl", "--against", tmp_path / "tr2" / "trace.jsonl", ok=False)
    _, other = load(tmp_path / "tr2" / "trace.jsonl")
    assert p.returncode == 1 and f"cycle {diff(records, other).cycle}," in p.stdout

    torch.manual_seed(1)
    write_checkpoint(tmp_path / "other", GPT(preset("test", vocab_size=char_tok.vocab_size)), char_tok)
    p = _cli("replay", out / "trace.jsonl", "--ckpt", tmp_path / "other", ok=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("llmclock: error:") and "sha256" in lines[0]
