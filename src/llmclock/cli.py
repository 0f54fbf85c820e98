"""The command line: one table from subcommand to a typed function.

Every user-facing problem is an LLMClockError, printed as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ACTIVATIONS
from .errors import LLMClockError


def _print(*a, **k) -> None:
    print(*a, **k, flush=True)


# ---------------------------------------------------------------- tokenizer / data / train


def cmd_tokenizer_train(a) -> None:
    from .data import iter_sources
    from .tokenizer import Tokenizer

    texts = (text for _, text in iter_sources(a.inputs, text_field=a.text_field))
    tok = Tokenizer.train_char(texts) if a.char else Tokenizer.train_bpe(texts, a.vocab_size, progress=True)
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise LLMClockError(f"{out} already exists (pass --overwrite to replace it)")
    tok.save(out)
    _print(f"tokenizer ({tok.kind}, {tok.vocab_size} tokens) -> {out}")


def cmd_prepare(a) -> None:
    from tqdm.auto import tqdm

    from .data import prepare
    from .tokenizer import Tokenizer

    tok = Tokenizer.load(a.tokenizer)
    with tqdm(desc="prepare", unit="B", unit_scale=True, dynamic_ncols=True, leave=False, disable=None) as bar:
        m = prepare(
            a.inputs, tok, a.out, val_fraction=a.val, test_fraction=a.test, shuffle_files=not a.no_shuffle,
            seed=a.seed, text_field=a.text_field, overwrite=a.overwrite, progress=bar,
        )
    _print(_describe_manifest(m, a.out))


def _describe_manifest(m: dict, out) -> str:
    counts = ", ".join(f"{k} {v['tokens']:,}" for k, v in m["splits"].items())
    skipped = m.get("skipped_non_utf8", {}).get("count", 0)
    note = f"; skipped {skipped} non-UTF-8 file(s)" if skipped else ""
    return f"{m['documents']:,} documents -> tokens: {counts} ({m['dtype']}) in {out}{note}"


def _model_config(a, vocab_size: int):
    from .config import preset

    overrides = {k: getattr(a, k) for k in ("n_layer", "n_head", "n_embd", "dropout", "activation")
                 if getattr(a, k) is not None}
    if a.no_bias:
        overrides["bias"] = False
    return preset(a.preset, vocab_size=vocab_size, block_size=a.context or a.block_size, **overrides)


def _train_config(a):
    from .config import TrainConfig

    return TrainConfig(
        max_steps=a.steps, max_seconds=a.max_seconds, batch_size=a.batch_size, block_size=a.block_size,
        grad_accum=a.grad_accum, learning_rate=a.lr, min_lr=a.min_lr, warmup_steps=a.warmup,
        weight_decay=a.weight_decay, beta2=a.beta2, grad_clip=a.grad_clip, eval_interval=a.eval_interval,
        eval_batches=a.eval_batches, checkpoint_interval=a.checkpoint_interval, seed=a.seed, dtype=a.dtype,
        compile=a.compile, fused_kernels=not a.no_fused_kernels, device=a.device, fsdp=a.fsdp,
        dist_timeout=a.dist_timeout,
    )


def cmd_train(a) -> None:
    from .checkpoint import read_config
    from .data import TokenData
    from .tokenizer import Tokenizer
    from .train import train

    if a.nproc:
        _launch_local(a)
        return
    data = TokenData(a.data)
    tok_path = Path(a.tokenizer) if a.tokenizer else Path(a.data) / "tokenizer.json"
    tok = Tokenizer.load(tok_path) if tok_path.exists() else None
    if tok is not None and tok.hash != data.tokenizer_hash:
        raise LLMClockError(f"{tok_path}: not the tokenizer the data in {a.data} was prepared with")
    cfg = _train_config(a)
    if a.init_from:
        mcfg = read_config(Path(a.init_from))
    elif a.resume:
        mcfg = read_config(Path(a.out) / "ckpt")
    else:
        mcfg = _model_config(a, data.vocab_size)
    try:
        r = train(mcfg, cfg, data, a.out, tokenizer=tok, resume=a.resume, init_from=a.init_from,
                  log_interval=a.log_interval)
    except KeyboardInterrupt:
        _print(f"interrupted: checkpoint saved in {a.out}/ckpt; continue with the same command plus --resume")
        raise
    if r.ckpt is None:
        return  # not rank 0
    _print(_describe_result(r))


def _launch_local(a) -> None:
    """`train --nproc N`: the same command on N local processes under torchrun's elastic agent."""
    from .distributed import launch_local

    argv, skip = [], False
    for arg in sys.argv[1:] if a.argv is None else a.argv:
        if skip:
            skip = False
        elif arg in ("--nproc", "--max-restarts"):
            skip = True
        elif not arg.startswith(("--nproc=", "--max-restarts=")):
            argv.append(arg)
    launch_local(a.nproc, argv, max_restarts=a.max_restarts)


