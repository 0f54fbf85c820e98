"""Compression: decode speed of fp32 / bf16 / int8 / int4 against each one's memory roofline, and
what each scheme and 25% structured MLP (and attention-head) pruning cost in perplexity on a small
trained model.

    python bench/compress.py [--threads 2] [--rounds 3] [--new-tokens 128] [--data TEXT] [--train-steps 1500]
    python bench/compress.py --quick     # a short end-to-end check (1 round, 8 tokens, 60 train steps): not a result

Speed: GPT-2 124M shape (random init, tied head), prompt 16 tokens, --new-tokens (128) greedy new tokens at
batch 1 and 8, every variant in this process, interleaved round by round (best round kept). Each
cycle must read every weight byte it decodes with once (the token and position tables one row
each), so a variant's roofline is measured bandwidth / its bytes per cycle (weights, scales,
biases, norms); `roofline` is its batch-1 cycles/s over that ceiling. The read bandwidth is
measured in the same run as bench/decode.py measures it. "prune25" is the fp32 model with every
MLP 25% narrower (neurons chosen by importance on random tokens: speed does not depend on which);
"heads25" the fp32 model with 25% of its 144 attention heads removed (chosen the same way, so layers
keep different head counts; the KV cache shrinks with them).

Quality: nanoGPT's char-level Shakespeare model (4 layers, 4 heads, 128 wide, block 64) trained
with `llmclock train` for --train-steps steps, then perplexity on the same fixed val windows for
fp32, each scheme (int4: group 32), 25% structured MLP pruning and 25% attention-head pruning
(calibration on val batches apart from the evaluated ones, no recovery fine-tune; and with a 200-step
one).
Last line:
    RESULT bf16_b1_roofline=<f> int8_b1_roofline=<f> int4_vs_int8=<x> int8_ppl_increase=<f>
           int4_ppl_increase=<f> prune25_speedup=<x>
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmclock.compress.model import quantize_model
from llmclock.compress.prune import head_importance, mlp_importance, prune_heads, prune_mlp, recover
from llmclock.config import preset
from llmclock.engine import Engine, SamplingParams
from llmclock.engine.kernels import measure_bandwidth
from llmclock.model import GPT

PROMPT = 16
ROOT = Path(__file__).resolve().parents[1]


def decode_bytes(model) -> int:
    """Bytes one decode cycle reads: every parameter and buffer once, the embedding tables not
    (a lookup reads one row) unless the table is the head itself (tied fp32)."""
    head, seen, total = model.lm_head.weight, set(), 0
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if id(t) in seen or "wpe" in name or (name.startswith("transformer.wte") and t is not head):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def tokens_per_s(engine: Engine, prompts, new: int) -> float:
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    done = engine.complete(prompts, params)
    dt = time.perf_counter() - t
    assert all(len(c.token_ids) == new for c in done)
    return len(prompts) * new / dt


def speed(args) -> dict:
    torch.manual_seed(0)
    base = GPT(preset("gpt2")).eval()
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(50000, (2, 64), generator=g)
    variants = {"fp32": base}
    for scheme in ("bf16", "int8", "int4"):
        variants[scheme] = quantize_model(copy.deepcopy(base), scheme, args.group)
    pruned = copy.deepcopy(base)
    prune_mlp(pruned, 0.25, mlp_importance(pruned, [calib]))
    variants["prune25"] = pruned
    headless = copy.deepcopy(base)
    heads = prune_heads(headless, 0.25, head_importance(headless, [calib]))
    print(f"heads25: heads per layer {heads}")
    variants["heads25"] = headless
    prompts = {b: torch.randint(50000, (b, PROMPT), generator=g).tolist() for b in (1, 8)}
    # one engine per variant (8 slots; batch 1 runs one of them): each packs its weights once
    engines = {k: Engine(m, None, slots=8, max_len=PROMPT + args.new_tokens) for k, m in variants.items()}
    nbytes = {k: decode_bytes(m) for k, m in variants.items()}
    for e in engines.values():  # warm-up: first-call costs (lazy packing, allocator, thread pool) not timed
        tokens_per_s(e, prompts[8], 2)
    best = {(k, b): 0.0 for k in variants for b in (1, 8)}
    bw = 0.0
    for r in range(args.rounds):
        bw = max(bw, measure_bandwidth(1 << 30, repeats=3))
        for b in (1, 8):
            for k in variants:
                best[k, b] = max(best[k, b], tokens_per_s(engines[k], prompts[b], args.new_tokens))
        print(f"round {r + 1}: " + ", ".join(f"{k} b1 {best[k, 1]:.1f} b8 {best[k, 8]:.1f}" for k in variants), flush=True)
    print(f"\nmeasured read bandwidth: {bw / 1e9:.1f} GB/s")
    print(f"{'variant':<9}{'MB/cycle':>10}{'b1 tok/s':>10}{'b8 tok/s':>10}{'b1 vs fp32':>12}{'b1 roofline':>13}")
    out = {}
    for k in variants:
        roof = best[k, 1] / (bw / nbytes[k])
        out[k] = {"b1": best[k, 1], "b8": best[k, 8], "roofline": roof}
        print(f"{k:<9}{nbytes[k] / 1e6:>10.1f}{best[k, 1]:>10.1f}{best[k, 8]:>10.1f}"
              f"{best[k, 1] / best['fp32', 1]:>11.2f}x{roof:>13.2f}")
    return out


def quality(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        return _quality(args, Path(tmp))


def _quality(args, work: Path) -> dict:
    from llmclock.compress.report import quality as measure_quality
    from llmclock.data import TokenData, eval_batches
    from llmclock.checkpoint import load_checkpoint

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))

    def cli(*a):
        subprocess.run([sys.executable, "-m", "llmclock", *map(str, a)], check=True, env=env, stdout=subprocess.DEVNULL)

    t = time.perf_counter()
    cli("tokenizer", "train", args.data, "--char", "--out", work / "tok.json")
    cli("prepare", args.data, "--tokenizer", work / "tok.json", "--out", work / "data", "--val", "0.1", "--test", "0",
        "--no-shuffle")
    cli("train", "--data", work / "data", "--tokenizer", work / "tok.json", "--out", work / "run", "--preset", "nano",
        "--steps", args.train_steps, "--batch-size", 12, "--block-size", 64, "--eval-interval", args.train_steps,
        "--device", "cpu")
    print(f"\ntrained the nano char model for {args.train_steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
    model, tok = load_checkpoint(work / "run" / "ckpt")
    data = work / "data"

    def ppl(m) -> float:
        with torch.inference_mode():
            return measure_quality(m, tok, data, "val", args.eval_batches, 64)["ppl"]

    res = {"fp32": ppl(model)}
    for scheme, group in (("bf16", 64), ("int8", 64), ("int4", 32), ("int4-g64", 64)):
        res[scheme] = ppl(quantize_model(copy.deepcopy(model), scheme.split("-")[0], group))
    x, _ = eval_batches(TokenData(data).tokens("val"), 8, 64, 16, seed=99, split="val")  # calibration windows
    pruned = copy.deepcopy(model)
    prune_mlp(pruned, 0.25, mlp_importance(pruned, [x[i : i + 8] for i in range(0, len(x), 8)]))
    res["prune25"] = ppl(pruned)
    with torch.enable_grad():
        recover(pruned, TokenData(data).tokens("train"), steps=args.recover_steps, batch_size=12, block_size=64,
                lr=3e-4)
    res[f"prune25+{args.recover_steps} steps"] = ppl(pruned)
    calib = [x[i : i + 8] for i in range(0, len(x), 8)]
    headless = copy.deepcopy(model)
    heads = prune_heads(headless, 0.25, head_importance(headless, calib))
    print(f"heads25: heads per layer {heads}")
    res["heads25"] = ppl(headless)
    with torch.enable_grad():
        recover(headless, TokenData(data).tokens("train"), steps=args.recover_steps, batch_size=12, block_size=64,
                lr=3e-4)
    res[f"heads25+{args.recover_steps} steps"] = ppl(headless)
    print(f"{'variant':<20}{'val ppl':>9}{'vs fp32':>9}")
    for k, v in res.items():
        print(f"{k:<20}{v:>9.4f}{v / res['fp32'] - 1:>+9.2%}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--group", type=int, default=64, help="int4 group size for the speed runs")
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per sequence in the speed runs")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--eval-batches", type=int, default=60)
    ap.add_argument("--recover-steps", type=int, default=200, help="recovery fine-tune steps after pruning")
    ap.add_argument("--quick", action="store_true",
                    help="a short end-to-end check: 1 round, 8 new tokens, 60 train steps, 4 eval batches, 10 recovery steps")
    ap.add_argument("--speed-only", action="store_true", help="skip training and the perplexity part")
    ap.add_argument("--quality-only", action="store_true", help="skip the GPT-2 124M speed part")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.new_tokens, args.train_steps, args.eval_batches, args.recover_steps = 1, 8, 60, 4, 10
    torch.set_num_threads(args.threads)
    from llmclock.compress.quant import get_lib

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled quantized GEMV: "
          f"{'yes' if get_lib() else 'no (torch fallback)'}")
    r = {}
    if not args.quality_only:
        s = speed(args)
        r |= {"bf16_b1_roofline": s["bf16"]["roofline"], "int8_b1_roofline": s["int8"]["roofline"],
              "int4_vs_int8": s["int4"]["b1"] / s["int8"]["b1"]}
    if not args.speed_only:
        q = quality(args)
        r |= {"int8_ppl_increase": q["int8"] / q["fp32"] - 1, "int4_ppl_increase": q["int4"] / q["fp32"] - 1}
    if not args.quality_only:
        r["prune25_speedup"] = s["prune25"]["b1"] / s["fp32"]["b1"]
        print(f"heads25: b1 {s['heads25']['b1'] / s['fp32']['b1']:.2f}x fp32"
              + (f", val ppl {q['heads25'] / q['fp32'] - 1:+.2%}" if not args.speed_only else ""))
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
