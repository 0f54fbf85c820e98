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


def serve_autoscaled_vs_one(work: Path, requests: int, clients: int) -> float:
    """Requests/s of one burst against 1 replica, then against a deployment autoscaling 1 -> 2 (Ray, 2 CPUs)."""
    import asyncio
    import socket

    import httpx
    import ray
    import torch

    from llmclock.checkpoint import write_checkpoint
    from llmclock.config import preset
    from llmclock.model import GPT
    from llmclock.server.config import ServerConfig
    from llmclock.server.replicas import ReplicaConfig, replica_count, start, stop
    from llmclock.tokenizer import Tokenizer

    tok = Tokenizer.load(work / "data" / "tokenizer.json")
    torch.manual_seed(0)
    write_checkpoint(work / "serve_ckpt", GPT(preset("nano", vocab_size=tok.vocab_size, block_size=256)), tok)
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(ckpt=str(work / "serve_ckpt"), port=port, slots=8, queue=256)
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": config.model_name, "prompt": "To be, or not to be", "max_tokens": 64, "temperature": 1.0}

    async def burst() -> tuple[float, int, int]:
        done = failed = 0
        todo = iter(range(requests))

        async def client(c):
            nonlocal done, failed
            for _ in todo:
                r = await c.post(url, json=body)
                done, failed = done + (r.status_code == 200), failed + (r.status_code != 200)

        async with httpx.AsyncClient(timeout=300) as c:
            t0 = time.perf_counter()
            await asyncio.gather(*(client(c) for _ in range(clients)))
            return time.perf_counter() - t0, done, failed

    rates = {}
    try:
        for name, most in (("1 replica", 1), ("autoscaled 1-2", 2)):
            scaling = ReplicaConfig(min_replicas=1, max_replicas=most, target_ongoing_requests=config.slots,
                                    upscale_delay_s=1.0, downscale_delay_s=5.0, look_back_period_s=2.0)
            start(config, scaling)
            secs, ok, bad = asyncio.run(burst())
            rates[name] = ok / secs
            print(f"serving, {requests} requests x 64 tokens from {clients} clients, {name}: {secs:.1f} s, "
                  f"{rates[name]:.2f} requests/s ({bad} failed; {replica_count()} replica(s) at the end)", flush=True)
            while replica_count() > 1:  # back to one replica before the next burst
                time.sleep(0.5)
    finally:
        stop()
    ratio = rates["autoscaled 1-2"] / rates["1 replica"]
    print(f"  autoscaled / 1 replica: {ratio:.2f}x (replica start-up included; 2 CPUs)")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60, help="training steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="1-process / 2-process runs, alternated")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--requests", type=int, default=400, help="serving: requests in the burst")
    ap.add_argument("--clients", type=int, default=16, help="serving: concurrent clients")
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
            try:
                ratio = serve_autoscaled_vs_one(work, a.requests, a.clients)
            except ImportError as e:  # no server package or no Ray (pip install 'llmclock[serve,ray]')
                print(f"serving: not measured ({e})")
    print(f"RESULT tokens_per_s_1={t1:.1f} tokens_per_s_2={t2:.1f} allreduce_ms={ms:.3f} serve_autoscaled_vs_1={ratio:.3f}")


if __name__ == "__main__":
    main()
