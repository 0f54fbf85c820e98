"""Before -> after: what a compression cost and bought, each checkpoint measured in its own process.

    python -m llmclock.compress.report CKPT --data DIR [--split test]   # one JSON line

A fresh process per checkpoint makes its peak memory (ru_maxrss after loading and decoding at
batch 8) its own. Decode speed is the engine's greedy decode from a 16-token prompt, best of two
runs; quality is loss on fixed windows of a held-out split, as perplexity and bits per byte (the
windows' targets decoded to UTF-8); the trace's per-stage times are the mean tick's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from ..errors import LLMClockError

PROMPT = 16


def decode_speed(model, batch: int, new_tokens: int, rounds: int = 2) -> float:
    """Tokens/s of greedy decode at `batch` slots (best of `rounds`)."""
    import torch

    from ..engine import Engine, SamplingParams

    engine = Engine(model, None, slots=batch, max_len=PROMPT + new_tokens)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(model.config.vocab_size, (batch, PROMPT), generator=g).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        engine.complete(prompts, params)
        best = max(best, batch * new_tokens / (time.perf_counter() - t))
    return best


def stage_times(model, tokenizer, new_tokens: int) -> dict[str, float]:
    """Mean milliseconds per tick cycle in each trace stage group (embed, blocks, head, sample, post)."""
    import torch

    from ..engine import Engine, SamplingParams
    from ..trace import Tracer
    from ..trace_export import GROUPS, cycles

    engine = Engine(model, tokenizer, slots=1, max_len=PROMPT + new_tokens)
    prompt = torch.randint(model.config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(2)).tolist()
    with Tracer(engine, top_n=0) as tr:
        engine.complete([prompt], SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
    ticks = [c for c in cycles(tr.records) if c.kind == "tick"]
    return {g: 1e3 * sum(c.groups()[g] for c in ticks) / max(len(ticks), 1) for g in GROUPS}


def quality(model, tokenizer, data_dir, split: str, batches: int, block_size: int) -> dict:
    """Perplexity and bits per byte on fixed windows of a held-out split."""
    from ..data import TokenData, eval_batches
    from ..evaluate import evaluate

    data = TokenData(data_dir)
    if data.vocab_size > model.config.vocab_size:
        raise LLMClockError(f"data has {data.vocab_size} token ids but the model only {model.config.vocab_size}")
    block_size = min(block_size, model.config.block_size)
    x, y = eval_batches(data.tokens(split), 8, block_size, batches, seed=0, split=split)
    r = evaluate(model, x, y, device="cpu", chunk=8)
    n_bytes = sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in y)
    return {"ppl": r["ppl"], "bpb": r["loss"] * y.size / (n_bytes * math.log(2))}


def measure(ckpt, data_dir=None, *, split: str = "test", batches: int = 8, block_size: int = 256,
            new_tokens: int = 64, threads: int | None = None) -> dict:
    """Every column of the table for one checkpoint, in this process."""
    import torch

    from ..checkpoint import WEIGHTS, load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model, tok = load_checkpoint(ckpt)
    out = {"size_mb": (Path(ckpt) / WEIGHTS).stat().st_size / 1e6,
           "params_m": sum(t.numel() for t in model.state_dict().values()) / 1e6}
    with torch.inference_mode():
        out["tok_s_b1"] = decode_speed(model, 1, new_tokens)
        out["tok_s_b8"] = decode_speed(model, 8, new_tokens)
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux
        out["stages_ms"] = stage_times(model, tok, min(new_tokens, 32))
    if data_dir is not None:
        out.update(quality(model, tok, data_dir, split, batches, block_size))
    return out


def measure_in_subprocess(ckpt, data_dir=None, **kw) -> dict:
    """`measure` in a fresh Python process (so peak memory is this checkpoint's alone)."""
    args = [sys.executable, "-m", "llmclock.compress.report", str(ckpt)] + (["--data", str(data_dir)] if data_dir else [])
    for k, v in kw.items():
        if v is not None:
            args += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                     os.environ.get("PYTHONPATH")])))
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise LLMClockError(f"measuring {ckpt} failed: {err}")
    return json.loads(lines[-1])


def table(before: dict, after: dict) -> str:
    """The before -> after table, one row per measure."""
    rows = [
        ("size on disk (MB)", "size_mb", "{:.2f}"),
        ("parameters + buffers (M)", "params_m", "{:.3f}"),
        ("peak memory (MB)", "peak_mb", "{:.0f}"),
        ("decode tokens/s, batch 1", "tok_s_b1", "{:.1f}"),
        ("decode tokens/s, batch 8", "tok_s_b8", "{:.1f}"),
        ("perplexity (held-out)", "ppl", "{:.3f}"),
        ("bits per byte (held-out)", "bpb", "{:.4f}"),
    ]
    rows += [(f"trace: {g} (ms/cycle)", ("stages_ms", g), "{:.3f}") for g in before["stages_ms"]]

    def get(d, key):
        return d[key[0]][key[1]] if isinstance(key, tuple) else d.get(key)

    lines = [f"{'':<28}{'before':>12}{'after':>12}{'ratio':>9}"]
    for label, key, fmt in rows:
        b, a = get(before, key), get(after, key)
        if b is None or a is None:
            continue  # quality without --data
        ratio = f"{a / b:.2f}x" if b else "-"
        lines.append(f"{label:<28}{fmt.format(b):>12}{fmt.format(a):>12}{ratio:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="measure one checkpoint; prints one JSON line")
    ap.add_argument("ckpt")
    ap.add_argument("--data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        r = measure(a.ckpt, a.data, split=a.split, batches=a.batches, block_size=a.block_size,
                    new_tokens=a.new_tokens, threads=a.threads)
    except LLMClockError as e:
        print(f"llmclock: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