def _describe_result(r) -> str:
    lines = [f"trained to step {r.step}: {r.ms_per_step:.1f} ms/step, {r.tokens_per_s:,.0f} tokens/s, last loss {r.last_loss:.4f}"]
    for split, e in r.evals.items():
        lines.append(f"  {split:5s} loss {e['loss']:.4f}  ppl {e['ppl']:.2f}  next-token acc {e['acc']:.3f}")
    lines.append(f"  checkpoint {r.ckpt}  metrics {r.metrics}  plot {r.plot}")
    return "\n".join(lines)


def cmd_demo(a) -> None:
    from .demo import run_demo

    run_demo(out=a.out, minutes=a.minutes, preset_name=a.preset, vocab_size=a.vocab_size, overwrite=a.overwrite,
             seed=a.seed, max_files=a.max_files, echo=_print)


def cmd_eval(a) -> None:
    from .checkpoint import load_checkpoint
    from .data import TokenData
    from .evaluate import evaluate_checkpoint

    model, tok = load_checkpoint(a.ckpt, device=a.device if a.device != "auto" else "cpu")
    data = TokenData(a.data)
    for split in a.splits:
        r = evaluate_checkpoint(model, data, split, batch_size=a.batch_size, block_size=a.block_size,
                                batches=a.batches, seed=a.seed)
        _print(f"{split}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  next-token acc {r['acc']:.3f}  bits/token {r['bits_per_token']:.3f}")


# ---------------------------------------------------------------- engine


def _sampling(a):
    from .engine import SamplingParams

    return SamplingParams(
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, stop=a.stop or [], seed=a.seed, ignore_eos=a.ignore_eos,
    )


def _engine(a, slots: int = 1):
    import torch

    from .checkpoint import load_checkpoint
    from .engine import Engine
    from .train import resolve_device

    torch.set_num_threads(a.threads) if a.threads else None
    model, tok = load_checkpoint(a.ckpt, device=resolve_device(a.device))
    return Engine(model, tok, slots=slots, compile=a.compile)


def cmd_generate(a) -> None:
    params = _sampling(a)
    engine = _engine(a)
    for i in range(a.num_samples):
        if a.num_samples > 1:
            _print(f"--- sample {i + 1}")
        _print(a.prompt, end="")
        for ev in engine.generate([a.prompt], params, truncate=a.truncate):
            _print(ev.text, end="")
        _print()
        if params.seed is not None:
            params.seed += 1


def cmd_chat(a) -> None:
    from .chat import chat_loop

    chat_loop(_engine(a), _sampling(a), system=a.system, echo=_print, read=input)


