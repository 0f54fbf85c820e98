"""What the oscilloscope costs: decode tokens/s with tracing off, on, and on with the logit lens at every layer.

GPT-2 124M shape (random init, fp32, CPU, torch.set_num_threads(2)), batch 1 and 8, 16-token prompts,
128 new tokens each (ignore_eos), top-5 alternatives recorded per cycle.

The three modes are interleaved cycle by cycle inside each generation: the probe is switched between
none, a Tracer and a Tracer with the lens at every block before each clock cycle (rotating, with a
different phase each round), and every tick is timed on its own. Each mode thus sees the same mix of
positions and the same drift in the machine's speed. tokens/s of a mode = batch / its median tick time
over all rounds (the median shrugs off other processes' bursts on a shared machine, where whole-run
timings swing by 2x); the mean-based figure is printed beside it.

    PYTHONPATH=src python bench/trace.py [--rounds N] [--budget-s S] [--new-tokens N] [--preset NAME]

A quick check that it runs end to end: --rounds 2 --new-tokens 8 --preset demo.

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


def one_round(engine: Engine, batch: int, phase: int, new: int = NEW) -> dict[str, list[float]]:
    """One generation with the probe rotating over MODES per cycle: mode -> seconds of each of its ticks."""
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 50000, (PROMPT_LEN,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=new, temperature=0.8, top_k=50, seed=0, ignore_eos=True)
    probes = {"off": None, "on": Tracer(engine, top_n=5), "lens": Tracer(engine, top_n=5, logit_lens="all")}
    for p in prompts:
        engine.add(p, params)
    out: dict[str, list[float]] = {m: [] for m in MODES}
    i, tokens = phase, 0
    while engine.has_work():
        mode = MODES[i % len(MODES)]
        prefill = bool(engine.waiting)
        engine.probe = probes[mode]
        t = time.perf_counter()
        n = len(engine.step())
        dt = time.perf_counter() - t
        if not prefill:
            assert n == batch
            out[mode].append(dt)
        tokens += n
        i += 1
    engine.probe = None
    assert tokens == batch * new
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6, help="generations per batch size (at least 2 run)")
    ap.add_argument("--budget-s", type=float, default=150, help="stop adding rounds past this many seconds")
    ap.add_argument("--new-tokens", type=int, default=NEW, help="new tokens per sequence (a short run: 8)")
    ap.add_argument("--preset", default="gpt2", help="model shape (config.PRESETS; a short run: demo)")
    a = ap.parse_args()
    if a.new_tokens < 1 or a.rounds < 1:
        raise SystemExit("llmclock: error: --new-tokens and --rounds must be at least 1")
    new = a.new_tokens
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = GPT(preset(a.preset, vocab_size=50257)).eval()
    name = "GPT-2 124M" if a.preset == "gpt2" else f"preset {a.preset!r} ({model.num_params() / 1e6:.1f}M)"
    t0 = time.perf_counter()
    table, ratios = [], {"on": [], "lens": []}
    for b, batch in enumerate((1, 8)):
        engine = Engine(model, CharTok(), slots=batch, max_len=PROMPT_LEN + new)
        one_round(engine, batch, 0, new=min(6, new))  # warm-up
        ticks: dict[str, list[float]] = {m: [] for m in MODES}
        n = 0
        for r in range(a.rounds):
            if r >= 2 and time.perf_counter() - t0 > a.budget_s * (b + 1) / 2:
                break
            for m, v in one_round(engine, batch, r, new=new).items():
                ticks[m] += v
            n += 1
        median = {m: batch / statistics.median(v) for m, v in ticks.items()}
        mean = {m: batch * len(v) / sum(v) for m, v in ticks.items()}
        for m, v in ratios.items():
            v.append(median[m] / median["off"])
        table.append((batch, n, median, mean))
    print(f"{name} fp32 CPU, 2 threads; {PROMPT_LEN}-token prompts, {new} new tokens; modes interleaved "
          f"per cycle; decode tokens/s from the median tick (mean tick in brackets); "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(f"{'batch':>5} {'rounds':>6} {'off':>16} {'on':>16} {'lens (all)':>16} {'on/off':>13} {'lens/off':>13}")
    for batch, n, med, mean in table:
        cells = " ".join(f"{med[m]:>7.2f} [{mean[m]:>6.2f}]" for m in MODES)
        rat = " ".join(f"{med[m] / med['off']:>5.3f} [{mean[m] / mean['off']:.3f}]" for m in ("on", "lens"))
        print(f"{batch:>5} {n:>6} {cells} {rat}")
    gm = {m: math.exp(statistics.fmean(math.log(x) for x in v)) for m, v in ratios.items()}
    print("headline: geometric mean over batch 1 and 8 of the median-tick ratios")
    print(f"RESULT trace_on_vs_off={gm['on']:.3f} lens_vs_off={gm['lens']:.3f}")


if __name__ == "__main__":
    main()
