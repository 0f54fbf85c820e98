"""Fine-tuning on the docstring summarization task: LoRA vs full fine-tuning, same wall time.

    PYTHONPATH=src python bench/finetune.py [--pretrain-minutes 5] [--finetune-seconds 150]
    PYTHONPATH=src python bench/finetune.py --quick      # ~3 minutes: checks it runs, not the targets
                                                         # (also LLMCLOCK_BENCH_QUICK=1)

1. A demo-size GPT (4 layers, 4 heads, 192 wide, context 256) is pre-trained on this Python's
   standard library for a bounded time (the tokenizer and shards come from `llmclock demo`'s
   cache under runs/.cache when present).
2. `llmclock data docstrings` builds the task (input: a function's source without its
   docstring; reference: the docstring's first line; split by module).
3. The base model, a LoRA fine-tune (rank 16 on every attention and MLP projection) and a full
   fine-tune, each trained for the same wall time in a process of its own (peak memory is that
   process's maximum resident set), are scored on the test split: greedy one-line summaries on
   the engine, ROUGE-L (rouge-score) and BLEU (sacrebleu). Fine-tuning packs whole examples
   into 256-token rows (`finetune --pack`; the docstring examples average ~70 tokens, so padded
   batches would be mostly padding) and the masked loss on the validation split is printed
   before and after, so a run too short to move ROUGE still shows whether the task is learned.
4. The tokens/s ratio: a LoRA and a full step alternately on the same batches (median of
   --ab-rounds each), since the machine's speed drifts between the two timed runs.

On a machine shared with other work, run it with OMP_NUM_THREADS=1: two OpenMP threads on two
busy cores wait on each other at every barrier (measured here under a load average of ~10: 5
pre-training steps in 75 s with 2 threads, 288 in 436 s with 1).

Targets (issue 11): each fine-tune gains >= 5 ROUGE-L points over the base model, and LoRA
trains at least as many tokens/s as full fine-tuning. Last line:
    RESULT rougeL_base=<f> rougeL_lora=<f> rougeL_full=<f> lora_trainable_frac=<f>
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _finetune_child(base, train_path, val_path, out, method, lr, seconds, batch_size, pack, result_path) -> None:
    from llmclock.adapters import AdapterConfig
    from llmclock.config import TrainConfig
    from llmclock.finetune import finetune
    from llmclock.threads import keep_freed_memory

    keep_freed_memory()
    recipe = TrainConfig(max_steps=100_000, max_seconds=seconds, batch_size=batch_size, block_size=256,
                         learning_rate=lr, min_lr=lr, warmup_steps=10, weight_decay=0.0, eval_interval=0, seed=1,
                         device="cpu")
    cfg = AdapterConfig(method=method, r=16, alpha=32, targets=["c_attn", "c_proj", "c_fc"])
    r = finetune(base, train_path, out, recipe, cfg, val_path=val_path, progress=False, log_interval=5, pack=pack)
    losses = [json.loads(line)["loss"] for line in Path(r.metrics).read_text().splitlines()
              if json.loads(line).get("split", "train") == "train" and "loss" in json.loads(line)]
    Path(result_path).write_text(json.dumps({
        "steps": r.step, "tokens_per_s": r.tokens_per_s, "trainable": r.trainable, "total": r.total,
        "first_loss": losses[0] if losses else float("nan"), "last_loss": r.last_loss, "val_loss": r.val_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ckpt": str(r.ckpt),
    }))


def run_finetune(method: str, base: Path, train_path: Path, val_path: Path, out: Path, lr: float, seconds: float,
                 batch: int, pack: bool) -> dict:
    result = out / f"{method}.result.json"
    p = mp.get_context("spawn").Process(target=_finetune_child,
                                        args=(str(base), str(train_path), str(val_path), str(out / method), method,
                                              lr, seconds, batch, pack, str(result)))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"{method} fine-tune failed (exit {p.exitcode})")
    return json.loads(result.read_text())


def interleaved_throughput(base: Path, train_path: Path, batch_size: int, rounds: int, pack: bool) -> dict:
    """Tokens/s of a LoRA and a full fine-tuning step measured alternately on the same batches
    (the machine's speed drifts; alternating A/B keeps the ratio fair): median of `rounds` steps each."""
    import statistics

    import torch

    from llmclock.adapters import AdapterConfig, apply_adapter, guard_fused
    from llmclock.checkpoint import load_checkpoint
    from llmclock.config import TrainConfig
    from llmclock.fused import fuse_cpu_ops
    from llmclock.sft import ChatTemplate, batch_indices, collate, load_examples, pack as pack_rows
    from llmclock.train import make_optimizer

    tok = load_checkpoint(base)[1]
    examples = load_examples(train_path, tok, ChatTemplate(), max_len=257)
    if pack:
        examples = pack_rows(examples, 257, 1)
    recipe = TrainConfig(learning_rate=1e-4, weight_decay=0.0, device="cpu")
    models = {}
    for method in ("lora", "full"):
        model = load_checkpoint(base)[0].train()
        fuse_cpu_ops(model)
        model = apply_adapter(model, AdapterConfig(method=method, r=16, alpha=32))
        guard_fused(model)
        models[method] = (model, make_optimizer(model, recipe, torch.device("cpu")))
    times = {m: [] for m in models}
    tokens = {m: [] for m in models}
    for step in range(rounds + 1):  # the first round warms up
        batch = [examples[i] for i in batch_indices(len(examples), batch_size, 1, step)]
        x, y = collate(batch, tok.eot_id)
        for method, (model, opt) in models.items():
            t = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                times[method].append(time.perf_counter() - t)
                tokens[method].append(sum(len(ids) - 1 for ids, _ in batch))
    return {m: statistics.median(n / t for n, t in zip(tokens[m], times[m])) for m in models}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain-minutes", type=float, default=5.0)
    ap.add_argument("--finetune-seconds", type=float, default=150.0, help="wall time of each fine-tune")
    ap.add_argument("--test-examples", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8, help="fine-tuning rows per step (packed, 256 tokens each)")
    ap.add_argument("--no-pack", action="store_true", help="fine-tune on padded rows, one example each")
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--full-lr", type=float, default=5e-4)
    ap.add_argument("--ab-rounds", type=int, default=6, help="interleaved LoRA/full steps for the tokens/s ratio")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("LLMCLOCK_BENCH_QUICK") == "1",
                    help="a ~3-minute run that checks the script (short pre-training and fine-tunes, 30 test "
                         "examples); its figures say nothing about the targets")
    ap.add_argument("--out", help="work directory (default: a temporary one)")
    args = ap.parse_args()
    if args.quick:
        args.pretrain_minutes, args.finetune_seconds = min(args.pretrain_minutes, 0.75), min(args.finetune_seconds, 30)
        args.test_examples, args.ab_rounds = min(args.test_examples, 30), min(args.ab_rounds, 3)

    import torch

    from llmclock.adapters import load_adapted
    from llmclock.checkpoint import load_checkpoint
    from llmclock.config import TrainConfig, preset
    from llmclock.corpus import stdlib_sources
    from llmclock.demo import build_data, calibrate_steps, corpus_key
    from llmclock.docstrings import build, load_split, score
    from llmclock.finetune import masked_loss
    from llmclock.sft import ChatTemplate, load_examples
    from llmclock.train import train

    t_all = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="llmclock-bench-ft-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench/finetune: work directory {out}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    sources = stdlib_sources()
    tok, data = build_data(REPO / "runs" / ".cache" / corpus_key(sources, 4096), sources, 4096,
                           lambda m: print("[0/4] " + m.split("] ", 1)[-1].strip()))

    mcfg = preset("demo", vocab_size=tok.vocab_size, block_size=256)
    budget = args.pretrain_minutes * 60
    tcfg = TrainConfig(batch_size=8, block_size=256, learning_rate=2e-3, min_lr=2e-4, warmup_steps=50, seed=1,
                       max_seconds=budget, eval_interval=0, eval_batches=4, device="cpu")
    tcfg = TrainConfig(**{**tcfg.to_dict(), "max_steps": calibrate_steps(mcfg, tcfg, budget)})
    print(f"[1/4] pre-training {mcfg.n_layer}x{mcfg.n_embd} (context {mcfg.block_size}) for {args.pretrain_minutes:g} min"
          f" ({tcfg.max_steps} steps planned)")
    t = time.perf_counter()
    pre = train(mcfg, tcfg, data, out / "base", tokenizer=tok, progress=False)
    print(f"      {pre.step} steps in {time.perf_counter() - t:.0f}s, val loss {pre.evals['val']['loss']:.3f}")
    base = out / "base" / "ckpt"

    manifest = build(out / "docstrings", max_chars=500)
    print("[2/4] docstring set: " + ", ".join(f"{s} {v['examples']} examples / {v['modules']} modules"
                                            for s, v in manifest["splits"].items()))
    test = load_split(out / "docstrings", "test", limit=args.test_examples)

    def evaluate(model, name):
        t = time.perf_counter()
        m, outputs = score(model, tok, test, slots=8, max_new_tokens=24)
        print(f"      {name:5s} ROUGE-L {m['rougeL']:.2f}  BLEU {m['bleu']:.2f}  ({len(test)} test examples, "
              f"{time.perf_counter() - t:.0f}s)")
        return m, outputs

    val_path = out / "docstrings" / "val.jsonl"
    print(f"[3/4] base model on the test split")
    base_model = load_checkpoint(base)[0]
    val_ex = load_examples(val_path, tok, ChatTemplate(), max_len=257)
    base_val = masked_loss(base_model, val_ex, tok.eot_id, 16)
    print(f"      base  masked val loss {base_val:.3f} ({len(val_ex)} validation examples)")
    base_m, base_out = evaluate(base_model, "base")

    pack = not args.no_pack
    print(f"[4/4] fine-tuning, {args.finetune_seconds:g}s each, batch {args.batch_size} "
          f"{'packed rows of 256 tokens' if pack else 'padded examples'}, each in its own process")
    train_path = out / "docstrings" / "train.jsonl"
    res, metrics, outs = {}, {}, {}
    for method, lr in (("lora", args.lora_lr), ("full", args.full_lr)):
        res[method] = run_finetune(method, base, train_path, val_path, out, lr, args.finetune_seconds,
                                   args.batch_size, pack)
        r = res[method]
        print(f"      {method}: {r['steps']} steps (lr {lr:g}), {r['tokens_per_s']:,.0f} tokens/s, trainable "
              f"{r['trainable']:,} of {r['total']:,}, peak RSS {r['peak_rss_mb']:.0f} MB")
        print(f"      {method}: train loss {r['first_loss']:.3f} (first logged) -> {r['last_loss']:.3f}, "
              f"masked val loss {base_val:.3f} -> {r['val_loss']:.3f}")
        model = load_adapted(base, r["ckpt"], merged=True)[0] if method == "lora" else load_checkpoint(r["ckpt"])[0]
        metrics[method], outs[method] = evaluate(model, method)

    print(f"      interleaved A/B steps (same batches, alternating, median of {args.ab_rounds}):")
    ab = interleaved_throughput(base, train_path, args.batch_size, args.ab_rounds, pack)
    print(f"      lora {ab['lora']:,.0f} tokens/s, full {ab['full']:,.0f} tokens/s")

    print()
    print(f"{'':24s}{'base':>10s}{'lora':>12s}{'full':>12s}")
    print(f"{'ROUGE-L':24s}{base_m['rougeL']:10.2f}{metrics['lora']['rougeL']:12.2f}{metrics['full']['rougeL']:12.2f}")
    print(f"{'BLEU':24s}{base_m['bleu']:10.2f}{metrics['lora']['bleu']:12.2f}{metrics['full']['bleu']:12.2f}")
    print(f"{'trainable parameters':24s}{'':10s}{res['lora']['trainable']:12,}{res['full']['trainable']:12,}")
    print(f"{'tokens/s (in its run)':24s}{'':10s}{res['lora']['tokens_per_s']:12,.0f}{res['full']['tokens_per_s']:12,.0f}")
    print(f"{'tokens/s (interleaved)':24s}{'':10s}{ab['lora']:12,.0f}{ab['full']:12,.0f}")
    print(f"{'masked val loss':24s}{base_val:10.3f}{res['lora']['val_loss']:12.3f}{res['full']['val_loss']:12.3f}")
    print(f"{'peak RSS (MB)':24s}{'':10s}{res['lora']['peak_rss_mb']:12.0f}{res['full']['peak_rss_mb']:12.0f}")
    ratio = ab["lora"] / ab["full"]
    gains = {m: metrics[m]["rougeL"] - base_m["rougeL"] for m in ("lora", "full")}
    print(f"LoRA / full tokens/s (interleaved): {ratio:.2f}x (target >= 1)   ROUGE-L gain: lora {gains['lora']:+.2f}, "
          f"full {gains['full']:+.2f} (target >= +5)")
    print("three test summaries (reference | base | lora | full):")
    for i in range(min(3, len(test))):
        print(f"  {test[i]['module']}:{test[i]['name']}")
        for label, text in (("ref", test[i]["reference"]), ("base", base_out[i]), ("lora", outs["lora"][i]),
                            ("full", outs["full"][i])):
            print(f"    {label:5s} {text}")
    print(f"whole script: {(time.perf_counter() - t_all) / 60:.1f} min" + ("  (--quick: not a measurement)" if args.quick else ""))
    frac = res["lora"]["trainable"] / res["lora"]["total"]
    print(f"RESULT rougeL_base={base_m['rougeL']:.2f} rougeL_lora={metrics['lora']['rougeL']:.2f} "
          f"rougeL_full={metrics['full']['rougeL']:.2f} lora_trainable_frac={frac:.4f}")


if __name__ == "__main__":
    main()
