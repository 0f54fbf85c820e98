"""Decode speed: llmclock's clocked engine vs Hugging Face transformers' `generate`, same weights.

    python bench/decode.py [--threads 2] [--rounds 2] [--device cpu|cuda] [--dtype float32|bfloat16]

GPT-2 124M shape, random init, prompt 16 tokens, 128 new tokens that end-of-text cannot stop,
batch 1 and batch 8. Both run in this process, interleaved round by round (best round kept), so
a busy machine slows both alike. On CPU the machine's read bandwidth is measured in the same run:
each decode cycle must read every weight once (the token and position tables only one row each),
so weight bytes / bandwidth is the floor on a cycle's time, and `b1_roofline` is llmclock's batch-1
tokens/s as a fraction of that ceiling. Last line:
    RESULT b1_vs_hf=<x> b8_vs_hf=<x> b1_roofline=<fraction>
"""

from __future__ import annotations

import argparse
import time

import torch

from llmclock.config import preset
from llmclock.engine import Engine, SamplingParams
from llmclock.engine.kernels import get_lib, measure_bandwidth
from llmclock.hf import hf_config, weights_to_hf
from llmclock.model import GPT

PROMPT, NEW = 16, 128


def build(device: str, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    model = GPT(preset("gpt2")).eval()
    cfg = transformers.GPT2Config(**{k: v for k, v in hf_config(model.config, 50256).items()
                                     if k not in ("architectures", "model_type", "dtype")})
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = hf.load_state_dict(weights_to_hf(state), strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias", "lm_head.weight")) for k in missing)
    hf.tie_weights()
    return model.to(device, dtype), hf.to(device, dtype)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_hf(hf, prompts: torch.Tensor, device: str) -> float:
    with torch.inference_mode():
        sync(device)
        t = time.perf_counter()
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW,
                          min_new_tokens=NEW, do_sample=False, pad_token_id=50256)
        sync(device)
        dt = time.perf_counter() - t
    assert out.shape == (prompts.size(0), PROMPT + NEW)
    return prompts.size(0) * NEW / dt


def run_ours(engine: Engine, prompts: torch.Tensor, device: str) -> float:
    params = SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True)
    sync(device)
    t = time.perf_counter()
    done = engine.complete(prompts.tolist(), params)
    sync(device)
    dt = time.perf_counter() - t
    assert all(len(c.token_ids) == NEW for c in done)
    return prompts.size(0) * NEW / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, compiled GEMV kernel: {'yes' if get_lib() else 'no (torch fallback)'}")
    model, hf = build(args.device, dtype)
    n_bytes = sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n) * dtype.itemsize
    engines = {b: Engine(model, None, slots=b, max_len=PROMPT + NEW) for b in (1, 8)}
    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(50000, (b, PROMPT), generator=g).to(args.device) for b in (1, 8)}

    # Same weights, same greedy tokens (checked once at batch 1; batch invariance is a unit test).
    ref = hf.generate(prompts[1], attention_mask=torch.ones_like(prompts[1]), max_new_tokens=16,
                      min_new_tokens=16, do_sample=False, pad_token_id=50256)[0, PROMPT:].tolist()
    ours = engines[1].complete(prompts[1].tolist(), SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))
    print(f"greedy tokens equal to HF over 16 steps: {ours[0].token_ids == ref}")

    best = {k: 0.0 for k in ("hf1", "ours1", "hf8", "ours8")}
    bw = 0.0
    for r in range(args.rounds):
        if args.device == "cpu":
            bw = max(bw, measure_bandwidth(1 << 30, repeats=3))
        for b in (1, 8):
            best[f"ours{b}"] = max(best[f"ours{b}"], run_ours(engines[b], prompts[b], args.device))
            best[f"hf{b}"] = max(best[f"hf{b}"], run_hf(hf, prompts[b], args.device))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in best.items()))

    print(f"\nweights read per cycle: {n_bytes / 1e6:.1f} MB")
    ceiling = None
    if bw:
        ceiling = bw / n_bytes
        print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s -> roofline {ceiling:.1f} cycles/s "
              f"({1e3 / ceiling:.2f} ms per cycle at best)")
    print(f"{'batch':>5} {'HF tok/s':>10} {'llmclock tok/s':>15} {'ratio':>7} {'ms/cycle':>9} {'roofline':>9}")
    for b in (1, 8):
        ours_tps, hf_tps = best[f"ours{b}"], best[f"hf{b}"]
        cyc = ours_tps / b
        roof = f"{cyc / ceiling:.2f}" if ceiling else "n/a"
        print(f"{b:>5} {hf_tps:>10.1f} {ours_tps:>15.1f} {ours_tps / hf_tps:>6.2f}x {1e3 / cyc:>9.2f} {roof:>9}")
    b1_roof = best["ours1"] / ceiling if ceiling else float("nan")
    print(f"RESULT b1_vs_hf={best['ours1'] / best['hf1']:.3f} b8_vs_hf={best['ours8'] / best['hf8']:.3f} "
          f"b1_roofline={b1_roof:.3f}")


if __name__ == "__main__":
    main()
