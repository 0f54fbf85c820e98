"""Training throughput and quality on nanoGPT's CPU char-level Shakespeare recipe.

    PYTHONPATH=src python bench/train.py [--data TEXT_FILE] [--iters N] [--compile]

The recipe (nanoGPT README, "I only have a macbook"): characters as tokens, 4 layers, 4 heads,
n_embd 128, block 64, batch 12, dropout 0, AdamW lr 1e-3 (beta2 0.99, weight decay 0.1 on
matrices, grad clip 1.0), 100 warm-up steps, cosine decay to 1e-4 at 2000 steps, validation
every 250 steps over 20 batches, first 90% of the text for training and the last 10% for val.
nanoGPT itself runs it here at ~22,000 tokens/s and ends at val loss 1.886.

Both sides train nanoGPT's model for this recipe (no biases, exact GELU):
  reference  nanoGPT's train.py loop, eager (torch's default CPU AdamW, a batch of per-row numpy
             slices, a 40-forward train+val estimate every 250 steps), `--ref-iters` steps, in a
             process of its own with the environment a nanoGPT user has (OpenMP's default wait
             policy), once before and once after llmclock's run; the ratio uses their mean;
  llmclock   `llmclock.train.train` with the full recipe as `llmclock train` runs it (spinning
             OpenMP threads, fused AdamW, the fused CPU kernels of llmclock.fused), in a process
             of its own. Its training loop, evaluations included, is timed as the reference's is
             (after model and optimizer set-up): that is the ms/iter of the RESULT line and of the
             ratio. The whole call (set-up, the final val/test evaluation, checkpoint and plot
             too) is printed beside it.
The machine's speed drifts over minutes, so the in-run ratio is the number to trust.
The last line is machine-readable:
    RESULT ms_per_iter=<float> tokens_per_s=<float> val_loss=<float>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--llmclock-only" in sys.argv:
    # llmclock's trainer runs with OpenMP threads that spin between ops instead of sleeping (what
    # `llmclock train` sets; see README). It must be in the environment before torch loads. Only
    # in its own child: spinning threads left in this parent would steal cores from the others.
    from llmclock.threads import prefer_spinning_threads

    prefer_spinning_threads()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmclock.config import ModelConfig, TrainConfig
from llmclock.data import TokenData, prepare
from llmclock.model import GPT
from llmclock.tokenizer import Tokenizer
from llmclock.train import lr_at, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_TOKENS_PER_S = 22_000.0
"""nanoGPT's own run of this recipe on this machine (~35 ms/iter)."""
NANOGPT_VAL_LOSS = 1.886


def recipe(iters: int, compile: bool) -> TrainConfig:
    return TrainConfig(
        max_steps=iters, batch_size=12, block_size=64, learning_rate=1e-3, min_lr=1e-4,
        warmup_steps=100, lr_decay_steps=2000, weight_decay=0.1, beta1=0.9, beta2=0.99,
        grad_clip=1.0, eval_interval=250, eval_batches=20, seed=1337, compile=compile, device="cpu",
    )


def nano_model(vocab_size: int) -> ModelConfig:
    """nanoGPT's model for this recipe: no biases (its train.py default) and exact GELU (nn.GELU)."""
    return ModelConfig(vocab_size=vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                       bias=False, activation="gelu")


