"""The engine's scheduling: chunked prefill under a token budget, cycles that prefill and tick, ticks over
running rows only, batched sampling settings; every way of batching gives each sequence what it gets alone."""

import pytest
import torch

from llmclock.checkpoint import load_checkpoint, write_checkpoint
from llmclock.engine import Engine, SamplingParams
from llmclock.errors import LLMClockError
from llmclock.trace import Tracer, load, replay

PROMPTS = ["First Citizen:\n", "All:\nSpeak", "You are all resolved rather to die"]


class Recorder:
    """A probe that keeps each cycle's kind, slots, tick rows and logits."""

    def __init__(self):
        self.cycles = []

    def begin(self, kind, slots):
        self.cycles.append({"kind": kind, "slots": slots, "rows": []})

    def mark(self, stage): ...

    def residual(self, layer, x):
        if layer == 0:
            self.cycles[-1]["rows"].append(x.size(0))

    def end(self, events, logits, logprobs):
        self.cycles[-1]["events"] = events
        self.cycles[-1]["logits"] = logits.clone()


def _greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


@pytest.mark.parametrize("budget", [4, 9])
def test_chunked_prefill_mixed_cycles_match_alone_and_full_forward(tiny_model, char_tok, budget):
    """Prompts prefilled a few tokens per cycle while the others tick: every emitted row equals a full
    forward, greedy tokens equal each prompt run alone, and no running sequence ever misses a cycle."""
    params = [_greedy(n) for n in (6, 20, 9)]
    eng = Engine(tiny_model, char_tok, slots=2, max_batched_tokens=budget)
    rec = eng.probe = Recorder()
    seqs = [eng.add(p, sp) for p, sp in zip(PROMPTS, params)]
    while eng.has_work():
        eng.step()
    by_id = {s.request_id: s for s in seqs}
    for c in rec.cycles:
        for ev, row in zip(c["events"], c["logits"]):
            s = by_id[ev.request_id]
            with torch.no_grad():
                ref, _ = tiny_model(torch.tensor([s.prompt_ids + s.output_ids[: ev.position - len(s.prompt_ids)]]))
            torch.testing.assert_close(row, ref[0, -1], atol=1e-4, rtol=1e-4)
    kinds = {c["kind"] for c in rec.cycles}
    assert "prefill+tick" in kinds and "prefill" in kinds  # chunks alone (first prompt), and beside ticks
    assert rec.cycles[0]["kind"] == "prefill" and not rec.cycles[0]["events"]  # the first prompt needs > 1 cycle
    cycles = {}
    for c in rec.cycles:
        for ev in c["events"]:
            cycles.setdefault(ev.request_id, []).append(ev.cycle)
    for cs in cycles.values():  # once its first token is out, a sequence emits one every cycle until it ends
        assert cs == list(range(cs[0], cs[0] + len(cs)))
    for p, sp, s in zip(PROMPTS, params, seqs):
        assert Engine(tiny_model, char_tok).complete([p], [sp])[0].token_ids == s.output_ids


@pytest.mark.parametrize("compiled_attention", [True, False])
def test_ticks_compute_only_running_rows(tiny_model, char_tok, compiled_attention):
    """Slot 0 finishes first, then slot 1: ticks run one row per running sequence (slots 1 and 2, later
    0 and 2), with the compiled attention or with index writes and SDPA, and give a lone run's tokens."""
    prompts = PROMPTS + ["Before we proceed"]
    params = [_greedy(n) for n in (3, 8, 14, 9)]
    eng = Engine(tiny_model, char_tok, slots=3)
    if not compiled_attention:
        eng.runner.attend = None  # the path GPUs and machines without a compiler take
    rec = eng.probe = Recorder()
    seqs = [eng.add(p, sp) for p, sp in zip(prompts[:3], params)]
    while seqs[0].finish_reason is None:
        eng.step()
    eng.step(), eng.step()
    seqs.append(eng.add(prompts[3], params[3]))
    while eng.has_work():
        eng.step()
    ticks = [c for c in rec.cycles if c["kind"] == "tick"]
    assert all(c["rows"] == [len(c["slots"])] for c in ticks)
    assert any(c["slots"] == [1, 2] for c in ticks) and any(c["slots"] == [0, 2] for c in ticks)
    for p, sp, s in zip(prompts, params, seqs):
        assert Engine(tiny_model, char_tok).complete([p], [sp])[0].token_ids == s.output_ids


