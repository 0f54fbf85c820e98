"""Subcommands from text to a checkpoint: demo, tokenizer train, prepare, train."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import ACTIVATIONS, DTYPES, PRESET_ALIASES, PRESETS, ModelConfig, TrainConfig
from ..errors import LLMClockError
from . import options
from .common import add_device_flags, add_overwrite, check_out, echo
from .options import add_config_flags, config_from_args, explicit_fields, integer, number

preset_name = options.choice_of(lambda: list(PRESETS) + list(PRESET_ALIASES), "preset")
fraction = number(0.0, 1.0, hi_open=True)
context_length = options.ranged(ModelConfig.RANGES["block_size"])


# ---------------------------------------------------------------- demo


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a small model on the embedded corpus (Python's stdlib) and sample from it")
    p.add_argument("--out", type=options.path, help="run directory (default: runs/demo, or runs/demo-N if that exists)")
    p.add_argument("--minutes", type=number(0.0, 24 * 60.0, lo_open=True), default=5.0,
                   help="training wall-time budget (default: 5)")
    p.add_argument("--preset", type=preset_name, default="demo", help="model shape (default: demo)")
    p.add_argument("--vocab-size", type=integer(257, 2**20), default=4096, help="BPE vocabulary (default: 4096)")
    p.add_argument("--seed", type=options.seed, default=1337)
    add_overwrite(p, "an existing --out")
    p.add_argument("--max-files", type=integer(1), help="use only the first N files of the corpus (quick trials)")
    p.add_argument("--finetune-minutes", type=number(0.0), default=0.0,
                   help="second act: LoRA-fine-tune the model this long on docstring summarization and show "
                   "ROUGE-L before and after (default: 0, off; `make demo-finetune` runs it)")
    p.set_defaults(fn=cmd_demo)


def cmd_demo(a) -> None:
    from ..demo import run_demo

    run_demo(out=a.out, minutes=a.minutes, preset_name=a.preset, vocab_size=a.vocab_size, overwrite=a.overwrite,
             seed=a.seed, max_files=a.max_files, finetune_minutes=a.finetune_minutes, echo=echo)


# ---------------------------------------------------------------- tokenizer


def add_tokenizer(sub) -> None:
    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True,
                                                                           metavar="ACTION")
    p = tk.add_parser("train", help="train a byte-level BPE (or char-level) tokenizer")
    p.add_argument("inputs", nargs="+", type=options.path, help="text files, directories, globs or .jsonl")
    p.add_argument("--out", type=options.path, default="tokenizer.json", help="(default: tokenizer.json)")
    p.add_argument("--vocab-size", type=integer(257, 2**31), default=8192, help="BPE vocabulary (default: 8192)")
    p.add_argument("--char", action="store_true", help="character-level vocabulary instead of BPE")
    p.add_argument("--text-field", type=options.nonempty, default="text", help="field holding the text in .jsonl inputs")
    add_overwrite(p, "--out")
    p.set_defaults(fn=cmd_tokenizer_train)


def cmd_tokenizer_train(a) -> None:
    from tqdm.auto import tqdm

    from ..corpus import SourceStats
    from ..data import iter_sources
    from ..tokenizer import Tokenizer

    out = check_out(a.out, "--out", overwrite=a.overwrite)
    stats = SourceStats()
    with tqdm(desc="read", unit="B", unit_scale=True, dynamic_ncols=True, leave=False, disable=None) as bar:
        def texts():
            for _, text in iter_sources(a.inputs, text_field=a.text_field, stats=stats):
                bar.update(len(text.encode("utf-8")))
                yield text

        tok = Tokenizer.train_char(texts()) if a.char else Tokenizer.train_bpe(texts(), a.vocab_size)
    tok.save(out)
    skipped = stats.skipped_non_utf8
    echo(f"tokenizer ({tok.kind}, {tok.vocab_size} tokens) -> {out}" + _skipped(skipped, len(skipped)))


def _skipped(files: list[str], count: int) -> str:
    """'; skipped 2 non-UTF-8 file(s): a.txt, b.txt' (the first three named), or ''."""
    if not count:
        return ""
    more = f", ... ({count - 3} more)" if count > 3 else ""
    return f"; skipped {count} non-UTF-8 file(s): {', '.join(files[:3])}{more}"


# ---------------------------------------------------------------- prepare


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into train/val/test token shards (and keep the tokenizer)")
    p.add_argument("inputs", nargs="+", type=options.path, help="text files, directories, globs or .jsonl")
    p.add_argument("--tokenizer", required=True, type=options.path,
                   help="tokenizer.json, or a dir with it or vocab.json+merges.txt; copied into --out")
    p.add_argument("--out", required=True, type=options.path, help="data directory to write")
    p.add_argument("--val", type=fraction, default=0.05, help="validation fraction (default: 0.05)")
    p.add_argument("--test", type=fraction, default=0.05, help="test fraction (default: 0.05)")
    p.add_argument("--no-shuffle", action="store_true", help="keep file order (split the stream as given)")
    p.add_argument("--seed", type=options.seed, default=1337, help="file-order shuffle seed (default: 1337)")
    p.add_argument("--text-field", type=options.nonempty, default="text", help="field holding the text in .jsonl")
    add_overwrite(p, "the data in --out")
    p.set_defaults(fn=cmd_prepare)


def cmd_prepare(a) -> None:
    from tqdm.auto import tqdm

    from ..data import MANIFEST, prepare
    from ..tokenizer import Tokenizer

    if a.val + a.test >= 1:
        raise LLMClockError(f"--val {a.val} and --test {a.test} leave nothing to train on (their sum must be < 1)")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise LLMClockError(f"--out {out}: exists and is not a directory")
    if (out / MANIFEST).exists() and not a.overwrite:
        raise LLMClockError(f"--out {out}: already holds prepared data (pass --overwrite to replace it)")
    tok = Tokenizer.load(a.tokenizer)
    with tqdm(desc="prepare", unit="B", unit_scale=True, dynamic_ncols=True, leave=False, disable=None) as bar:
        m = prepare(a.inputs, tok, out, val_fraction=a.val, test_fraction=a.test, shuffle_files=not a.no_shuffle,
                    seed=a.seed, text_field=a.text_field, overwrite=a.overwrite, progress=bar)
    counts = ", ".join(f"{k} {v['tokens']:,}" for k, v in m["splits"].items())
    skipped = m["skipped_non_utf8"]
    echo(f"{m['documents']:,} documents -> tokens: {counts} ({m['dtype']}) and its tokenizer in {out}"
         + _skipped(skipped["files"], skipped["count"]))


# ---------------------------------------------------------------- train

MODEL_FLAGS = {"n_layer": None, "n_head": None, "n_embd": None, "dropout": None, "activation": None,
               "bias": None, "block_size": "--context"}
TRAIN_FLAGS = {
    "max_steps": "--steps", "max_seconds": None, "batch_size": None, "block_size": None, "grad_accum": None,
    "learning_rate": "--lr", "min_lr": None, "warmup_steps": "--warmup", "lr_decay_steps": None,
    "weight_decay": None, "beta1": None, "beta2": None, "grad_clip": None, "eval_interval": None,
    "eval_batches": None, "checkpoint_interval": None, "seed": None, "dtype": None, "compile": None,
    "fused_kernels": None, "device": None, "fsdp": None, "dist_timeout": None,
}
RESUME_LOCKED = ("batch_size", "block_size", "grad_accum", "learning_rate", "min_lr", "warmup_steps", "lr_decay_steps",
                 "weight_decay", "beta1", "beta2", "grad_clip", "seed", "dtype")
"""Settings a resumed run must share with its checkpoint to continue the same run (the rest may change)."""


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on prepared shards (works under torchrun)")
    p.add_argument("--data", required=True, type=options.path, help="directory written by `llmclock prepare`")
    p.add_argument("--out", required=True, type=options.path, help="run directory (checkpoint at OUT/ckpt)")
    p.add_argument("--tokenizer", type=options.path, help="default: the one `prepare` kept in --data")
    p.add_argument("--resume", action="store_true", help="continue OUT's run exactly where it stopped")
    p.add_argument("--override", action="store_true",
                   help="with --resume: accept settings that differ from the checkpoint's (batch size, "
                   "learning rate, ...); the run is then no longer the same run continued")
    p.add_argument("--init-from", type=options.path, help="start from this checkpoint's weights (fine-tuning)")
    p.add_argument("--wandb", metavar="PROJECT", type=options.nonempty,
                   help="also log to Weights & Biases (an optional extra; WANDB_MODE=offline works)")
    g = p.add_argument_group("model (default: the preset's; with --resume or --init-from: the checkpoint's)")
    g.add_argument("--preset", type=preset_name, help="named shape: test, nano (default), demo, gpt2 (124M), ...")
    add_config_flags(g, ModelConfig, {k: v for k, v in MODEL_FLAGS.items() if k != "block_size"},
                     types={"activation": options.choice_of(lambda: list(ACTIVATIONS), "activation")}, defaults=False)
    g.add_argument("--context", dest="context", type=context_length,
                   help="model context length (default: --block-size)")
    g = p.add_argument_group("training")
    add_config_flags(g, TrainConfig, TRAIN_FLAGS,
                     types={"dtype": options.choice_of(lambda: list(DTYPES), "dtype"), "device": options.device})
    g.add_argument("--log-interval", type=integer(1), default=10, help="log the training loss every N steps (default: 10)")
    g = p.add_argument_group("processes (or run the same command under torchrun)")
    g.add_argument("--nproc", type=integer(1, 4096), help="train on N processes of this machine (torchrun --standalone)")
    g.add_argument("--max-restarts", type=integer(0, 1000), default=0,
                   help="with --nproc: restart the job up to N times after a process fails; it resumes from the "
                   "last checkpoint (default: 0)")
    p.set_defaults(fn=cmd_train)


def _given_model(a) -> dict:
    """The model fields set on the command line (--context is the model's block_size)."""
    given = explicit_fields(ModelConfig, a, [k for k in MODEL_FLAGS if k != "block_size"])
    return given | ({"block_size": a.context} if a.context else {})


def _model_config(a, vocab_size: int, train_block: int) -> ModelConfig:
    from ..config import preset

    name, given = a.preset or "nano", _given_model(a)
    shape = {**PRESETS[PRESET_ALIASES.get(name, name)], **given}
    if shape["n_embd"] % shape["n_head"]:  # said with the flags (or the preset) that set each number

        def said(field: str) -> str:
            flag = MODEL_FLAGS.get(field) or "--" + field.replace("_", "-")
            return f"{flag} {shape[field]}" if field in given else f"the {name} preset's {field} {shape[field]}"

        raise LLMClockError(f"{said('n_embd')} is not divisible by {said('n_head')}")
    return preset(name, vocab_size=vocab_size, **{"block_size": train_block, **given})


def _flag_of(name: str, flags: dict) -> str:
    return {"bias": "--no-bias"}.get(name) or flags.get(name) or "--" + name.replace("_", "-")


def _differences(saved: dict, given: dict, flags: dict) -> list[str]:
    """'--flag VALUE (checkpoint: SAVED)' for each setting in `flags` that `given` sets to another value."""
    return [f"{_flag_of(n, flags)} {given[n]} (checkpoint: {saved.get(n)})"
            for n in flags if n in given and given[n] != saved.get(n)]


def _shape_differences(a, mcfg: ModelConfig, names: dict) -> list[str]:
    """How the model flags (and --preset) given contradict the checkpoint's model."""
    from ..config import preset

    saved, given = mcfg.to_dict(), _given_model(a)
    out = _differences(saved, given, names)
    if a.preset:
        want = preset(a.preset, **{**saved, **{k: v for k, v in PRESETS[PRESET_ALIASES.get(a.preset, a.preset)].items()
                                                if k != "block_size"}, **given}).to_dict()
        out += [f"--preset {a.preset} ({n} {want[n]}, checkpoint: {saved[n]})"
                for n in names if n not in given and want[n] != saved[n]]
    return out


def _resume_configs(a, link: Path) -> tuple[ModelConfig, TrainConfig, dict]:
    """The run's settings when resuming: the checkpoint's, with the flags given on top; contradictions
    are refused unless --override (and model shape changes always are: the weights would not fit)."""
    from ..checkpoint import load_train_state_json, read_config

    if not link.exists():
        raise LLMClockError(f"nothing to resume: {link} not found (drop --resume to start a new run)")
    mcfg, state = read_config(link), load_train_state_json(link)
    shape = _shape_differences(a, mcfg, MODEL_FLAGS)
    if shape:
        raise LLMClockError(f"--resume: {link} holds a different model ({'; '.join(shape)}); "
                            "drop those flags, or start a new run in another --out")
    saved = {k: v for k, v in state.get("train_config", {}).items() if k in TrainConfig.__dataclass_fields__}
    locked = _differences(saved, explicit_fields(TrainConfig, a), {k: TRAIN_FLAGS[k] for k in RESUME_LOCKED})
    if locked and not a.override:
        raise LLMClockError(f"--resume: {'; '.join(locked)} would not continue the same run; "
                            "drop them, or pass --override to change them anyway")
    return mcfg, config_from_args(TrainConfig, a, base=saved), state


def cmd_train(a) -> None:
    from ..checkpoint import read_config
    from ..config import resolve_device
    from ..data import TokenData
    from ..distributed import restarted
    from ..memory import check_fits, train_bytes
    from ..tokenizer import Tokenizer
    from ..train import train

    if a.override and not a.resume:
        raise LLMClockError("--override only applies with --resume")
    if a.resume and a.init_from:
        raise LLMClockError("--resume continues OUT's own run; --init-from starts a new one: give one of them")
    data = TokenData(a.data)
    tok = _data_tokenizer(a, data, Tokenizer)
    out, link = Path(a.out), Path(a.out) / "ckpt"
    if not a.resume and restarted() and link.exists():
        a.resume = True  # torchrun restarted this job after a failure: continue from its last checkpoint
    state = None
    if a.resume:
        mcfg, cfg, state = _resume_configs(a, link)
        if state.get("tokenizer_hash") and state["tokenizer_hash"] != data.tokenizer_hash:
            raise LLMClockError(f"--resume: {a.data} was prepared with another tokenizer than the run in {out}")
        if state["step"] >= cfg.max_steps:
            echo(f"{link} is already at step {state['step']} (--steps {cfg.max_steps}): nothing to do; "
                 "raise --steps to train further")
            return
    else:
        if out.exists() and not out.is_dir():
            raise LLMClockError(f"--out {out}: exists and is not a directory")
        if link.exists() or link.is_symlink():
            raise LLMClockError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
        cfg = config_from_args(TrainConfig, a)
        if a.init_from:
            mcfg = read_config(Path(a.init_from))
            shape = _shape_differences(a, mcfg, {k: v for k, v in MODEL_FLAGS.items() if k != "dropout"})
            if shape:
                raise LLMClockError(f"--init-from {a.init_from}: the model's shape is that checkpoint's; "
                                    f"drop {'; '.join(shape)}")
            if a.dropout is not None:
                mcfg = dataclasses.replace(mcfg, dropout=a.dropout)
        else:
            mcfg = _model_config(a, data.vocab_size, cfg.block_size)
    if cfg.block_size > mcfg.block_size:
        raise LLMClockError(f"--block-size {cfg.block_size} is larger than the model's context ({mcfg.block_size})")
    device = resolve_device(cfg.device)
    check_fits(train_bytes(mcfg, cfg), f"training with --batch-size {cfg.batch_size} x --block-size "
               f"{cfg.block_size} (and --eval-batches {cfg.eval_batches}) on this model", "lower --batch-size "
               "(raise --grad-accum to keep the tokens per step), --block-size or --eval-batches", device)
    if a.nproc:
        _launch(a)
        return
    try:
        wandb = {"project": a.wandb, "config": cfg.to_dict() | {"model": mcfg.to_dict()}} if a.wandb else None
        r = train(mcfg, cfg, data, out, tokenizer=tok, resume=a.resume, init_from=a.init_from,
                  log_interval=a.log_interval, wandb=wandb)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_saved_where(link, state)) from None
    if r.ckpt is None:
        return  # not rank 0
    echo(f"trained to step {r.step}: {r.ms_per_step:.1f} ms/step, {r.tokens_per_s:,.0f} tokens/s, last loss {r.last_loss:.4f}")
    for split, e in r.evals.items():
        echo(f"  {split:5s} loss {e['loss']:.4f}  ppl {e['ppl']:.2f}  next-token acc {e['acc']:.3f}")
    echo(f"  checkpoint {r.ckpt}  metrics {r.metrics}  plot {r.plot}")


