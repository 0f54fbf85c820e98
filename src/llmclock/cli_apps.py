"""Command-line entries for evaluation, fine-tuning and the applications (eval, finetune, merge,
data docstrings, summarize); cli.py's table registers them with `add_commands`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import LLMClockError


def _print(*a, **k) -> None:
    print(*a, **k, flush=True)


def _free_path(path: Path) -> Path:
    """`path`, or the first free `stem-N.suffix` beside it: an earlier result is never overwritten."""
    n = 1
    free = path
    while free.exists():
        free = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return free


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, leave=False, disable=None)


# ---------------------------------------------------------------- eval


def _eval_one(a, ckpt: str, adapter: str | None) -> tuple[dict, str]:
    """{section: metrics} for one model, and its tokenizer hash."""
    from .adapters import load_adapted
    from .evaluate import evaluate_checkpoint, evaluate_texts, read_texts

    model, tok = load_adapted(ckpt, adapter)
    out: dict[str, dict] = {}
    if a.data:
        from .data import TokenData

        data = TokenData(a.data)
        if data.tokenizer_hash != tok.hash:
            raise LLMClockError(f"{a.data} was tokenized with another tokenizer than {ckpt}'s; "
                                "compare models with different vocabularies on --text (bits per byte)")
        for split in a.splits:
            out[split] = evaluate_checkpoint(model, data, split, batch_size=a.batch_size, block_size=a.block_size,
                                             batches=a.batches, seed=1337 if a.seed is None else a.seed, tokenizer=tok)
    if a.text:
        texts = read_texts(a.text, text_field=a.text_field)
        with _bar(len(texts), "text") as bar:
            out["text"] = evaluate_texts(model, tok, texts, block_size=a.block_size, stride=a.stride,
                                         batch_size=a.batch_size, progress=lambda n: bar.update(n - bar.n))
    if a.gen:
        from .adapters import merge
        from .engine import Engine
        from .evalgen import evaluate_generation, load_examples

        examples = load_examples(a.gen, limit=a.limit)
        engine = Engine(merge(model).eval(), tok, slots=a.slots)
        with _bar(len(examples), "generate") as bar:
            metrics, rows = evaluate_generation(engine, examples, _gen_params(a), progress=lambda n: bar.update(n - bar.n))
        out["gen"] = metrics
        out["gen_outputs"] = rows
    return out, tok.hash


def _gen_params(a):
    from .engine import SamplingParams

    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, stop=a.stop or ["\n"], seed=a.seed)


def cmd_eval(a) -> None:
    from .evaluate import format_lines, format_table

    if not (a.data or a.text or a.gen):
        raise LLMClockError("nothing to evaluate: give --data (prepared splits), --text (files, dirs, JSONL) or --gen")
    models = {"model": (a.ckpt, a.adapter)}
    if a.compare:
        models["compare"] = (a.compare, a.compare_adapter)
    results, hashes = {}, {}
    for name, (ckpt, adapter) in models.items():
        results[name], hashes[name] = _eval_one(a, ckpt, adapter)
    outputs = {n: r.pop("gen_outputs", None) for n, r in results.items()}
    differ = len(set(hashes.values())) > 1
    names = {n: f"{ckpt}" + (f" +{adapter}" if adapter else "") for n, (ckpt, adapter) in models.items()}
    if len(results) == 1:
        _print(format_lines(results["model"]))
    else:
        if differ:
            _print("the two models' vocabularies differ: compare bits per byte, not loss or perplexity")
        _print(format_table({names[n]: r for n, r in results.items()}, bpb_first=differ))
    settings = {k: v for k, v in vars(a).items() if k != "fn" and not callable(v)}
    doc = {"settings": settings, "models": {n: {"ckpt": c, "adapter": ad, "tokenizer_hash": hashes[n]}
                                            for n, (c, ad) in models.items()},
           "results": results, "generations": {n: o for n, o in outputs.items() if o is not None},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = _free_path(Path(a.out) if a.out else Path(a.ckpt).absolute().parent / "eval.json")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    _print(f"wrote {path}")


# ---------------------------------------------------------------- finetune / merge


def cmd_finetune(a) -> None:
    from .adapters import AdapterConfig
    from .config import TrainConfig
    from .finetune import DEFAULT_LR, finetune

    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    cfg = AdapterConfig(method=a.method, r=a.r, alpha=a.alpha, dropout=a.lora_dropout, targets=targets,
                        init_r=a.init_r, tinit=a.tinit, tfinal=a.tfinal, delta_t=a.delta_t, bottleneck=a.bottleneck)
    lr = a.lr or DEFAULT_LR[a.method]
    recipe = TrainConfig(max_steps=a.steps, max_seconds=a.max_seconds, batch_size=a.batch_size,
                         block_size=a.block_size, learning_rate=lr, min_lr=a.min_lr if a.min_lr is not None else lr / 10,
                         warmup_steps=a.warmup, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
                         eval_interval=a.eval_interval, checkpoint_interval=a.checkpoint_interval, seed=a.seed,
                         fused_kernels=not a.no_fused_kernels, device=a.device)
    wandb = {"project": a.wandb, "config": {"adapter": cfg.to_dict(), "recipe": recipe.to_dict()}} if a.wandb else None
    try:
        r = finetune(a.ckpt, a.data, a.out, recipe, cfg, val_path=a.val, resume=a.resume, wandb=wandb)
    except KeyboardInterrupt:
        _print(f"interrupted: checkpoint saved in {a.out}/ckpt; continue with the same command plus --resume")
        raise
    _print(f"fine-tuned ({a.method}) to step {r.step}: {r.tokens_per_s:,.0f} tokens/s, last loss {r.last_loss:.4f}"
           + (f", val loss {r.val_loss:.4f}" if r.val_loss is not None else ""))
    _print(f"  trainable parameters {r.trainable:,} of {r.total:,} ({100 * r.trainable / r.total:.2f}%)")
    kind = "checkpoint" if a.method == "full" else "adapter"
    _print(f"  {kind} {r.ckpt}  metrics {r.metrics}  plot {r.plot}")
    if a.method != "full":
        _print(f"next: llmclock generate --ckpt {a.ckpt} --adapter {r.ckpt} ...  or  llmclock merge {a.ckpt} {r.ckpt} OUT")


def cmd_merge(a) -> None:
    from .finetune import merge_adapter

    _print(f"merged -> {merge_adapter(a.base, a.adapter, a.out)}")


# ---------------------------------------------------------------- applications


def cmd_data_docstrings(a) -> None:
    from .docstrings import build

    m = build(a.out, sources=a.sources or None, max_chars=a.max_chars, val_pct=a.val_pct, test_pct=a.test_pct)
    _print(f"docstrings from {m['files']} files -> {a.out}: " + ", ".join(
        f"{s} {v['examples']} examples ({v['modules']} modules)" for s, v in m["splits"].items()))


def cmd_summarize(a) -> None:
    from .adapters import load_adapted
    from .docstrings import summarize_file
    from .engine import Engine

    model, tok = load_adapted(a.ckpt, a.adapter, merged=True)
    for f, summary in summarize_file(Engine(model, tok, slots=a.slots), a.file, max_new_tokens=a.max_new_tokens):
        _print(f"{a.file}:{f.lineno}: {f.name}: {summary}")


def add_commands(sub, add_sampling_args) -> None:
    """Register eval, finetune, merge, data and summarize on the main parser's subparsers."""
    p = sub.add_parser("eval", help="LM metrics (loss, perplexity, bits per byte) and generation metrics (BLEU, ROUGE)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--adapter", help="an adapter directory (llmclock finetune) to apply, unmerged")
    p.add_argument("--data", help="prepared data directory (llmclock prepare): evaluate --splits")
    p.add_argument("--splits", nargs="+", default=["val", "test"])
    p.add_argument("--text", nargs="+", help="text files, directories, globs or .jsonl: each document scored whole")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    p.add_argument("--stride", type=int, help="sliding-window step for texts longer than the context (default: block)")
    p.add_argument("--gen", help='JSONL of {"prompt"|"input", "reference"|"references"}: BLEU, chrF, ROUGE, exact match')
    p.add_argument("--limit", type=int, help="evaluate only the first N generation examples")
    p.add_argument("--slots", type=int, default=8, help="engine slots: generations run this many at once")
    p.add_argument("--compare", help="a second checkpoint, evaluated on the same data and shown side by side")
    p.add_argument("--compare-adapter", help="an adapter for the --compare checkpoint")
    p.add_argument("--out", help="JSON report (default: eval.json beside --ckpt; an existing one is kept: eval-1.json, ...)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--block-size", type=int)
    p.add_argument("--batches", type=int, default=50)
    add_sampling_args(p, temperature=0.0, max_new_tokens=64)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("finetune", help="full, LoRA, AdaLoRA or adapter fine-tuning on a JSONL task")
    p.add_argument("--ckpt", required=True, help="base checkpoint (any llmclock checkpoint, HF imports included)")
    p.add_argument("--data", required=True, help='JSONL of {"prompt", "completion"} or {"messages": [...]}')
    p.add_argument("--val", help="validation JSONL (same format): masked loss every --eval-interval steps")
    p.add_argument("--out", required=True, help="run directory: OUT/ckpt is the adapter (or the full checkpoint)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--method", default="lora", choices=["full", "lora", "adalora", "adapter"])
    p.add_argument("--r", type=int, default=8, help="LoRA rank; AdaLoRA's target average rank")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--targets", default="c_attn,c_proj,c_fc", help="Linear layers LoRA/AdaLoRA adapt (name suffixes)")
    p.add_argument("--init-r", type=int, default=12, help="AdaLoRA: starting rank per layer")
    p.add_argument("--tinit", type=int, default=0, help="AdaLoRA: warm-up steps before pruning ranks")
    p.add_argument("--tfinal", type=int, default=0, help="AdaLoRA: final steps with ranks fixed (0: a fifth of --steps)")
    p.add_argument("--delta-t", type=int, default=10, help="AdaLoRA: steps between budget allocations")
    p.add_argument("--bottleneck", type=int, default=32, help="adapter: bottleneck width")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=500)
    g.add_argument("--max-seconds", type=float)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--block-size", type=int, default=1024, help="longest example in tokens (capped at the context)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: full 5e-5, others 1e-3)")
    g.add_argument("--min-lr", type=float, help="default: lr / 10")
    g.add_argument("--warmup", type=int, default=20)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--checkpoint-interval", type=int, default=0)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--no-fused-kernels", action="store_true")
    g.add_argument("--device", default="auto")
    g.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("merge", help="fold a LoRA/AdaLoRA adapter into plain weights: a checkpoint every command takes")
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("out")
    p.set_defaults(fn=cmd_merge)

    data = sub.add_parser("data", help="build task datasets").add_subparsers(dest="action", required=True)
    p = data.add_parser("docstrings", help="summarization set from Python source: function -> docstring's first line")
    p.add_argument("sources", nargs="*", help=".py files or directories (default: this Python's standard library)")
    p.add_argument("--out", required=True, help="new directory for train/val/test.jsonl and manifest.json")
    p.add_argument("--max-chars", type=int, default=600, help="longest function source kept")
    p.add_argument("--val-pct", type=int, default=5, help="percent of modules in validation")
    p.add_argument("--test-pct", type=int, default=5, help="percent of modules in test")
    p.set_defaults(fn=cmd_data_docstrings)

    p = sub.add_parser("summarize", help="a one-line summary of each function in a Python file")
    p.add_argument("file")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--adapter")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(fn=cmd_summarize)