@pytest.mark.slow
def test_compiled_tick_computes_only_running_rows(tiny_model, char_tok):
    """compile=True: ticks run one row per running sequence too (slots 1 and 2, later 0 and 2), give a
    lone eager run's tokens, and the number of rows and the attended length vary within a few graphs
    (dynamic shapes) rather than one graph per shape. (No probe: its calls would break the graph.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    prompts = PROMPTS + ["Before we proceed"]
    params = [_greedy(n) for n in (3, 8, 14, 9)]
    eng = Engine(tiny_model, char_tok, slots=3, compile=True)
    ticks, compiled = [], eng.runner._tick

    def spy(plan, cache, tokens, pos, slots, *rest):
        ticks.append((tokens.size(0), slots.tolist()))
        return compiled(plan, cache, tokens, pos, slots, *rest)

    eng.runner._tick = spy
    seqs = [eng.add(p, sp) for p, sp in zip(prompts[:3], params)]
    while seqs[0].finish_reason is None:
        eng.step()
    eng.step(), eng.step()
    seqs.append(eng.add(prompts[3], params[3]))
    while eng.has_work():
        eng.step()
    assert all(n == len(slots) for n, slots in ticks)
    assert any(slots == [1, 2] for _, slots in ticks) and any(slots == [0, 2] for _, slots in ticks)
    for p, sp, s in zip(prompts, params, seqs):
        assert Engine(tiny_model, char_tok).complete([p], [sp])[0].token_ids == s.output_ids
    assert len(ticks) > 10 and counters["stats"]["unique_graphs"] <= 4  # not one graph per (rows, length)


def test_mixed_sampling_settings_in_one_batch_equal_each_alone(tiny_model, char_tok):
    """Greedy, seeded sampling, logit bias and the three penalties side by side: batched, each row as alone."""
    e_id = char_tok.encode("e")[0]
    params = [
        _greedy(15, logit_bias={e_id: 3.0}),
        SamplingParams(max_new_tokens=15, temperature=0.9, top_k=30, seed=3, ignore_eos=True, repetition_penalty=1.8),
        _greedy(15, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(max_new_tokens=15, temperature=1.1, min_p=0.05, seed=4, ignore_eos=True, logit_bias={e_id: -5.0},
                       presence_penalty=1.0),
    ]
    prompts = PROMPTS + ["Speak, speak."]
    batch = Engine(tiny_model, char_tok, slots=4).complete(prompts, params)
    for p, sp, c in zip(prompts, params, batch):
        assert Engine(tiny_model, char_tok).complete([p], [sp])[0].token_ids == c.token_ids
    assert batch[3].token_ids.count(e_id) == 0 < batch[0].token_ids.count(e_id)


def test_budget_must_leave_room_for_prompts(tiny_model, char_tok):
    with pytest.raises(LLMClockError, match="max_batched_tokens"):
        Engine(tiny_model, char_tok, slots=4, max_batched_tokens=4)
    assert Engine(tiny_model, char_tok, slots=4).max_batched_tokens > 4


def test_trace_of_mixed_cycles_and_exact_replay(tiny_model, char_tok, tmp_path):
    """A cycle that prefills and ticks: its records say so, each with its own forward's stages; replay is exact."""
    write_checkpoint(tmp_path / "ck", tiny_model, char_tok)
    model, tok = load_checkpoint(tmp_path / "ck")
    eng = Engine(model, tok, slots=2, max_batched_tokens=6)
    params = [SamplingParams(max_new_tokens=n, temperature=1.2, ignore_eos=True) for n in (4, 12, 6)]
    with Tracer(eng, top_n=3, logit_lens="all") as tr:
        events = list(eng.generate(PROMPTS, params))
    assert [(r.cycle, r.slot, r.token_id) for r in tr.records] == [(e.cycle, e.slot, e.token_id) for e in events]
    mixed = [r for r in tr.records if r.cycle_kind == "prefill+tick"]
    assert {r.kind for r in mixed} == {"prefill", "tick"}
    for r in mixed:
        others = [o for o in mixed if o.cycle == r.cycle and o.kind != r.kind]
        for o in others:  # the prompts' forward ran first, then the ticks': different stage spans
            first, second = (r, o) if r.kind == "prefill" else (o, r)
            assert first.t + first.stages["head"][0] <= second.t + second.stages["embed"][0]
        assert list(r.stages) == ["embed", "block0", "block1", "head", "sample", "post"]
        assert sorted(r.lens) == [0, 1] and r.lens[1][0][0] == r.top[0][0]  # lens rows follow the events
    paths = tr.write(tmp_path / "t", tr.header(ckpt=tmp_path / "ck"))
    header, _ = load(paths["jsonl"])
    assert header["engine"]["max_batched_tokens"] == 6
    r = replay(paths["jsonl"])
    assert r.divergence is None and r.max_logprob_diff == 0.0 and len(r.replayed) == len(tr.records)