def cmd_trace(a) -> None:
    import dataclasses

    from .trace import Tracer

    base = _sampling(a)
    params = [dataclasses.replace(base, seed=None if base.seed is None else base.seed + i) for i in range(len(a.prompt))]
    engine = _engine(a, slots=len(a.prompt))
    with Tracer(engine, logit_lens=a.logit_lens, top_n=a.top_n) as tr:
        done = engine.complete(a.prompt, params, truncate=a.truncate)
    paths = tr.write(a.out, tr.header(ckpt=a.ckpt))
    slot = {q["request_id"]: q["slot"] for q in tr.requests}
    for prompt, c in zip(a.prompt, done):
        _print(f"[slot {slot[c.request_id]}] {prompt!r} -> {c.text!r}")
    _print(tr.summary())
    _print(f"wrote {paths['jsonl']}, {paths['perfetto']} (ui.perfetto.dev), {paths['plot']}")


def cmd_replay(a) -> None:
    from .trace import diff, load, replay

    if a.against:
        ours = load(a.trace)[1]
        div = diff(ours, load(a.against)[1])
        if div is None:
            _print(f"traces identical ({len({r.cycle for r in ours})} cycles)")
            return
        _print(div.describe((str(a.trace), str(a.against))))
        raise SystemExit(1)
    r = replay(a.trace, ckpt=a.ckpt)
    if r.divergence is None:
        _print(f"replay: identical ({r.cycles} cycles)")
        if r.max_logprob_diff:
            _print(f"note: same tokens, but logprobs differ by up to {r.max_logprob_diff:.3g} (other kernels or threads?)")
        return
    _print("replay: differs; " + r.divergence.describe(("recorded", "replayed")))
    raise SystemExit(1)


def cmd_import_hf(a) -> None:
    from .hf import import_hf

    _print(f"imported -> {import_hf(a.hf_dir, a.out_dir, allow_pickle=a.allow_pickle)}")


def cmd_export_hf(a) -> None:
    from .hf import export_hf

    _print(f"exported -> {export_hf(a.ckpt_dir, a.out_dir)}")


# ---------------------------------------------------------------- parser


def _add_model_args(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="nano", help="named shape: test, nano, demo, gpt2 (124M), gpt2-medium, ...")
    g.add_argument("--n-layer", type=int)
    g.add_argument("--n-head", type=int)
    g.add_argument("--n-embd", type=int)
    g.add_argument("--dropout", type=float)
    g.add_argument("--context", type=int, help="model context length (default: --block-size)")
    g.add_argument("--activation", choices=ACTIVATIONS, help="MLP GELU: GPT-2's tanh form (default) or exact")
    g.add_argument("--no-bias", action="store_true", help="no biases in Linear/LayerNorm (nanoGPT's default)")


def _add_train_args(p) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=2000)
    g.add_argument("--max-seconds", type=float)
    g.add_argument("--batch-size", type=int, default=12)
    g.add_argument("--block-size", type=int, default=64)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--warmup", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--beta2", type=float, default=0.99)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-interval", type=int, default=250)
    g.add_argument("--eval-batches", type=int, default=20)
    g.add_argument("--checkpoint-interval", type=int, default=0)
    g.add_argument("--log-interval", type=int, default=10, help="log the training loss every this many steps")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--compile", action="store_true")
    g.add_argument("--no-fused-kernels", action="store_true",
                   help="torch ops only (default on CPU fp32: llmclock's compiled whole-block, attention, GELU "
                   "and LayerNorm kernels)")
    g.add_argument("--device", default="auto")
    g = p.add_argument_group("distributed (torchrun)")
    g.add_argument("--nproc", type=int, default=0, help="run on N local processes (torchrun --standalone)")
    g.add_argument("--max-restarts", type=int, default=0, help="with --nproc: restart the job this often after "
                   "a failed process (it resumes from the last checkpoint)")
    g.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state (FSDP) "
                   "instead of replicating them (DDP)")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a rank waits for the others before the job ends with an error")


