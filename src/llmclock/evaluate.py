"""Evaluation: loss, perplexity, bits per token and next-token accuracy on fixed batches."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, x: np.ndarray, y: np.ndarray, *, device, chunk: int, dist=None, autocast=None) -> dict:
    """Mean loss, perplexity and next-token accuracy over (N, T) batches, split across DDP ranks."""
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
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
    if world > 1:
        import torch.distributed as tdist

        t = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        loss_sum, correct, count = t.tolist()
    model.train(was_training)
    loss = loss_sum / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": correct / count, "bits_per_token": loss / math.log(2)}


def evaluate_checkpoint(model, data, split: str, *, batch_size: int, block_size: int | None, batches: int, seed: int) -> dict:
    """Evaluate a loaded model on `batches` fixed batches of a prepared split."""
    from .data import eval_batches
    from .errors import LLMClockError

    block_size = block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise LLMClockError(f"block size {block_size} is larger than the model's context ({model.config.block_size})")
    if data.vocab_size > model.config.vocab_size:
        raise LLMClockError(f"data has {data.vocab_size} token ids but the model only {model.config.vocab_size}")
    if not data.num_tokens(split):
        raise LLMClockError(f"split {split!r} is empty in this data directory")
    x, y = eval_batches(data.tokens(split), batch_size, block_size, batches, seed)
    device = next(model.parameters()).device
    return evaluate(model, x, y, device=device, chunk=batch_size)