def test_abort_mid_prefill_frees_the_slot(tiny_model, char_tok):
    """A sequence aborted while its prompt is part-way in gives its slot to the next, which runs as alone."""
    eng = Engine(tiny_model, char_tok, slots=1, max_batched_tokens=4)
    eng.add(PROMPTS[2], _greedy(5), request_id="long")
    nxt = eng.add(PROMPTS[0], _greedy(6))
    assert eng.step() == [] and eng.running[0].prefilled == 4
    eng.abort("long")
    assert not eng.running and eng.scheduler.free == [0]
    out = list(eng.generate([], None))
    assert nxt.output_ids == Engine(tiny_model, char_tok).complete([PROMPTS[0]], _greedy(6))[0].token_ids
    assert len(out) == 6 and {ev.slot for ev in out} == {0}


def test_short_prompts_join_the_tick_in_one_pass(tiny_model, char_tok, monkeypatch):
    """Without a probe, a cycle that admits short prompts while others tick is one pass of the decode
    kernels over all rows (no separate tick, no torch prefill), and every sequence still gets the greedy
    tokens of a full forward; a prompt longer than KERNEL_PREFILL_ROWS still prefills through torch."""
    from llmclock.engine import kernels, runner
    from tests.conftest import full_forward_greedy as _full_forward_greedy, requires_kernels

    requires_kernels(kernels)
    calls = {"tick": 0, "torch": 0}
    torch_prefill = runner.prefill
    monkeypatch.setattr(runner, "prefill", lambda *a, **k: calls.__setitem__("torch", calls["torch"] + 1)
                        or torch_prefill(*a, **k))
    eng = Engine(tiny_model, char_tok, slots=3)
    tick = eng.runner.tick
    eng.runner.tick = lambda *a: calls.__setitem__("tick", calls["tick"] + 1) or tick(*a)
    prompts, params = ["First Cit", "All:\nSp", "You are"], [_greedy(n) for n in (12, 9, 5)]
    seqs = [eng.add(prompts[0], params[0])]
    for p, sp in zip(prompts[1:], params[1:]):  # admitted while the earlier ones tick
        eng.step(), eng.step()
        seqs.append(eng.add(p, sp))
    while eng.has_work():
        eng.step()
    assert calls == {"tick": 0, "torch": 0}
    for p, sp, s in zip(prompts, params, seqs):
        assert s.output_ids == _full_forward_greedy(tiny_model, char_tok.encode(p), sp.max_new_tokens)
    long = eng.add(PROMPTS[2], _greedy(3))
    while eng.has_work():
        eng.step()
    assert calls["torch"] == 1 and long.output_ids == _full_forward_greedy(tiny_model, char_tok.encode(PROMPTS[2]), 3)

