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

__all__ = ["SamplingParams", "TokenCounts", "apply_bias_and_penalties", "draw", "filter_logits"]


class TokenCounts:
    """Per-slot token counts for the penalties: prompt + output (`seen`) and output only (`generated`).

    (slots, V) int32 each, allocated on the first sequence that needs them; a slot's rows are
    reset when a sequence is admitted into it and bumped for a whole cycle's tokens in one op.
    """

    def __init__(self, slots: int, vocab_size: int, device):
        self.shape, self.device = (slots, vocab_size), device
        self.seen: torch.Tensor | None = None
        self.generated: torch.Tensor | None = None

    def admit(self, slot: int, prompt_ids: list[int]) -> None:
        if self.seen is None:
            self.seen = torch.zeros(self.shape, dtype=torch.int32, device=self.device)
            self.generated = torch.zeros(self.shape, dtype=torch.int32, device=self.device)
        self.seen[slot] = torch.bincount(torch.tensor(prompt_ids), minlength=self.shape[1])
        self.generated[slot] = 0

    def add(self, slots: list[int], tokens: torch.Tensor) -> None:
        """Count one new token per row: the rows' slots, tokens (n,)."""
        if self.seen is not None:
            at, ones = torch.tensor(slots, device=self.device), torch.ones_like(tokens, dtype=torch.int32)
            self.seen.index_put_((at, tokens), ones, accumulate=True)
            self.generated.index_put_((at, tokens), ones, accumulate=True)


def apply_bias_and_penalties(logits: torch.Tensor, params: list[SamplingParams], slots: list[int],
                             counts: TokenCounts) -> torch.Tensor:
    """Logit bias, then repetition / presence / frequency penalties, for all rows at once: (n, V) -> (n, V).

    Rows without these settings pass through unchanged (the input itself when no row has any)."""
    bias = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items()]
    pen = [i for i, p in enumerate(params) if p.needs_counts]
    if not bias and not pen:
        return logits
    logits = logits.clone()
    dev = logits.device
    if bias:
        rows, ids, vals = zip(*bias)
        logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
                          torch.tensor(vals, device=dev, dtype=logits.dtype), accumulate=True)
    if pen:
        idx = torch.tensor(pen, device=dev)
        at = torch.tensor([slots[i] for i in pen], device=dev)
        seen, gen = counts.seen[at], counts.generated[at].to(logits.dtype)  # (m, V)
        col = lambda name: torch.tensor([getattr(params[i], name) for i in pen], device=dev,  # noqa: E731
                                        dtype=logits.dtype)[:, None]  # (m, 1)
        x, rep = logits[idx], col("repetition_penalty")
        x = torch.where(seen > 0, torch.where(x > 0, x / rep, x * rep), x)  # CTRL / HF
        x = x - (col("frequency_penalty") * gen + col("presence_penalty") * (gen > 0).to(x.dtype))  # OpenAI
        logits[idx] = x
    return logits


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
    draw and needs one random vector per row from that row's own generator (so a sequence's
    tokens do not depend on what else runs); the rest is one batched pass.
    """
    out = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        probs = logits[rows].float().softmax(-1)  # (m, V)
        e = torch.empty_like(probs)
        for j, i in enumerate(rows):
            e[j].exponential_(1.0, generator=generators[i])
        out[rows] = (probs / e).argmax(-1)
    return out
