"""Scaling out: training tokens/s on 1 vs 2 processes, the all-reduce per step, serving with 1 vs autoscaled replicas.

    PYTHONPATH=src python bench/scale.py [--steps N] [--rounds R] [--skip-serve]

Training: the same global batch (nano model, 2 x 12 sequences of 64 tokens a step) on one process
(--grad-accum 2, torch's threads over all cores) and on two (`llmclock train --nproc 2`, one micro-batch
and cores/2 threads each, DDP over gloo), alternated R times; tokens/s is the training loop's own (from
metrics.jsonl, start-up excluded), median over rounds. On a 2-core machine two processes cannot be much
faster than one process using both cores: the number says what the all-reduce and the split cost.
All-reduce: gloo's all_reduce of a tensor the size of the model's gradients between two processes
(what DDP adds to each step), median over 20 after 3 warm-ups.
Serving (Ray Serve, `--skip-serve` to leave out): the same burst of concurrent requests against a
deployment held at 1 replica and one autoscaling 1 -> 2; requests/s ratio.
Last line: RESULT tokens_per_s_1=<f> tokens_per_s_2=<f> allreduce_ms=<f> serve_autoscaled_vs_1=<x>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_WAIT_POLICY": "PASSIVE"}


def prepare_data(work: Path) -> Path:
    """Char-level shards of tinyshakespeare (or of Python's stdlib, which every install has)."""
    from llmclock.corpus import stdlib_sources
    from llmclock.data import prepare
    from llmclock.tokenizer import Tokenizer

    sources = [str(SHAKESPEARE)] if SHAKESPEARE.exists() else stdlib_sources()[:200]
    text = "".join(Path(s).read_text(errors="replace") for s in sources)[:1_000_000]
    corpus = work / "corpus.txt"
    corpus.write_text(text)
    tok = Tokenizer.train_char([text])
    out = work / "data"
    prepare([str(corpus)], tok, out, shuffle_files=False)
    tok.save(out / "tokenizer.json")
    return out


def train_tokens_per_s(data: Path, out: Path, steps: int, nproc: int) -> float:
    split = ["--grad-accum", "2"] if nproc == 1 else ["--nproc", str(nproc), "--grad-accum", "1"]
    cmd = [sys.executable, "-m", "llmclock", "train", "--data", str(data), "--out", str(out), "--preset", "nano",
           "--steps", str(steps), "--batch-size", "12", "--block-size", "64", "--eval-interval", "0",
           "--eval-batches", "1", "--log-interval", str(steps), "--device", "cpu", *split]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if p.returncode:
        sys.exit(f"training on {nproc} process(es) failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"][-1]["tokens_per_s"]


ALLREDUCE_WORKER = """
import os, statistics, sys, time, torch, torch.distributed as dist
from llmclock.config import preset
from llmclock.model import GPT
torch.set_num_threads(1)
dist.init_process_group("gloo")
n = sum(p.numel() for p in GPT(preset("nano", vocab_size=int(sys.argv[1]))).parameters())
grad = torch.randn(n)
times = []
for i in range(23):
    dist.barrier()
    t0 = time.perf_counter()
    dist.all_reduce(grad)
    times.append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    print(f"ALLREDUCE params={n} ms={1000 * statistics.median(times[3:]):.3f}")
dist.destroy_process_group()
"""


def allreduce_ms(vocab: int, work: Path) -> tuple[int, float]:
    script = work / "allreduce.py"
    script.write_text(ALLREDUCE_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(vocab)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("ALLREDUCE")), None)
    if line is None:
        sys.exit(f"all-reduce worker failed:\n{p.stderr[-2000:]}")
    fields = dict(kv.split("=") for kv in line.split()[1:])
    return int(fields["params"]), float(fields["ms"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60, help="training steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="1-process / 2-process runs, alternated")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--requests", type=int, default=48, help="serving: requests in the burst")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_data(work)
        vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
        one, two = [], []
        for r in range(a.rounds):
            one.append(train_tokens_per_s(data, work / f"one{r}", a.steps, 1))
            two.append(train_tokens_per_s(data, work / f"two{r}", a.steps, 2))
            print(f"round {r + 1}: 1 process {one[-1]:,.0f} tokens/s   2 processes {two[-1]:,.0f} tokens/s", flush=True)
        t1, t2 = statistics.median(one), statistics.median(two)
        print(f"training, global batch 24 x 64 tokens (nano, vocab {vocab}), {a.steps} steps, median of {a.rounds}:")
        print(f"  1 process  {t1:10,.0f} tokens/s")
        print(f"  2 processes{t2:10,.0f} tokens/s   ({t2 / t1:.2f}x; {os.cpu_count()} CPU cores on this machine)")
        params, ms = allreduce_ms(vocab, work)
        print(f"all-reduce of the gradients ({params:,} floats, gloo, 2 processes): {ms:.2f} ms per step")
        ratio = float("nan")
        if not a.skip_serve:
            from serve_burst import autoscaled_vs_one  # bench/serve_burst.py: Ray Serve, 1 vs autoscaled

            ratio = autoscaled_vs_one(work, a.requests)
    print(f"RESULT tokens_per_s_1={t1:.1f} tokens_per_s_2={t2:.1f} allreduce_ms={ms:.3f} serve_autoscaled_vs_1={ratio:.3f}")


if __name__ == "__main__":
    main()