def _add_sampling_args(p) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    g.add_argument("--compile", action="store_true", help="torch.compile the tick")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="llmclock", description="A GPT-2-architecture model as a clocked machine.")
    ap.add_argument("--version", action="version", version=f"llmclock {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a small model on the embedded corpus (Python's stdlib) and sample from it")
    p.add_argument("--out", help="run directory (default: runs/demo, or runs/demo-N if that exists)")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-time budget")
    p.add_argument("--preset", default="demo")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max-files", type=int, help="use only the first N files of the corpus (quick trials)")
    p.set_defaults(fn=cmd_demo)

    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    p = tk.add_parser("train", help="train a byte-level BPE (or char-level) tokenizer")
    p.add_argument("inputs", nargs="+", help="text files, directories, globs or .jsonl")
    p.add_argument("--out", default="tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--char", action="store_true", help="character-level vocabulary instead of BPE")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize a corpus into train/val/test token shards")
    p.add_argument("inputs", nargs="+", help="text files, directories, globs or .jsonl")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, or a dir with it or vocab.json+merges.txt")
    p.add_argument("--out", required=True)
    p.add_argument("--val", type=float, default=0.05, help="validation fraction")
    p.add_argument("--test", type=float, default=0.05, help="test fraction")
    p.add_argument("--no-shuffle", action="store_true", help="keep file order (split the stream as given)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--text-field", default="text")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("train", help="train a model on prepared shards (works under torchrun)")
    p.add_argument("--data", required=True, help="directory written by `llmclock prepare`")
    p.add_argument("--out", required=True, help="run directory (checkpoint at OUT/ckpt)")
    p.add_argument("--tokenizer", help="default: DATA/tokenizer.json")
    p.add_argument("--resume", action="store_true", help="continue OUT's run exactly where it stopped")
    p.add_argument("--init-from", help="start from this checkpoint's weights (fine-tuning)")
    _add_model_args(p)
    _add_train_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="loss, perplexity and accuracy of a checkpoint on prepared shards")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--splits", nargs="+", default=["val", "test"])
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--block-size", type=int)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt, streaming tokens as the clock ticks")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--truncate", action="store_true", help="drop the prompt's oldest tokens if it exceeds the context")
    _add_sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--system", default="", help="system message")
    _add_sampling_args(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("trace", help="generate with an oscilloscope on the clock: per-cycle records, Perfetto, plot")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", action="append", required=True, help="repeatable: prompts run as a batch, one slot each")
    p.add_argument("--out", required=True, help="directory for trace.jsonl, trace.perfetto.json, trace.png")
    p.add_argument("--logit-lens", help="layers to read the residual stream at: 'all' or e.g. '0,5,-1'")
    p.add_argument("--top-n", type=int, default=5, help="alternatives recorded per cycle")
    p.add_argument("--truncate", action="store_true", help="drop the prompt's oldest tokens if it exceeds the context")
    _add_sampling_args(p)
    p.set_defaults(fn=cmd_trace)

    p = sub.add_parser("replay", help="re-run a trace and check it reproduces bit for bit, or diff two traces")
    p.add_argument("trace", help="trace.jsonl (or its directory)")
    p.add_argument("--against", help="another trace: report the first cycle where the two diverge (no model needed)")
    p.add_argument("--ckpt", help="checkpoint to replay with (default: the one named in the trace)")
    p.set_defaults(fn=cmd_replay)

    p = sub.add_parser("import-hf", help="convert a Hugging Face GPT-2 checkpoint directory to llmclock's")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (loaded with weights_only=True)")
    p.set_defaults(fn=cmd_import_hf)

    p = sub.add_parser("export-hf", help="write a checkpoint in Hugging Face GPT-2 layout")
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.set_defaults(fn=cmd_export_hf)
    return ap


SPINNING_COMMANDS = ("train", "demo")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command in SPINNING_COMMANDS:
        from .threads import prefer_spinning_threads

        prefer_spinning_threads()
    try:
        args.fn(args)
    except LLMClockError as e:
        print(f"llmclock: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nllmclock: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # disk full, permissions, ...: one line, not a traceback
        print(f"llmclock: error: {e}", file=sys.stderr)
        return 1
    return 0
