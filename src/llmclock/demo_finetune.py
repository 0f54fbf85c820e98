"""The demo's second act (`llmclock demo --finetune-minutes M`): LoRA-fine-tune the demo model on
the docstring summarization task built from the same standard library, and show ROUGE-L on the
test split before and after, with three summaries next to their references."""

from __future__ import annotations

from pathlib import Path


def second_act(run: Path, *, sources: list[str] | None, minutes: float, seed: int, echo, test_examples: int = 100) -> dict:
    """Build RUN/docstrings, fine-tune RUN/ckpt with LoRA into RUN/lora; {'before', 'after'} metrics."""
    from .adapters import AdapterConfig, load_adapted
    from .checkpoint import load_checkpoint
    from .config import TrainConfig
    from .docstrings import build, load_split, score
    from .finetune import finetune

    base = run / "ckpt"
    model, tok = load_checkpoint(base)
    context = model.config.block_size
    # sources that fit the context with room for the summary (~3.5 characters per BPE token of code)
    max_chars = max(200, int((context - 24) * 3.5))
    echo(f"[6/7] second act: the docstring summarization task (functions up to {max_chars} characters)")
    m = build(run / "docstrings", sources=sources, max_chars=max_chars)
    echo("      " + ", ".join(f"{s} {v['examples']} examples / {v['modules']} modules" for s, v in m["splits"].items()))
    split = "test" if m["splits"]["test"]["examples"] else "val"
    rows = load_split(run / "docstrings", split, limit=test_examples)
    if not rows or not m["splits"]["train"]["examples"]:
        echo("      (too few documented functions in this corpus slice for the second act; skipped)")
        return {}
    before, _ = score(model, tok, rows, max_new_tokens=24)
    echo(f"      before: ROUGE-L {before['rougeL']:.1f}  BLEU {before['bleu']:.1f} on {len(rows)} {split} examples")
    echo(f"[7/7] LoRA fine-tuning for ~{minutes:g} min (rank 16 on every attention and MLP projection)")
    recipe = TrainConfig(max_steps=100_000, max_seconds=minutes * 60, batch_size=16, block_size=context,
                         learning_rate=2e-3, min_lr=2e-3, warmup_steps=20, weight_decay=0.0, eval_interval=0,
                         seed=seed, device="cpu")
    r = finetune(base, run / "docstrings" / "train.jsonl", run / "lora", recipe,
                 AdapterConfig(method="lora", r=16, alpha=32), template=None)
    echo(f"      {r.step} steps, {r.tokens_per_s:,.0f} tokens/s, trainable {r.trainable:,} of {r.total:,} parameters")
    after, outputs = score(load_adapted(base, r.ckpt, merged=True)[0], tok, rows, max_new_tokens=24)
    echo(f"      after:  ROUGE-L {after['rougeL']:.1f}  BLEU {after['bleu']:.1f}  "
         f"({after['rougeL'] - before['rougeL']:+.1f} ROUGE-L)")
    for row, out in list(zip(rows, outputs))[:3]:
        echo(f"      {row['name']} ({row['module']})")
        echo(f"        reference: {row['reference']}")
        echo(f"        model:     {out}")
    echo(f"      adapter {r.ckpt}; try: llmclock summarize --ckpt {base} --adapter {r.ckpt} FILE.py")
    return {"before": before, "after": after, "adapter": str(r.ckpt)}
