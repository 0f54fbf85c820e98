"""Language-model evaluation: loss, perplexity, bits per token and per byte, next-token accuracy.

On a prepared split (fixed random windows, as training's evaluations) or on any text: each
document is scored whole, preceded by <|endoftext|> so that its first token is predicted too,
with a sliding window where it is longer than the context (Hugging Face's perplexity guide:
windows of `block_size` tokens advancing by `stride`, each scoring only the tokens the previous
window did not). Bits per byte divide the summed loss (in bits) by the UTF-8 bytes the scored
tokens stand for, so models with different tokenizers compare.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import LLMClockError


def _summary(loss_sum: float, correct: float, count: float, n_bytes: float | None) -> dict:
    loss = loss_sum / count
    r = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": correct / count, "bits_per_token": loss / math.log(2),
         "tokens": int(count)}
    if n_bytes:
        r["bits_per_byte"] = loss_sum / math.log(2) / n_bytes
        r["bytes"] = int(n_bytes)
    return r


@torch.no_grad()
def evaluate(model, x: np.ndarray, y: np.ndarray, *, device, chunk: int, dist=None, autocast=None,
             token_bytes: np.ndarray | None = None) -> dict:
    """Mean loss, perplexity and next-token accuracy over (N, T) batches, split across DDP ranks.

    With `token_bytes` (bytes per token id, see `token_byte_lengths`) also bits per byte.
    """
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    was_training = model.training
    model.eval()
    loss_sum = correct = count = n_bytes = 0.0
    for i in range(rank * chunk, len(x), chunk * world):
        xb = torch.from_numpy(x[i : i + chunk]).to(device)
        yb = torch.from_numpy(y[i : i + chunk]).to(device)
        if autocast is not None:
            with autocast():
                logits, _ = model(xb)
        else:
            logits, _ = model(xb)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits.view(-1, logits.size(-1)), yb.view(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == yb).sum().item()
        count += yb.numel()
        if token_bytes is not None:
            n_bytes += float(token_bytes[y[i : i + chunk]].sum())
    if world > 1:
        import torch.distributed as tdist

        t = torch.tensor([loss_sum, correct, count, n_bytes], dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        loss_sum, correct, count, n_bytes = t.tolist()
    model.train(was_training)
    return _summary(loss_sum, correct, count, n_bytes if token_bytes is not None else None)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """(V,) the number of UTF-8 bytes each token id stands for; 0 for <|endoftext|>.

    Byte-level BPE entries spell one byte per character (GPT-2's byte-to-unicode map); a
    char-level entry is its character's UTF-8 encoding.
    """
    out = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if i == tokenizer.eot_id:
            continue
        token = tokenizer.id_to_token(i)
        out[i] = len(token) if tokenizer.kind == "bpe" else len(token.encode("utf-8"))
    return out


def evaluate_checkpoint(model, data, split: str, *, batch_size: int, block_size: int | None, batches: int, seed: int,
                        tokenizer=None) -> dict:
    """Evaluate a loaded model on `batches` fixed batches of a prepared split (bits per byte
    too when the data's `tokenizer` is given)."""
    from .data import eval_batches

    block_size = _check_block(model, block_size)
    if data.vocab_size > model.config.vocab_size:
        raise LLMClockError(f"data has {data.vocab_size} token ids but the model only {model.config.vocab_size}")
    if not data.num_tokens(split):
        raise LLMClockError(f"split {split!r} is empty in this data directory")
    x, y = eval_batches(data.tokens(split), batch_size, block_size, batches, seed, split=split)
    device = next(model.parameters()).device
    tb = token_byte_lengths(tokenizer) if tokenizer is not None else None
    return evaluate(model, x, y, device=device, chunk=batch_size, token_bytes=tb)


def _check_block(model, block_size: int | None) -> int:
    block_size = block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise LLMClockError(f"block size {block_size} is larger than the model's context ({model.config.block_size})")
    return block_size


def sliding_windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of n + 1 tokens (position 0 is the <|endoftext|> in front) that score
    each of the n targets exactly once: (start, end, first scored target) with inputs
    stream[start:end], targets stream[start+1:end+1], the first `scored - start` of them context only.
    """
    if not 1 <= stride <= block_size:
        raise LLMClockError(f"stride must be between 1 and the block size ({block_size}), got {stride}")
    out, done, start = [], 0, 0
    while done < n:
        end = min(start + block_size, n)
        out.append((start, end, done))
        done, start = end, start + stride  # stride <= block_size: the next window reaches past `done`
    return out


@torch.no_grad()
def evaluate_texts(model, tokenizer, texts: list[str], *, block_size: int | None = None, stride: int | None = None,
                   batch_size: int = 8, progress=None) -> dict:
    """Loss, perplexity, accuracy and bits per byte of `texts`, each scored whole (sliding windows
    of `block_size` tokens moving by `stride`, default block_size: no overlap). `progress(n)` is
    called with the number of documents done."""
    block_size = _check_block(model, block_size)
    stride = stride or block_size
    device = next(model.parameters()).device
    tb = token_byte_lengths(tokenizer)
    was_training = model.training
    model.eval()
    loss_sum = correct = count = n_bytes = 0.0
    pending: list[tuple[list[int], int]] = []  # (window tokens incl. the next target, context-only targets)

    def flush() -> None:
        nonlocal loss_sum, correct, count, n_bytes
        T = max(len(w) for w, _ in pending) - 1
        x = torch.zeros(len(pending), T, dtype=torch.long)
        y = torch.full((len(pending), T), -1, dtype=torch.long)
        for row, (w, skip) in enumerate(pending):
            x[row, : len(w) - 1] = torch.tensor(w[:-1])
            y[row, skip : len(w) - 1] = torch.tensor(w[skip + 1 :])
        logits, _ = model(x.to(device))  # (B, T, V)
        logits = logits.float().cpu()
        keep = y >= 0
        loss_sum += F.cross_entropy(logits[keep], y[keep], reduction="sum").item()
        correct += (logits[keep].argmax(-1) == y[keep]).sum().item()
        count += int(keep.sum())
        n_bytes += float(tb[y[keep].numpy()].sum())
        pending.clear()

    for d, ids in enumerate(tokenizer.encode_batch(texts)):
        stream = [tokenizer.eot_id] + ids
        for start, end, done in sliding_windows(len(ids), block_size, stride):
            pending.append((stream[start : end + 1], done - start))
            if len(pending) == batch_size:
                flush()
        if progress is not None:
            progress(d + 1)
    if pending:
        flush()
    model.train(was_training)
    if not count:
        raise LLMClockError("no tokens to evaluate (the texts are empty)")
    return _summary(loss_sum, correct, count, n_bytes)


def read_texts(sources: list[str], *, text_field: str = "text") -> list[str]:
    """Documents of text files, directories, globs or .jsonl (`text_field`), one per file or line."""
    from .corpus import iter_sources

    return [text for _, text in iter_sources(sources, text_field=text_field)]


LM_KEYS = ("bits_per_byte", "loss", "ppl", "bits_per_token", "acc", "tokens")
GEN_KEYS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "examples")


def format_lines(results: dict[str, dict]) -> str:
    """{section: metrics} of one model -> one line per section, e.g. `val: loss 1.2345  ppl 3.44 ...`."""
    labels = {"loss": "loss", "ppl": "ppl", "acc": "next-token acc", "bits_per_token": "bits/token",
              "bits_per_byte": "bits/byte", "tokens": "tokens", "bleu": "BLEU", "chrf": "chrF", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2",
              "rougeL": "ROUGE-L", "exact_match": "exact match", "examples": "examples"}
    lines = []
    for section, r in results.items():
        cells = [f"{labels[k]} {r[k]:,}" if isinstance(r[k], int) else f"{labels[k]} {r[k]:.4f}"
                 for k in labels if k in r]
        lines.append(f"{section}: " + "  ".join(cells))
    return "\n".join(lines)


def format_table(results: dict[str, dict[str, dict]], *, bpb_first: bool = False) -> str:
    """{model name: {section: {metric: value}}} -> an aligned text table, one column per model."""
    names = list(results)
    rows: list[tuple[str, list[str]]] = []
    sections = list(dict.fromkeys(s for r in results.values() for s in r))
    for section in sections:
        keys = [k for k in (*LM_KEYS, *GEN_KEYS) if any(k in results[n].get(section, {}) for n in names)]
        if not bpb_first:
            keys = [k for k in keys if k != "bits_per_byte"] + [k for k in keys if k == "bits_per_byte"]
        for k in keys:
            cells = []
            for n in names:
                v = results[n].get(section, {}).get(k)
                cells.append("-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4f}")
            rows.append((f"{section} {k}", cells))
    w0 = max([len(r[0]) for r in rows] + [6])
    widths = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    lines = ["  ".join(["metric".ljust(w0)] + [n.rjust(w) for n, w in zip(names, widths)])]
    lines += ["  ".join([label.ljust(w0)] + [c.rjust(w) for c, w in zip(cells, widths)]) for label, cells in rows]
    return "\n".join(lines)
