"""`llmclock demo`: the whole pipeline on the embedded corpus (this Python's standard library).

tokenizer -> token shards -> a few minutes of training -> validation/test evaluation -> samples
-> loss plot -> one sample traced cycle by cycle. The tokenizer and shards are cached under
runs/.cache and reused by later demos.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .errors import LLMClockError

SAMPLE_PROMPTS = ["def ", "class ", "import ", '"""']


def next_run_dir(base: Path) -> Path:
    """runs/demo, or the first free runs/demo-N."""
    if not base.exists():
        return base
    n = 1
    while base.with_name(f"{base.name}-{n}").exists():
        n += 1
    return base.with_name(f"{base.name}-{n}")


def corpus_key(sources: list[str], vocab_size: int) -> str:
    import sys

    h = hashlib.sha256()
    for s in sources:
        st = Path(s).stat()
        h.update(f"{s}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-v{vocab_size}-{h.hexdigest()[:12]}"


def build_data(cache: Path, sources: list[str], vocab_size: int, echo):
    """Train (or reuse) the BPE tokenizer and the token shards for the corpus."""
    from tqdm.auto import tqdm

    from .data import TokenData, iter_sources, prepare
    from .tokenizer import Tokenizer

    tok_path, data_dir = cache / "tokenizer.json", cache / "data"
    if tok_path.exists() and (data_dir / "manifest.json").exists():
        echo(f"[1/5] reusing tokenizer and shards from {cache}")
        return Tokenizer.load(tok_path), TokenData(data_dir)
    cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    echo(f"[1/5] training a byte-level BPE tokenizer ({vocab_size} tokens) ...")
    tok = Tokenizer.train_bpe((text for _, text in iter_sources(sources)), vocab_size)
    tok.save(tok_path)
    echo(f"      done in {time.perf_counter() - t:.1f}s -> {tok_path}")
    echo("[2/5] tokenizing into train/val/test shards ...")
    with tqdm(desc="prepare", unit="B", unit_scale=True, dynamic_ncols=True, leave=False, disable=None) as bar:
        prepare(sources, tok, data_dir, val_fraction=0.05, test_fraction=0.05, progress=bar, overwrite=True)
    return tok, TokenData(data_dir)


def calibrate_steps(model_config, train_config, seconds: float) -> int:
    """How many optimizer steps fit in `seconds`, from timing a few steps of the model `train` will
    run: on the CPU's fused kernels when the recipe uses them, as `train` does."""
    import torch

    from .fused import fuse_cpu_ops
    from .model import GPT
    from .train import make_optimizer

    torch.manual_seed(0)
    model = GPT(model_config)
    if train_config.fused_kernels and not train_config.compile and train_config.dtype == "float32":
        fuse_cpu_ops(model)
    opt = make_optimizer(model, train_config, torch.device("cpu"))
    x = torch.randint(model_config.vocab_size, (train_config.batch_size, train_config.block_size))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    per_step = sorted(times[1:])[1] * 1.04  # a little headroom for logging and evaluation
    return max(20, int(seconds / per_step))


def run_demo(*, out: str | None, minutes: float, preset_name: str, vocab_size: int, overwrite: bool, seed: int,
             max_files: int | None = None, echo=print) -> Path:
    import shutil

    import torch

    from .checkpoint import load_checkpoint
    from .config import TrainConfig, preset
    from .corpus import describe_stdlib, stdlib_sources
    from .engine import Engine, SamplingParams
    from .model import GPT
    from .train import train

    if not 0 < minutes < float("inf"):
        raise LLMClockError(f"--minutes must be positive, got {minutes}")
    preset(preset_name, vocab_size=vocab_size)  # a bad preset fails now, not after the tokenizer is trained
    run = Path(out) if out else next_run_dir(Path("runs/demo"))
    if run.exists():
        if not overwrite:
            raise LLMClockError(f"{run} already exists (pass --overwrite to replace it, or choose another --out)")
        shutil.rmtree(run)
    info = describe_stdlib()
    sources = stdlib_sources()[:max_files]
    echo(f"llmclock demo: corpus = this Python's standard library at {info['path']}")
    echo(f"      {info['files']:,} .py files, {info['bytes'] / 1e6:.1f} MB of code, docstrings and pydoc topics"
         + (f" (using the first {len(sources)})" if max_files else ""))
    tok, data = build_data(Path("runs/.cache") / corpus_key(sources, vocab_size), sources, vocab_size, echo)
    echo(f"      train {data.num_tokens('train'):,} / val {data.num_tokens('val'):,} / test {data.num_tokens('test'):,} tokens")

    mcfg = preset(preset_name, vocab_size=tok.vocab_size)
    budget = minutes * 60
    tcfg = TrainConfig(batch_size=16, block_size=mcfg.block_size, learning_rate=2e-3, min_lr=2e-4, warmup_steps=50,
                       seed=seed, max_seconds=budget, eval_batches=20)
    steps = calibrate_steps(mcfg, tcfg, budget)
    tcfg = TrainConfig(**{**tcfg.to_dict(), "max_steps": steps, "eval_interval": max(1, steps // 8)})
    n_params = GPT(mcfg).num_params()
    echo(f"[3/5] training a {mcfg.n_layer}-layer, {mcfg.n_embd}-wide GPT ({n_params / 1e6:.2f}M parameters) "
         f"for ~{minutes:g} min: {steps} steps of {tcfg.batch_size}x{tcfg.block_size} tokens, {torch.get_num_threads()} threads")
    result = train(mcfg, tcfg, data, run, tokenizer=tok)
    echo("[4/5] evaluation")
    for split, e in result.evals.items():
        echo(f"      {split:5s} loss {e['loss']:.3f}  perplexity {e['ppl']:.1f}  next-token accuracy {e['acc']:.1%}")

    echo("[5/5] samples (temperature 0.8, top-k 40, seeded), then one traced on the clock")
    model, tok = load_checkpoint(run / "ckpt")
    engine = Engine(model, tok, slots=len(SAMPLE_PROMPTS))
    params = [SamplingParams(max_new_tokens=80, temperature=0.8, top_k=40, seed=seed + i) for i in range(len(SAMPLE_PROMPTS))]
    completions = engine.complete(SAMPLE_PROMPTS, params)
    samples = []
    for prompt, c in zip(SAMPLE_PROMPTS, completions):
        text = prompt + c.text
        samples.append({"prompt": prompt, "completion": c.text, "finish_reason": c.finish_reason})
        echo("      " + "-" * 60)
        echo("      " + text.replace("\n", "\n      "))
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    echo("      " + "-" * 60)
    trace = trace_one(engine, run, SAMPLE_PROMPTS[0], seed, echo)
    echo("files:")
    for label, path in [
        ("run directory", run), ("checkpoint", result.ckpt), ("metrics", result.metrics),
        ("loss curve", result.plot), ("samples", run / "samples.jsonl"), ("tokenizer", run / "ckpt" / "tokenizer.json"),
        ("token shards", data.data_dir), ("trace", trace["jsonl"]), ("trace plot", trace["plot"]),
        ("Perfetto trace", f"{trace['perfetto']} (open in ui.perfetto.dev)"),
    ]:
        echo(f"  {label:14s} {path}")
    echo("next:")
    echo(f"  llmclock generate --ckpt {run}/ckpt --prompt 'def fib(n):'")
    echo(f"  llmclock trace --ckpt {run}/ckpt --prompt 'def ' --prompt 'class ' --out {run}/trace-2 "
         "--max-new-tokens 64 --temperature 0.8 --seed 1")
    echo(f"  llmclock replay {trace['jsonl']}     # re-run the traced sample: identical, bit for bit?")
    return run


def trace_one(engine, run: Path, prompt: str, seed: int, echo) -> dict:
    """Trace one sample cycle by cycle into RUN/trace and print where each cycle's time went."""
    from .engine import SamplingParams
    from .trace import Tracer

    with Tracer(engine, top_n=5) as tr:
        engine.complete([prompt], SamplingParams(max_new_tokens=48, temperature=0.8, top_k=40, seed=seed))
    paths = tr.write(run / "trace", tr.header(ckpt=run / "ckpt"))
    echo(f"      one sample ({prompt!r}) on the clock, cycle by cycle:")
    echo("      " + tr.summary().replace("\n", "\n      "))
    return paths