def _launch(a) -> None:
    """`train --nproc N`: this same command (less --nproc/--max-restarts) on N local ranks under torchrun's agent."""
    from ..distributed import launch_local

    argv, skip = [], False
    for arg in a.argv:
        if skip:
            skip = False
        elif arg in ("--nproc", "--max-restarts"):
            skip = True
        elif not arg.startswith(("--nproc=", "--max-restarts=")):
            argv.append(arg)
    launch_local(a.nproc, argv, max_restarts=a.max_restarts)


def _data_tokenizer(a, data, Tokenizer):
    """--tokenizer, else the tokenizer `prepare` kept with the data; it must be the data's."""
    path = Path(a.tokenizer) if a.tokenizer else data.tokenizer_path
    if not path.exists():
        raise LLMClockError(f"{a.data} has no tokenizer.json (prepared by an older llmclock?); "
                            "give the one it was prepared with: --tokenizer FILE")
    tok = Tokenizer.load(path)
    if tok.hash != data.tokenizer_hash:
        raise LLMClockError(f"{path}: not the tokenizer the data in {a.data} was prepared with")
    return tok


def _saved_where(link: Path, state: dict | None) -> str:
    from ..checkpoint import load_train_state_json

    before = state["step"] if state else None
    try:
        step = load_train_state_json(link)["step"]
    except LLMClockError:
        step = None
    if step is None or step == before:
        return "nothing new was saved"
    return f"checkpoint of step {step} saved in {link}; continue with the same command plus --resume"