def run_child(role: str, data_dir: Path, args) -> dict:
    """One side in a process of its own; returns the JSON its last line prints.

    The reference gets the environment a nanoGPT user has; llmclock's side sets its thread policy
    itself (see the top of this file). Separate processes keep llmclock's spinning OpenMP threads
    from stealing a core from a reference that runs after it.
    """
    cmd = [sys.executable, __file__, f"--{role}-only", "--data-dir", str(data_dir), "--ref-iters", str(args.ref_iters),
           "--iters", str(args.iters)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--compile"] if args.compile else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def reference(model_config: ModelConfig, cfg: TrainConfig, data: TokenData, iters: int) -> float:
    """nanoGPT's train.py loop, eager, with our GPT; returns seconds per iteration, evals included."""
    train_d, val_d = data.tokens("train"), data.tokens("val")
    B, T = cfg.batch_size, cfg.block_size

    def get_batch(split: str):
        d = train_d if split == "train" else val_d
        ix = torch.randint(len(d) - T, (B,))
        x = torch.stack([torch.from_numpy(d[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    torch.manual_seed(cfg.seed)
    model = GPT(model_config)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # nanoGPT asks for fused=True only on CUDA; on CPU it gets torch's default (for-loop) AdamW.
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))

    @torch.no_grad()
    def estimate_loss() -> None:
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(cfg.eval_batches)
            for k in range(cfg.eval_batches):
                _, loss = model(*get_batch(split))
                losses[k] = loss.item()
        model.train()

    t0 = time.perf_counter()
    for it in range(iters):
        lr = lr_at(it, cfg)  # nanoGPT's get_lr: the same warm-up + cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % cfg.eval_interval == 0:
            estimate_loss()
        _, loss = model(*get_batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT reads the loss for its log line every iteration
    return (time.perf_counter() - t0) / iters


def run_llmclock(model_config: ModelConfig, cfg: TrainConfig, data: TokenData, out_dir: Path) -> dict:
    """`llmclock.train.train` as `llmclock train` runs it: the whole call timed here, the loop by
    the trainer (TrainResult.ms_per_step)."""
    step_times: list[float] = []
    t0 = time.perf_counter()
    res = train(model_config, cfg, data, out_dir, progress=False,
                on_step=lambda step, loss: step_times.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    typical = (step_times[-1] - step_times[1]) / (len(step_times) - 2) if len(step_times) > 2 else float("nan")
    return {"wall": wall, "steps": res.step, "loop_ms": res.ms_per_step, "first_step_s": step_times[0] - t0,
            "typical_s": typical, "val": res.evals["val"]["loss"], "last_loss": res.last_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="any UTF-8 text file")
    ap.add_argument("--iters", type=int, default=2000, help="training steps of the llmclock run")
    ap.add_argument("--ref-iters", type=int, default=250, help="steps of each reference run (one eval period)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (TrainConfig.compile)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--llmclock-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reference_only or args.llmclock_only:  # a child process: one side of the comparison
        data = TokenData(args.data_dir)
        model_config = nano_model(data.vocab_size)
        if args.reference_only:
            result = {"s_per_iter": reference(model_config, recipe(2000, False), data, args.ref_iters)}
        else:
            with tempfile.TemporaryDirectory(prefix="llmclock-bench-run-") as run:
                result = run_llmclock(model_config, recipe(args.iters, args.compile), data, Path(run) / "run")
        print(json.dumps(result))
        return

    if not Path(args.data).is_file():
        raise SystemExit(f"llmclock: error: no text file at {args.data} (pass --data FILE)")
    with tempfile.TemporaryDirectory(prefix="llmclock-bench-train-") as tmp:
        tmp = Path(tmp)
        text = Path(args.data).read_text(encoding="utf-8")
        tok = Tokenizer.train_char([text])
        prepare([args.data], tok, tmp / "data", val_fraction=0.1, test_fraction=0.0, shuffle_files=False)
        data = TokenData(tmp / "data")
        cfg = recipe(args.iters, args.compile)
        tokens_per_iter = cfg.batch_size * cfg.block_size
        print(f"data {args.data}: {data.num_tokens('train'):,} train / {data.num_tokens('val'):,} val tokens, "
              f"vocab {tok.vocab_size}; torch {torch.__version__}, {torch.get_num_threads()} threads")

        def reference_run(when: str) -> float:
            ref = run_child("reference", tmp / "data", args)["s_per_iter"] if args.ref_iters else float("nan")
            print(f"reference {when} (eager nanoGPT loop in its own process, {args.ref_iters} iters): "
                  f"{1000 * ref:.2f} ms/iter, {tokens_per_iter / ref:,.0f} tokens/s")
            return ref

        # The machine's speed drifts over minutes: the reference runs before and after ours.
        ref_before = reference_run("before")
        r = run_child("llmclock", tmp / "data", args)
        ref_after = reference_run("after")
        ref_s = (ref_before + ref_after) / 2
    drift = max(ref_before, ref_after) / min(ref_before, ref_after) - 1 if args.ref_iters else 0.0
    steps, wall, val = r["steps"], r["wall"], r["val"]
    ms, ms_whole = r["loop_ms"], 1000 * wall / steps
    tps = tokens_per_iter / ms * 1000
    print(f"first step {r['first_step_s']:.2f} s (set-up{' + compile' if args.compile else ''}), "
          f"then {1000 * r['typical_s']:.2f} ms/iter between steps (evals included)")
    print(f"llmclock trainer ({steps} iters{', compiled' if args.compile else ''}, own process):")
    print(f"  training loop, evaluations included (as the reference is timed): {ms:.2f} ms/iter, {tps:,.0f} tokens/s")
    print(f"  whole call (+ set-up, final val/test evaluation, checkpoint, plot; {wall:.1f} s): {ms_whole:.2f} ms/iter")
    print(f"  final train loss {r['last_loss']:.4f}, val loss {val:.4f} (nanoGPT: {NANOGPT_VAL_LOSS})")
    print(f"  vs in-run reference (mean of before and after, {1000 * ref_s:.2f} ms/iter): {1000 * ref_s / ms:.2f}x "
          f"(whole call: {1000 * ref_s / ms_whole:.2f}x); vs nanoGPT's {NANOGPT_TOKENS_PER_S:,.0f} tokens/s: "
          f"{tps / NANOGPT_TOKENS_PER_S:.2f}x")
    if drift > 0.25:
        print(f"  WARNING: the reference's speed moved {100 * drift:.0f}% between its two runs (the machine's "
              "load changed); the ratio above is not to be trusted, run again")
    print(f"RESULT ms_per_iter={ms:.3f} tokens_per_s={tps:.1f} val_loss={val:.4f}")


if __name__ == "__main__":
    sys.exit(main())
