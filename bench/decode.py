"""Decode speed: llmclock's clocked engine vs Hugging Face transformers' `generate` and llama.cpp, same weights.

    python bench/decode.py [--threads 2] [--rounds 2] [--device cpu|cuda] [--dtype float32|bfloat16]

llama.cpp runs when llama-cpp-python and gguf are installed (`pip install 'llmclock[bench]'`): the
same weights are written to an f32 GGUF file (gpt2 architecture, a synthetic vocabulary: the
prompts are token ids) and run as its users run it, `llama_cpp.Llama(..., n_threads=threads)` and
greedy `generate`, at batch 1 (`b1_vs_llamacpp`, nan without it).

GPT-2 124M shape, random init, prompt 16 tokens, 128 new tokens that end-of-text cannot stop,
batch 1 and batch 8. Both run in this process, interleaved round by round (best round kept), so
a busy machine slows both alike. On CPU the machine's read bandwidth is measured in the same run:
each decode cycle must read every weight once (the token and position tables only one row each),
so weight bytes / bandwidth is the floor on a cycle's time, and `b1_roofline` is llmclock's batch-1
tokens/s as a fraction of that ceiling. Last line:
    RESULT b1_vs_hf=<x> b8_vs_hf=<x> b1_roofline=<fraction> b1_vs_llamacpp=<x>
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
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


def write_gguf(model: GPT, path: str) -> None:
    """`model`'s weights as an f32 GGUF file of llama.cpp's gpt2 architecture. nn.Linear's (out, in)
    is ggml's [in, out] as is; the vocabulary is synthetic (unique strings, byte tokens first)
    because the prompts are given as token ids."""
    import gguf
    import numpy as np

    cfg = model.config
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([bytes([i]).hex() if i < 256 else f"<{i}>" for i in range(cfg.vocab_size)])
    w.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(cfg.vocab_size - 1)
    w.add_eos_token_id(cfg.vocab_size - 1)
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["transformer.wte.weight"])
    w.add_tensor("position_embd.weight", sd["transformer.wpe.weight"])
    w.add_tensor("output_norm.weight", sd["transformer.ln_f.weight"])
    w.add_tensor("output_norm.bias", sd["transformer.ln_f.bias"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                w.add_tensor(f"blk.{i}.{theirs}.{kind}", np.ascontiguousarray(sd[f"transformer.h.{i}.{ours}.{kind}"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llamacpp(model: GPT, threads: int, tmp: str):
    """A llama_cpp.Llama on `model`'s weights, or None where llama-cpp-python or gguf is missing."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        return None
    import llama_cpp

    path = os.path.join(tmp, "gpt2-f32.gguf")
    write_gguf(model, path)
    return llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=PROMPT + NEW, n_batch=PROMPT,
                           verbose=False)


def run_llamacpp(llm, prompt: list[int], new: int = NEW) -> tuple[float, list[int]]:
    """Greedy decoding of `new` tokens after `prompt` (ids): tokens/s and the tokens."""
    t = time.perf_counter()
    out = []
    for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        out.append(tok)
        if len(out) == new:
            break
    return new / (time.perf_counter() - t), out


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
    tmp = tempfile.TemporaryDirectory()
    llm = llamacpp(model, args.threads, tmp.name) if args.device == "cpu" and dtype == torch.float32 else None
    if llm is None:
        print("llama.cpp: not run (pip install 'llmclock[bench]' for llama-cpp-python and gguf; CPU float32 only)")
    else:
        import llama_cpp

        same = run_llamacpp(llm, prompts[1][0].tolist(), 16)[1] == ref
        print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, f32 GGUF, {args.threads} threads): "
              f"greedy tokens equal to HF over 16 steps: {same}")

    best = {k: 0.0 for k in ("hf1", "ours1", "hf8", "ours8", "llamacpp1")}
    bw = 0.0
    for r in range(args.rounds):
        if args.device == "cpu":
            bw = max(bw, measure_bandwidth(1 << 30, repeats=3))
        for b in (1, 8):
            best[f"ours{b}"] = max(best[f"ours{b}"], run_ours(engines[b], prompts[b], args.device))
            best[f"hf{b}"] = max(best[f"hf{b}"], run_hf(hf, prompts[b], args.device))
            if b == 1 and llm is not None:
                best["llamacpp1"] = max(best["llamacpp1"], run_llamacpp(llm, prompts[1][0].tolist())[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in best.items()))

    print(f"\nweights read per cycle: {n_bytes / 1e6:.1f} MB")
    ceiling = None
    if bw:
        ceiling = bw / n_bytes
        print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s -> roofline {ceiling:.1f} cycles/s "
              f"({1e3 / ceiling:.2f} ms per cycle at best)")
    print(f"{'batch':>5} {'HF tok/s':>10} {'llama.cpp':>10} {'llmclock tok/s':>15} {'vs HF':>7} {'vs llama.cpp':>13} "
          f"{'ms/cycle':>9} {'roofline':>9}")
    for b in (1, 8):
        ours_tps, hf_tps, lc = best[f"ours{b}"], best[f"hf{b}"], best.get(f"llamacpp{b}", 0.0)
        cyc = ours_tps / b
        roof = f"{cyc / ceiling:.2f}" if ceiling else "n/a"
        lc_tps = f"{lc:>10.1f}" if lc else f"{'-':>10}"
        lc_ratio = f"{ours_tps / lc:>12.2f}x" if lc else f"{'-':>13}"
        print(f"{b:>5} {hf_tps:>10.1f} {lc_tps} {ours_tps:>15.1f} {ours_tps / hf_tps:>6.2f}x {lc_ratio} "
              f"{1e3 / cyc:>9.2f} {roof:>9}")
    b1_roof = best["ours1"] / ceiling if ceiling else float("nan")
    b1_lc = best["ours1"] / best["llamacpp1"] if best["llamacpp1"] else float("nan")
    print(f"RESULT b1_vs_hf={best['ours1'] / best['hf1']:.3f} b8_vs_hf={best['ours8'] / best['hf8']:.3f} "
          f"b1_roofline={b1_roof:.3f} b1_vs_llamacpp={b1_lc:.3f}")


if __name__ == "__main__":
    main()
