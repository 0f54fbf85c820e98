"""Serving: continuous batching over HTTP vs one request at a time vs the engine called directly.

    python bench/serve.py [--ckpt DIR | --preset gpt2 --train-minutes 2] [--seconds 6] [--rounds 5] [--threads 1]

Without --ckpt, trains a model of --preset's shape (default gpt2: GPT-2 small, 12 layers, 768 wide,
with the embedded corpus's 4096-token BPE vocabulary and a 128-token context, ~88M parameters) on the
embedded corpus for --train-minutes first, and keeps it in --run/<preset> for the next run. Continuous
batching pays off by reading each weight once for every running sequence; a model whose weights fit in
the CPU's cache (the 2.8M-parameter `--preset demo`, 11 MB) is not memory-bound at batch 1, so the
engine itself gains ~3.5x from 16 slots there and no server can show 4x on it.

Each round starts three processes on the same checkpoint: two servers on 127.0.0.1, one with 16
slots (continuous batching) and one with 1 slot (one request at a time, the rest queue), and the
reference, the engine called directly with no HTTP. Each serves a 2-second warm-up; then, in turn,
each phase for --seconds:

  - the reference: the engine called directly, one request after another;
  - 1, 4 and 16 concurrent streaming clients on the batching server;
  - 16 clients on the one-slot server, same requests;

and the round stops all three. The reference is a process as old as the servers, started with them:
on this 2-core VM a process just started decoded 3-20% faster than the same code in a process
minutes old (in four pairs: 0.97, 0.91, 0.93, 0.83x), and identical processes decode up to ~10%
apart for their whole life (where their memory landed); fresh processes each round spread that luck
over the rounds rather than putting one process's into every ratio.

Clients are asyncio + httpx in this process, each sending greedy streamed completions from a
fixed list of prompts until the time is up; every token arrives as its own SSE chunk (logprobs=0),
so time to first token (TTFT) and inter-token latency (ITL) are measured per token.
The ratios are medians over the rounds of ratios within a round (phases seconds apart), the tables
each phase's fastest round. Each server and the reference run torch with --threads threads (default 1:
servers, reference and clients share the machine). Set LLMCLOCK_NO_CKERNELS=1 to run every side on
torch's ops instead of the engine's compiled kernels.
Targets: batching_gain_16 >= 4, p99_itl_16_vs_1 <= 3, http_vs_engine >= 0.9, errors = 0. Last line:
    RESULT batching_gain_16=<x> p99_itl_16_vs_1=<x> http_vs_engine=<x> errors=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["def ", "class ", "import ", '"""', "for i in ", "if __name__", "return ", "The "]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, slots: int, threads: int, queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    code = ("import sys; from llmclock.server import ServerConfig, run_server; "
            f"run_server(ServerConfig(ckpt={ckpt!r}, port={port}, slots={slots}, queue={queue}, threads={threads}))")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def stop_servers(servers: list[tuple[subprocess.Popen, str]]) -> None:
    for proc, _ in servers:
        proc.terminate()
    for proc, _ in servers:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: the server at {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"bench: the server at {url} was not ready in {timeout:.0f} s")


async def client(http, url: str, k: int, deadline: float, max_tokens: int, stats: dict) -> None:
    i = k
    while time.perf_counter() < deadline:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "logprobs": 0}
        i += len(PROMPTS) // 2 + 1
        t0 = last = time.perf_counter()
        first, ok = True, False
        try:
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    stats["errors"] += 1
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        ok = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        break
                    now = time.perf_counter()
                    (stats["ttft"] if first else stats["itl"]).append(now - (t0 if first else last))
                    first, last = False, now
                    stats["tokens"] += len(chunk["choices"][0]["logprobs"]["tokens"])
        except Exception:  # noqa: BLE001 - a benchmark counts failures, it does not stop at one
            ok = False
        stats["requests" if ok else "errors"] += 1


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    import httpx

    stats = {"tokens": 0, "requests": 0, "errors": 0, "ttft": [], "itl": []}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, url, k, t0 + seconds, max_tokens, stats) for k in range(clients)))
        stats["seconds"] = time.perf_counter() - t0
    return stats


