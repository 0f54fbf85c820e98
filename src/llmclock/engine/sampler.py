"""Sampling: per-sequence settings, applied to a batch of logits in one pass.

Order (as in Hugging Face / vLLM): logit bias -> repetition / presence / frequency penalties ->
temperature -> top-k -> top-p -> min-p -> draw. Reported logprobs are the model's own
distribution (log-softmax of the raw logits), like vLLM's default, so they do not depend on the
sampler settings. Each sequence draws from its own seeded generator, so its tokens do not depend
on what else is in the batch.
"""

from __future__ import annotations

import torch

from ..config import SamplingParams  # the settings live with the other configs (the CLI builds its flags from them)

__all__ = ["SamplingParams", "apply_penalties", "draw", "filter_logits"]


def apply_penalties(row: torch.Tensor, p: SamplingParams, seen: torch.Tensor, generated: torch.Tensor) -> None:
    """In place on one row of logits (V,). seen / generated: counts in prompt+output / output only."""
    if p.repetition_penalty != 1.0:
        mask = seen > 0
        vals = row[mask]
        row[mask] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.frequency_penalty or p.presence_penalty:
        g = generated.to(row.dtype)
        row -= p.frequency_penalty * g + p.presence_penalty * (g > 0).to(row.dtype)


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for a batch of rows at once: (B, V) -> (B, V) scaled logits."""
    B, V = logits.shape
    dev = logits.device
    temp = torch.tensor([p.temperature or 1.0 for p in params], device=dev, dtype=logits.dtype)
    logits = logits / temp[:, None]
    if all(p.top_k == 0 and p.top_p >= 1.0 and p.min_p <= 0.0 for p in params):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(V, device=dev)[None, :]
    k = torch.tensor([p.top_k or V for p in params], device=dev)
    remove = ranks >= k[:, None]
    probs = sorted_logits.softmax(-1)
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=probs.dtype)
    cum_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    remove |= cum_before >= top_p[:, None]
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=probs.dtype)
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row: argmax for greedy rows, else a draw from softmax(logits) with the row's generator.

    Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), which equals a multinomial
    draw and needs one random vector per row from that row's own generator.
    """
    out = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = logits[i].float().softmax(-1)
        e = torch.empty_like(probs).exponential_(1.0, generator=generators[i])
        out[i] = (probs / e).argmax()
    return out

