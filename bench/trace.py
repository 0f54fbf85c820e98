"""What the oscilloscope costs: decode tokens/s with tracing off, on, and on with the logit lens at every layer.

GPT-2 124M shape (random init, fp32, CPU, torch.set_num_threads(2)), batch 1 and 8, 16-token prompts,
128 new tokens each (ignore_eos), top-5 alternatives recorded per cycle.

The three modes are interleaved cycle by cycle inside each generation: the probe is switched between
none, a Tracer and a Tracer with the lens at every block before each clock cycle (rotating, with a
different phase each round), and every cycle is timed on its own. Each mode thus sees the same mix of
positions and the same drift in the machine's speed, so the ratios hold up on a busy machine, where
whole-run timings swing by 2x. tokens/s of a mode = tokens emitted in its cycles / seconds of its
cycles, pooled over rounds; the spread column gives the per-round on/off ratios.

    PYTHONPATH=src python bench/trace.py [--rounds N] [--budget-s S]

Last line: RESULT trace_on_vs_off=<x> lens_vs_off=<x>, each the geometric mean over batch 1 and 8.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from llmclock.config import preset
from llmclock.engine import Engine, SamplingParams
from llmclock.model import GPT
from llmclock.trace import Tracer

PROMPT_LEN, NEW = 16, 128
MODES = ("off", "on", "lens")


class CharTok:
    """Just enough tokenizer for the engine: one printable character per id (no download, cheap detok)."""

    eot_id = 50256

    def decode(self, ids) -> str:
        return "".join(chr(0x21 + i % 0x5E) for i in ids)


def one_round(engine: Engine, batch: int, phase: int, new: int = NEW) -> dict[str, tuple[int, float]]:
    """One generation with the probe rotating over MODES per cycle: mode -> (tokens, seconds)."""
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 50000, (PROMPT_LEN,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=new, temperature=0.8, top_k=50, seed=0, ignore_eos=True)
    probes = {"off": None, "on": Tracer(engine, top_n=5), "lens": Tracer(engine, top_n=5, logit_lens="all")}
    for p in prompts:
        engine.add(p, params)
    out = dict.fromkeys(MODES, (0, 0.0))
    i = phase
    while engine.has_work():
        mode = MODES[i % len(MODES)]
        engine.probe = probes[mode]
        t = time.perf_counter()
        n = len(engine.step())
        dt = time.perf_counter() - t
        out[mode] = (out[mode][0] + n, out[mode][1] + dt)
        i += 1
    engine.probe = None
    assert sum(n for n, _ in out.values()) == batch * new
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6, help="generations per batch size (at least 2 run)")
    ap.add_argument("--budget-s", type=float, default=150, help="stop adding rounds past this many seconds")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = GPT(preset("gpt2", vocab_size=50257)).eval()
    t0 = time.perf_counter()
    table, ratios = [], {"on": [], "lens": []}
    for b, batch in enumerate((1, 8)):
        engine = Engine(model, CharTok(), slots=batch, max_len=PROMPT_LEN + NEW)
        one_round(engine, batch, 0, new=6)  # warm-up
        rounds = []
        for r in range(a.rounds):
            if r >= 2 and time.perf_counter() - t0 > a.budget_s * (b + 1) / 2:
                break
            rounds.append(one_round(engine, batch, r))
        tps = {m: sum(x[m][0] for x in rounds) / sum(x[m][1] for x in rounds) for m in MODES}
        per_round = [(x["on"][0] / x["on"][1]) / (x["off"][0] / x["off"][1]) for x in rounds]
        for m in ratios:
            ratios[m].append(tps[m] / tps["off"])
        table.append((batch, len(rounds), tps, per_round))
    print(f"GPT-2 124M fp32 CPU, 2 threads; {PROMPT_LEN}-token prompts, {NEW} new tokens; modes interleaved "
          f"per cycle ({time.perf_counter() - t0:.0f} s in all)")
    print(f"{'batch':>5} {'rounds':>6} {'off tok/s':>10} {'on tok/s':>9} {'lens tok/s':>11} {'on/off':>7} "
          f"{'lens/off':>9}   on/off per round")
    for batch, n, tps, per_round in table:
        spread = " ".join(f"{x:.3f}" for x in per_round)
        print(f"{batch:>5} {n:>6} {tps['off']:>10.2f} {tps['on']:>9.2f} {tps['lens']:>11.2f} "
              f"{tps['on'] / tps['off']:>7.3f} {tps['lens'] / tps['off']:>9.3f}   {spread}")
    gm = {m: math.exp(statistics.fmean(math.log(x) for x in v)) for m, v in ratios.items()}
    print("headline: geometric mean of the batch-1 and batch-8 ratios")
    print(f"RESULT trace_on_vs_off={gm['on']:.3f} lens_vs_off={gm['lens']:.3f}")


if __name__ == "__main__":
    main()
