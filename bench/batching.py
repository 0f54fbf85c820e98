"""Latency under load: time to first token (TTFT) and inter-token latency (ITL) while requests arrive.

    PYTHONPATH=src python bench/batching.py [--base /tmp/base/src] [--rounds 3] [--budget N]

GPT-2 124M shape (random init, fp32, CPU, 2 threads), greedy. Eight sequences (16-token prompts)
are running when new requests (PROMPT-token prompts, NEW tokens each) arrive by the wall clock,
BURST at a time, BURSTS times, GAP_TICKS plain ticks apart (a tick of the eight, timed at the start
of the run, so the scenario keeps its shape on a slower or busier machine); the driver adds each
at the first cycle boundary after its arrival and steps the engine as fast as it goes. TTFT = first token's time - arrival time, per arrival;
ITL = time between consecutive tokens of one sequence, over the eight running ones and the
arrivals' later tokens, from the first arrival until the last arrival's last token.

With --base, the engine of another llmclock source tree (e.g. a checkout of the commit before
the engine split: `git worktree add /tmp/base 27e1ab0`) is loaded in this same process as a
second package and measured on the same model, round by round interleaved with this tree's
engine (alternating which goes first), so both see the same machine. Both engines must emit the
same greedy tokens. Ratios are base / this tree (> 1: this tree is faster). Last line:
    RESULT ttft_mean_ratio=<x> ttft_max_ratio=<x> itl_p50_ratio=<x> itl_p95_ratio=<x> itl_max_ratio=<x>
(nan without --base).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

import llmclock.engine as this_engine
from llmclock.config import preset
from llmclock.model import GPT

RUNNING, RUN_PROMPT = 8, 16
BURST, BURSTS, GAP_TICKS, PROMPT, NEW = 2, 4, 10, 96, 8
SLOTS, MAX_LEN = 16, 256


def load_engine_package(src: Path):
    """`llmclock.engine` of another source tree, imported as package `llmclock_base` beside ours."""
    init = src / "llmclock" / "__init__.py"
    if not init.is_file():
        sys.exit(f"bench: {init} not found (give --base the tree's src directory)")
    spec = importlib.util.spec_from_file_location("llmclock_base", init, submodule_search_locations=[str(init.parent)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["llmclock_base"] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module("llmclock_base.engine")


def one_round(mod, engine, prompts: dict[str, list[int]], gap: float) -> tuple[dict, dict[str, list[int]]]:
    """Run the scenario once: -> metrics, and every request's tokens."""
    params = mod.SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True)
    long = mod.SamplingParams(max_new_tokens=MAX_LEN - RUN_PROMPT, temperature=0, ignore_eos=True)
    times: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}

    def step() -> None:
        evs = engine.step()
        now = time.perf_counter()
        for ev in evs:
            times.setdefault(ev.request_id, []).append(now)
            tokens.setdefault(ev.request_id, []).append(ev.token_id)

    for i in range(RUNNING):
        engine.add(prompts[f"run{i}"], long, request_id=f"run{i}")
    while len(times) < RUNNING:  # all eight running before the first arrival
        step()
    for rid in times:
        times[rid].clear()
    t0 = time.perf_counter()
    arrive = {f"new{i}": t0 + gap * (i // BURST) for i in range(BURST * BURSTS)}
    pending = sorted(arrive, key=arrive.get)
    while pending or any(len(times.get(r, ())) < NEW for r in arrive):
        while pending and arrive[pending[0]] <= time.perf_counter():
            rid = pending.pop(0)
            engine.add(prompts[rid], params, request_id=rid)
        step()
    t_end = time.perf_counter()
    for i in range(RUNNING):
        engine.abort(f"run{i}")
    ttft = [times[r][0] - arrive[r] for r in arrive]
    itl = [b - a for ts in times.values() for a, b in zip(ts, ts[1:]) if a >= t0]
    n_tok = sum(len(ts) for ts in times.values())
    return {"ttft": ttft, "itl": itl, "tok_s": n_tok / (t_end - t0)}, tokens


def tick_time(mod, engine, prompts: dict[str, list[int]], n: int = 12) -> float:
    """Median seconds of a plain tick of the eight running sequences."""
    params = mod.SamplingParams(max_new_tokens=n + 1, temperature=0, ignore_eos=True)
    for i in range(RUNNING):
        engine.add(prompts[f"run{i}"], params)
    engine.step()  # the prompts
    times = []
    while engine.has_work():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"mean": statistics.fmean(xs), "p50": xs[len(xs) // 2], "p95": xs[min(len(xs) - 1, int(0.95 * len(xs)))],
            "max": xs[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, help="src directory of another llmclock tree to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=None, help="this tree's max_batched_tokens (default: the engine's)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT(preset("gpt2", vocab_size=50257)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = {f"run{i}": torch.randint(50000, (RUN_PROMPT,), generator=g).tolist() for i in range(RUNNING)}
    prompts |= {f"new{i}": torch.randint(50000, (PROMPT,), generator=g).tolist() for i in range(BURST * BURSTS)}

    engines = {"this": (this_engine, this_engine.Engine(model, None, slots=SLOTS, max_len=MAX_LEN,
                                                          max_batched_tokens=a.budget))}
    if a.base:
        base = load_engine_package(a.base.resolve())
        engines = {"base": (base, base.Engine(model, None, slots=SLOTS, max_len=MAX_LEN)), **engines}
    eng = engines["this"][1]
    gap = GAP_TICKS * tick_time(this_engine, eng, prompts)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {RUNNING} running ({RUN_PROMPT}-token "
          f"prompts); {BURSTS} bursts of {BURST} arrivals ({PROMPT}-token prompts, {NEW} new tokens each) "
          f"{gap * 1e3:.0f} ms apart ({GAP_TICKS} ticks of the eight); slots {SLOTS}; "
          f"this engine's max_batched_tokens {eng.max_batched_tokens}")
    mem = eng.runner.memory()
    print("decode memory (this engine): " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items()))

    res = {k: {"ttft": [], "itl": [], "tok_s": []} for k in engines}
    outputs = {}
    for r in range(a.rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for k in order:
            mod, e = engines[k]
            m, outputs[k] = one_round(mod, e, prompts, gap)
            for key in res[k]:
                res[k][key] += m[key] if isinstance(m[key], list) else [m[key]]
        print(f"round {r + 1}: " + "; ".join(
            f"{k} ttft mean {statistics.fmean(res[k]['ttft']) * 1e3:.0f} ms, itl p95 {stats(res[k]['itl'])['p95'] * 1e3:.0f} ms"
            for k in engines))

    print(f"\n{'engine':>6} {'ttft mean':>10} {'ttft p50':>9} {'ttft max':>9} {'itl p50':>8} {'itl p95':>8} "
          f"{'itl max':>8} {'tok/s':>7}   (ms; tok/s over the arrival window)")
    summary = {}
    for k in engines:
        t, i = stats(res[k]["ttft"]), stats(res[k]["itl"])
        summary[k] = (t, i)
        print(f"{k:>6} {t['mean'] * 1e3:>10.1f} {t['p50'] * 1e3:>9.1f} {t['max'] * 1e3:>9.1f} {i['p50'] * 1e3:>8.1f} "
              f"{i['p95'] * 1e3:>8.1f} {i['max'] * 1e3:>8.1f} {statistics.fmean(res[k]['tok_s']):>7.1f}")
    ratio = dict.fromkeys(("ttft_mean", "ttft_max", "itl_p50", "itl_p95", "itl_max"), float("nan"))
    if "base" in engines:
        same = all(a[: len(b)] == b[: len(a)] for rid, a in outputs["this"].items() for b in [outputs["base"][rid]])
        print(f"same greedy tokens as base: {same}")
        (tb, ib), (tt, it) = summary["base"], summary["this"]
        ratio = {"ttft_mean": tb["mean"] / tt["mean"], "ttft_max": tb["max"] / tt["max"],
                 "itl_p50": ib["p50"] / it["p50"], "itl_p95": ib["p95"] / it["p95"], "itl_max": ib["max"] / it["max"]}
        print("base / this: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    print("RESULT " + " ".join(f"{k}_ratio={v:.3f}" for k, v in ratio.items()))


if __name__ == "__main__":
    main()