class EngineDirect:
    """The reference: the engine called directly, in a process of its own started with the servers (as
    long-lived as theirs: on this VM a process just started decoded 3-20% faster than one minutes old,
    with nothing else changed), sending the same requests one after another when asked to."""

    def __init__(self, ckpt: str, max_tokens: int, threads: int):
        self.proc = subprocess.Popen([sys.executable, __file__, "--engine-direct", "--ckpt", ckpt, "--max-tokens",
                                      str(max_tokens), "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})

    def run(self, seconds: float) -> dict:
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench: the reference process exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _engine_direct(ckpt: str, max_tokens: int, threads: int) -> None:
    """The reference's process: for each number of seconds read from stdin, a JSON line of what it made."""
    import torch

    from llmclock.checkpoint import load_checkpoint
    from llmclock.engine import Engine, SamplingParams

    torch.set_num_threads(threads)
    model, tok = load_checkpoint(ckpt)
    engine = Engine(model, tok, slots=16)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, logprobs=0)
    for line in sys.stdin:
        seconds = float(line)
        tokens, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            tokens += sum(1 for _ in engine.generate([PROMPTS[i % len(PROMPTS)]], params))
            i += len(PROMPTS) // 2 + 1
        print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}), flush=True)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def report(name: str, s: dict) -> None:
    tps = s["tokens"] / s["seconds"]
    print(f"{name:<26} {s['requests'] / s['seconds']:7.2f} req/s {tps:8.1f} tok/s  "
          f"TTFT p50 {pct(s['ttft'], .5) * 1e3:7.1f} p99 {pct(s['ttft'], .99) * 1e3:7.1f} ms  "
          f"ITL p50 {pct(s['itl'], .5) * 1e3:6.2f} p99 {pct(s['itl'], .99) * 1e3:6.2f} ms  errors {s['errors']}",
          flush=True)


