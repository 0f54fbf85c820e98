"""Evaluation, fine-tuning and the applications: eval, finetune, merge, data docstrings, summarize."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import LLMClockError
from . import options
from .common import add_adapter, add_device_flags, check_out, echo, load_model
from .options import integer, number


def _free_path(path: Path) -> Path:
    """`path`, or the first free `stem-N.suffix` beside it: an earlier report is never overwritten."""
    free, n = path, 1
    while free.exists():
        free, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return free


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, leave=False, disable=None)


# ---------------------------------------------------------------- eval


def add_eval(sub) -> None:
    from .engine_cmds import add_sampling_flags

    p = sub.add_parser("eval", help="LM metrics (loss, perplexity, bits per byte) on shards or any text; "
                       "generation metrics (BLEU, chrF, ROUGE, exact match) on a JSONL set")
    p.add_argument("--ckpt", required=True, type=options.path)
    add_adapter(p)
    p.add_argument("--data", type=options.path, help="prepared data directory (llmclock prepare): --splits")
    p.add_argument("--splits", nargs="+", default=["val", "test"], type=options.nonempty,
                   help="(default: val test; an empty split is skipped with a note)")
    p.add_argument("--text", nargs="+", type=options.path,
                   help="text files, directories, globs or .jsonl: each document scored whole")
    p.add_argument("--text-field", default="text", type=options.nonempty, help="field of the text in .jsonl inputs")
    p.add_argument("--stride", type=integer(1),
                   help="sliding-window step for documents longer than --block-size (default: --block-size)")
    p.add_argument("--gen", type=options.path,
                   help='JSONL of {"prompt"|"input", "reference"|"references"}: generated on the engine\'s slots')
    p.add_argument("--limit", type=integer(1), help="only the first N --gen examples")
    p.add_argument("--slots", type=integer(1, 256), default=8, help="--gen examples decoded at once (default: 8)")
    p.add_argument("--compare", type=options.path, help="a second checkpoint on the same data, side by side")
    p.add_argument("--compare-adapter", type=options.path, help="an adapter for the --compare checkpoint")
    p.add_argument("--out", type=options.path,
                   help="JSON report (default: eval.json beside --ckpt; an existing report is kept: eval-1.json, ...)")
    p.add_argument("--batch-size", type=integer(1), default=12, help="sequences per forward (default: 12)")
    p.add_argument("--block-size", type=integer(1), help="tokens per window (default: the model's context)")
    p.add_argument("--batches", type=integer(1), default=50, help="batches per --data split (default: 50)")
    p.add_argument("--data-seed", type=options.seed, default=1337, help="which --data windows are drawn (default: 1337)")
    add_sampling_flags(p)
    p.set_defaults(fn=cmd_eval, temperature=0.0)


def _eval_one(a, ckpt: str, adapter: str | None) -> tuple[dict, str]:
    """{section: metrics} of one model (and its generations under 'gen_outputs'), its tokenizer hash."""
    import argparse

    from ..evaluate import evaluate_checkpoint, evaluate_texts, read_texts

    model, tok = load_model(argparse.Namespace(**{**vars(a), "ckpt": ckpt, "adapter": adapter}), merged=False)
    out: dict[str, dict] = {}
    if a.data:
        from ..data import TokenData

        data = TokenData(a.data)
        if data.tokenizer_hash != tok.hash:
            raise LLMClockError(f"{a.data} was prepared with another tokenizer than {ckpt}'s; compare models with "
                                "different vocabularies on --text (bits per byte)")
        from ..memory import check_fits, eval_bytes

        block = a.block_size or model.config.block_size
        check_fits(eval_bytes(model.config, a.batches * a.batch_size, a.batch_size, block),
                   f"--batches {a.batches} x --batch-size {a.batch_size} x {block} tokens", "lower --batches",
                   next(model.parameters()).device)
        for split in a.splits:
            if not data.num_tokens(split):
                echo(f"{split}: empty in {a.data}, skipped")
                continue
            out[split] = evaluate_checkpoint(model, data, split, batch_size=a.batch_size, block_size=a.block_size,
                                             batches=a.batches, seed=a.data_seed, tokenizer=tok)
    if a.text:
        texts = read_texts(a.text, text_field=a.text_field)
        with _bar(len(texts), "text") as bar:
            out["text"] = evaluate_texts(model, tok, texts, block_size=a.block_size, stride=a.stride,
                                         batch_size=a.batch_size, progress=lambda n: bar.update(n - bar.n))
    if a.gen:
        from ..adapters import for_engine
        from ..engine import Engine
        from ..evalgen import evaluate_generation, load_examples
        from .engine_cmds import sampling

        examples = load_examples(a.gen, limit=a.limit)
        params = sampling(a)
        params.stop = params.stop or ["\n"]  # one line per answer unless --stop says otherwise
        engine = Engine(for_engine(model).eval(), tok, slots=a.slots)
        with _bar(len(examples), "generate") as bar:
            out["gen"], out["gen_outputs"] = evaluate_generation(engine, examples, params,
                                                                 progress=lambda n: bar.update(n - bar.n))
    return out, tok.hash


def cmd_eval(a) -> None:
    from ..evaluate import format_lines, format_table

    if not (a.data or a.text or a.gen):
        raise LLMClockError("nothing to evaluate: give --data (prepared splits), --text (files, dirs, JSONL) or --gen")
    path = _free_path(check_out(a.out, "--out", overwrite=True) if a.out else Path(a.ckpt).absolute().parent / "eval.json")
    if a.data:
        from ..data import TokenData

        data = TokenData(a.data)
        for split in a.splits:
            data.num_tokens(split)  # an unknown split fails before any model loads
    models = {"model": (a.ckpt, a.adapter)} | ({"compare": (a.compare, a.compare_adapter)} if a.compare else {})
    results, hashes = {}, {}
    for name, (ckpt, adapter) in models.items():
        results[name], hashes[name] = _eval_one(a, ckpt, adapter)
    generations = {n: r.pop("gen_outputs") for n, r in results.items() if "gen_outputs" in r}
    if len(results) == 1:
        echo(format_lines(results["model"]))
    else:
        differ = len(set(hashes.values())) > 1
        if differ:
            echo("the two models' vocabularies differ: compare bits per byte, not loss or perplexity")
        labels = {n: ckpt + (f" + {adapter}" if adapter else "") for n, (ckpt, adapter) in models.items()}
        echo(format_table({labels[n]: r for n, r in results.items()}, bpb_first=differ))
    doc = {"settings": {k: v for k, v in vars(a).items() if k != "fn"},
           "models": {n: {"ckpt": c, "adapter": ad, "tokenizer_hash": hashes[n]} for n, (c, ad) in models.items()},
           "results": results, "generations": generations, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    echo(f"wrote {path}")


# ---------------------------------------------------------------- finetune / merge


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="full, LoRA, AdaLoRA or bottleneck-adapter fine-tuning on a JSONL task")
    p.add_argument("--ckpt", required=True, type=options.path, help="base checkpoint (HF imports included)")
    p.add_argument("--data", required=True, type=options.path,
                   help='JSONL of {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}')
    p.add_argument("--val", type=options.path, help="validation JSONL: masked loss every --eval-interval steps")
    p.add_argument("--out", required=True, type=options.path,
                   help="run directory: OUT/ckpt is the adapter (or, for --method full, the checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue OUT's run exactly where it stopped")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="lora", type=options.choice_of(lambda: ["full", "lora", "adalora", "adapter"],
                                                                     "method"), help="(default: lora)")
    g.add_argument("--r", type=integer(1, 4096), default=8, help="LoRA rank; AdaLoRA's target average rank (default: 8)")
    g.add_argument("--alpha", type=number(0.0, lo_open=True), default=16.0, help="LoRA scale alpha / r (default: 16)")
    g.add_argument("--lora-dropout", type=number(0.0, 1.0, hi_open=True), default=0.0, help="(default: 0)")
    g.add_argument("--targets", default="c_attn,c_proj,c_fc", type=options.nonempty,
                   help="Linear layers LoRA/AdaLoRA adapt, by name suffix (default: c_attn,c_proj,c_fc)")
    g.add_argument("--init-r", type=integer(1, 4096), default=12, help="AdaLoRA: starting rank (default: 12)")
    g.add_argument("--tinit", type=integer(0), default=0, help="AdaLoRA: steps before ranks are pruned (default: 0)")
    g.add_argument("--tfinal", type=integer(0), default=0,
                   help="AdaLoRA: final steps with ranks fixed (default: a fifth of --steps)")
    g.add_argument("--delta-t", type=integer(1), default=10, help="AdaLoRA: steps between allocations (default: 10)")
    g.add_argument("--bottleneck", type=integer(1, 65536), default=32, help="adapter: bottleneck width (default: 32)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=integer(1), default=500, help="(default: 500)")
    g.add_argument("--max-seconds", type=number(0.0, lo_open=True), help="stop after this wall time")
    g.add_argument("--batch-size", type=integer(1), default=8,
                   help="rows per step: one example each, padded, or packed rows with --pack (default: 8)")
    g.add_argument("--pack", action="store_true",
                   help="pack whole examples into rows of --block-size tokens (attention crosses examples "
                        "within a row; the loss still covers completions only); default: padded, one example per row")
    g.add_argument("--block-size", type=integer(2), default=1024,
                   help="longest example in tokens, capped at the model's context (default: 1024)")
    g.add_argument("--lr", type=number(0.0, lo_open=True), help="peak learning rate (default: full 5e-5, else 1e-3)")
    g.add_argument("--min-lr", type=number(0.0), help="end of the cosine decay (default: --lr / 10)")
    g.add_argument("--warmup", type=integer(0), default=20, help="(default: 20)")
    g.add_argument("--weight-decay", type=number(0.0), default=0.0, help="(default: 0)")
    g.add_argument("--grad-clip", type=number(0.0), default=1.0, help="(default: 1)")
    g.add_argument("--eval-interval", type=integer(0), default=100, help="(default: 100; 0: only at the end)")
    g.add_argument("--checkpoint-interval", type=integer(0), default=0, help="(default: 0: only at the end)")
    g.add_argument("--seed", type=options.seed, default=1337)
    g.add_argument("--no-fused-kernels", action="store_true", help="torch ops only")
    g.add_argument("--wandb", metavar="PROJECT", type=options.nonempty,
                   help="also log to Weights & Biases (an optional extra; WANDB_MODE=offline works)")
    add_device_flags(p, default="auto")
    p.set_defaults(fn=cmd_finetune)


def cmd_finetune(a) -> None:
    import torch

    from ..adapters import AdapterConfig
    from ..config import TrainConfig
    from ..finetune import DEFAULT_LR, finetune

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = AdapterConfig(method=a.method, r=a.r, alpha=a.alpha, dropout=a.lora_dropout,
                        targets=[t.strip() for t in a.targets.split(",") if t.strip()], init_r=a.init_r,
                        tinit=a.tinit, tfinal=a.tfinal, delta_t=a.delta_t, bottleneck=a.bottleneck)
    lr = a.lr or DEFAULT_LR[a.method]
    recipe = TrainConfig(max_steps=a.steps, max_seconds=a.max_seconds, batch_size=a.batch_size, block_size=a.block_size,
                         learning_rate=lr, min_lr=lr / 10 if a.min_lr is None else a.min_lr, warmup_steps=a.warmup,
                         weight_decay=a.weight_decay, grad_clip=a.grad_clip, eval_interval=a.eval_interval,
                         checkpoint_interval=a.checkpoint_interval, seed=a.seed, fused_kernels=not a.no_fused_kernels,
                         device=a.device)
    wandb = {"project": a.wandb, "config": {"adapter": cfg.to_dict(), "recipe": recipe.to_dict()}} if a.wandb else None
    try:
        r = finetune(a.ckpt, a.data, a.out, recipe, cfg, val_path=a.val, resume=a.resume, wandb=wandb, pack=a.pack)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"checkpoint saved in {a.out}/ckpt; continue with the same command plus --resume")
    echo(f"fine-tuned ({a.method}) to step {r.step}: {r.tokens_per_s:,.0f} tokens/s, last loss {r.last_loss:.4f}"
         + (f", val loss {r.val_loss:.4f}" if r.val_loss is not None else ""))
    echo(f"  trainable parameters {r.trainable:,} of {r.total:,} ({100 * r.trainable / r.total:.2f}%)")
    echo(f"  {'checkpoint' if a.method == 'full' else 'adapter'} {r.ckpt}  metrics {r.metrics}  plot {r.plot}")
    if a.method != "full":
        echo(f"next: llmclock generate --ckpt {a.ckpt} --adapter {r.ckpt} --prompt ...   "
             f"or: llmclock merge {a.ckpt} {r.ckpt} OUT")


def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA/AdaLoRA adapter into plain weights: a checkpoint every command takes")
    p.add_argument("base", type=options.path)
    p.add_argument("adapter", type=options.path)
    p.add_argument("out", type=options.path)
    p.set_defaults(fn=cmd_merge)


def cmd_merge(a) -> None:
    from ..finetune import merge_adapter

    echo(f"merged -> {merge_adapter(a.base, a.adapter, check_out(a.out, 'OUT', kind='dir'))}")


# ---------------------------------------------------------------- applications


def add_data(sub) -> None:
    data = sub.add_parser("data", help="build task datasets").add_subparsers(dest="action", required=True,
                                                                            metavar="DATASET")
    p = data.add_parser("docstrings", help="summarization set from Python source: a function -> its docstring's "
                        "first line, split by module")
    p.add_argument("sources", nargs="*", type=options.path,
                   help=".py files or directories (default: this Python's standard library)")
    p.add_argument("--out", required=True, type=options.path, help="new directory: train/val/test.jsonl, manifest")
    p.add_argument("--max-chars", type=integer(1), default=600, help="longest function source kept (default: 600)")
    p.add_argument("--val-pct", type=integer(0, 99), default=5, help="percent of modules in validation (default: 5)")
    p.add_argument("--test-pct", type=integer(0, 99), default=5, help="percent of modules in test (default: 5)")
    p.set_defaults(fn=cmd_data_docstrings)


def cmd_data_docstrings(a) -> None:
    from ..docstrings import build

    m = build(check_out(a.out, "--out", kind="dir"), sources=a.sources or None, max_chars=a.max_chars,
              val_pct=a.val_pct, test_pct=a.test_pct)
    echo(f"docstrings from {m['files']} files -> {a.out}: " + ", ".join(
        f"{s} {v['examples']} examples ({v['modules']} modules)" for s, v in m["splits"].items()))


def add_summarize(sub) -> None:
    p = sub.add_parser("summarize", help="a one-line summary of each function in a Python file")
    p.add_argument("file", type=options.path)
    p.add_argument("--ckpt", required=True, type=options.path)
    add_adapter(p)
    p.add_argument("--slots", type=integer(1, 256), default=8, help="functions summarized at once (default: 8)")
    p.add_argument("--max-new-tokens", type=integer(1), default=40, help="(default: 40)")
    add_device_flags(p)
    p.set_defaults(fn=cmd_summarize)


def cmd_summarize(a) -> None:
    from ..docstrings import summarize_file
    from ..engine import Engine

    model, tok = load_model(a)
    for f, summary in summarize_file(Engine(model, tok, slots=a.slots), a.file, max_new_tokens=a.max_new_tokens):
        echo(f"{a.file}:{f.lineno}: {f.name}: {summary}")
