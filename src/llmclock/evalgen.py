"""Generation evaluation: prompts from a JSONL file, completions batched on the engine's slots,
scored against references with the field's own scorers (sacrebleu's BLEU and chrF,
rouge-score's ROUGE-1/2/L) and exact match. Nothing here re-implements a metric.

Each line: {"prompt" or "input": str, "reference": str or "references": [str, ...]}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import LLMClockError
from .records import field, read_jsonl


@dataclass
class GenExample:
    prompt: str
    references: list[str]


def load_examples(path: str | Path, *, limit: int | None = None) -> list[GenExample]:
    """The examples of a JSONL evaluation set, every line checked (file:line in each error)."""
    out = []
    for lineno, obj in read_jsonl(path):
        prompt = field(path, lineno, obj, "prompt", "input")
        refs = field(path, lineno, obj, "references", "reference", kind=(str, list))
        refs = [refs] if isinstance(refs, str) else refs
        if not refs or not all(isinstance(r, str) for r in refs):
            raise LLMClockError(f"{path}:{lineno}: 'references' must be a non-empty list of strings")
        out.append(GenExample(prompt, refs))
        if limit is not None and len(out) >= limit:
            break
    return out


def generation_metrics(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU and chrF (sacrebleu), mean ROUGE-1/2/L F1 (rouge-score, best reference, with
    stemming), exact match after stripping whitespace; all on a 0-100 scale."""
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise LLMClockError(f"generation metrics need the 'eval' extra: pip install 'llmclock[eval]' ({e})") from None
    if len(hypotheses) != len(references) or not hypotheses:
        raise LLMClockError("generation metrics: need one list of references per hypothesis, and at least one")
    # sacrebleu takes reference *streams*; examples with fewer references are padded with None.
    n_refs = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(n_refs)]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, refs in zip(hypotheses, references):
        scores = scorer.score_multi(refs, hyp)
        for k in rouge:
            rouge[k] += scores[k].fmeasure
    n = len(hypotheses)
    exact = sum(any(h.strip() == r.strip() for r in refs) for h, refs in zip(hypotheses, references))
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, streams).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, streams).score,
        **{k: 100.0 * v / n for k, v in rouge.items()},
        "exact_match": 100.0 * exact / n,
        "examples": n,
    }


def generate_all(engine, prompts: list[str], params, *, progress=None) -> list[str]:
    """Complete every prompt on the engine, as many at once as it has slots; texts in prompt order.

    A prompt too long for the context keeps its last tokens, leaving room for max_new_tokens.
    `progress(k)` is called as each of the k-th completion finishes.
    """
    keep = engine.max_len - params.max_new_tokens
    if keep < 1:
        raise LLMClockError(
            f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the context ({engine.max_len})"
        )
    ids = [engine.tokenizer.encode(p)[-keep:] for p in prompts]
    if any(not i for i in ids):
        raise LLMClockError("an evaluation prompt is empty")
    seqs = [engine.add(i, params) for i in ids]
    done = 0
    while engine.has_work():
        for ev in engine.step():
            if ev.finish_reason is not None:
                done += 1
                if progress is not None:
                    progress(done)
    return [s.text for s in seqs]


def evaluate_generation(engine, examples: list[GenExample], params, *, progress=None) -> tuple[dict, list[dict]]:
    """(metrics, per-example rows {prompt, references, output})."""
    outputs = generate_all(engine, [e.prompt for e in examples], params, progress=progress)
    metrics = generation_metrics(outputs, [e.references for e in examples])
    rows = [{"prompt": e.prompt, "references": e.references, "output": o} for e, o in zip(examples, outputs)]
    return metrics, rows