def trained_checkpoint(preset_name: str, minutes: float, out: Path) -> str:
    """A model of the preset's shape trained for `minutes` on the embedded corpus (the demo's tokenizer
    and token shards, 4096-token vocabulary, 128-token context), kept in `out` and reused next time."""
    ckpt = out / "ckpt"
    if (ckpt / "model.safetensors").is_file() and (out / "preset.txt").is_file() \
            and (out / "preset.txt").read_text() == preset_name:
        print(f"reusing {ckpt} (delete it to train again)", file=sys.stderr)
        return str(ckpt)
    import shutil

    from llmclock.config import TrainConfig, preset
    from llmclock.corpus import stdlib_sources
    from llmclock.demo import build_data, corpus_key
    from llmclock.train import train

    shutil.rmtree(out, ignore_errors=True)
    sources = stdlib_sources()[:80]
    tok, data = build_data(Path("runs/.cache") / corpus_key(sources, 4096), sources, 4096,
                           lambda *a, **k: print(*a, **k, file=sys.stderr))
    mcfg = preset(preset_name, vocab_size=tok.vocab_size, block_size=128)
    tcfg = TrainConfig(batch_size=8, block_size=128, learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, seed=0,
                       max_steps=100_000, lr_decay_steps=200, max_seconds=minutes * 60, eval_interval=100_000,
                       eval_batches=4)
    print(f"training a {preset_name}-shape model ({mcfg.n_layer} layers, {mcfg.n_embd} wide) for {minutes:g} min",
          file=sys.stderr)
    train(mcfg, tcfg, data, out, tokenizer=tok)
    (out / "preset.txt").write_text(preset_name)
    return str(ckpt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="checkpoint to serve (default: train a --preset model for --train-minutes)")
    ap.add_argument("--preset", default="gpt2", help="shape of the model trained when no --ckpt is given "
                    "(default gpt2: GPT-2 small, 12 layers, 768 wide; 'demo' is the 2.8M-parameter demo model)")
    ap.add_argument("--train-minutes", type=float, default=2.0)
    ap.add_argument("--run", default="runs/bench-serve", help="where the trained model is kept (and reused)")
    ap.add_argument("--seconds", type=float, default=6.0, help="each load phase runs this long")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server and of the reference")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine-direct", action="store_true", help=argparse.SUPPRESS)  # the reference's process
    args = ap.parse_args()
    if args.engine_direct:
        _engine_direct(args.ckpt, args.max_tokens, args.threads)
        return
    ckpt = args.ckpt or trained_checkpoint(args.preset, args.train_minutes, Path(args.run) / args.preset)
    print(f"checkpoint {ckpt}; {args.threads} thread(s); max_tokens {args.max_tokens}; {args.seconds:g} s per "
          f"phase; {args.rounds} rounds, phases interleaved, fresh servers each round", flush=True)
    rounds: dict = {}
    for r in range(args.rounds):
        (_, batching), (_, serial) = servers = [start_server(ckpt, slots, args.threads, queue=64) for slots in (16, 1)]
        direct = EngineDirect(ckpt, args.max_tokens, args.threads)
        try:
            for proc, url in servers:
                wait_ready(url, proc)
            direct.run(2.0)  # warm all three up
            asyncio.run(load(batching, 2, 2.0, args.max_tokens))
            asyncio.run(load(serial, 2, 2.0, args.max_tokens))
            rounds.setdefault("direct", []).append(direct.run(args.seconds))
            for n in (1, 4, 16):
                rounds.setdefault(n, []).append(asyncio.run(load(batching, n, args.seconds, args.max_tokens)))
            rounds.setdefault("serial", []).append(asyncio.run(load(serial, 16, args.seconds, args.max_tokens)))
        finally:
            direct.close()
            stop_servers(servers)
        print(f"round {r + 1}: " + ", ".join(f"{k}: {x[-1]['tokens'] / x[-1]['seconds']:.0f} tok/s"
                                              for k, x in rounds.items()), flush=True)
    errors = sum(x["errors"] for k, xs in rounds.items() if k != "direct" for x in xs)
    best = {k: max(xs, key=lambda x: x["tokens"] / x["seconds"]) for k, xs in rounds.items()}
    direct_tps = best["direct"]["tokens"] / best["direct"]["seconds"]
    print(f"{'engine direct, 1 stream':<26} {'':>13} {direct_tps:8.1f} tok/s   (each phase: its fastest round)")
    for n in (1, 4, 16, "serial"):
        report(f"HTTP, {n} client{'s' * (n != 1)}" if n != "serial" else "HTTP, 16 clients, 1 slot", best[n])
    # The ratios pair phases of the same round (seconds apart): this VM's speed drifts by ±20% over
    # minutes, so the fastest rounds of two phases may come from different speeds; the median of the
    # rounds' ratios is the figure.
    tps = {k: [x["tokens"] / x["seconds"] for x in xs] for k, xs in rounds.items()}
    per = {"gain": [a / b for a, b in zip(tps[16], tps["serial"])],
           "itl": [pct(a["itl"], .99) / pct(b["itl"], .99) for a, b in zip(rounds[16], rounds[1])],
           "http": [a / b for a, b in zip(tps[1], tps["direct"])]}
    gain, itl, http = (statistics.median(per[k]) for k in ("gain", "itl", "http"))
    each = {k: ", ".join(f"{v:.2f}" for v in vs) for k, vs in per.items()}
    print(f"16-client throughput, batching / one at a time: {gain:.2f}x (target >= 4; rounds: {each['gain']})")
    print(f"p99 inter-token latency, 16 clients / 1 client: {itl:.2f}x (target <= 3; rounds: {each['itl']})")
    print(f"1 client over HTTP / engine direct: {http:.2f}x (target >= 0.9; rounds: {each['http']})")
    print(f"RESULT batching_gain_16={gain:.2f} p99_itl_16_vs_1={itl:.2f} http_vs_engine={http:.2f} errors={errors}")


if __name__ == "__main__":
    main()
