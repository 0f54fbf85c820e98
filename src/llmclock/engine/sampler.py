"""Sampling: per-sequence settings, applied to a batch of logits in one pass.

Order (as in Hugging Face / vLLM): logit bias -> repetition / presence / frequency penalties ->
temperature -> top-k -> top-p -> min-p -> draw. Reported logprobs are the model's own
distribution (log-softmax of the raw logits), like vLLM's default, so they do not depend on the
sampler settings. Each sequence draws from its own seeded generator, so its tokens do not depend
on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LLMClockError


@dataclass
class SamplingParams:
    """How one sequence picks its tokens. Defaults follow OpenAI's API (temperature 1, no cut-offs)."""

    max_new_tokens: int = 64
    """Tokens to generate at most (the prompt not counted)."""
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Keep the smallest set whose probability reaches p; 1 = off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's; 0 = off."""
    repetition_penalty: float = 1.0
    """CTRL / HF penalty on every token already in prompt or output (>1 discourages); 1 = off."""
    presence_penalty: float = 0.0
    """OpenAI: subtracted once from tokens already generated."""
    frequency_penalty: float = 0.0
    """OpenAI: subtracted per occurrence of tokens already generated."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of the given token ids."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; matched across token boundaries and not included in the text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (in addition to end-of-text unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep going past <|endoftext|>."""
    seed: int | None = None
    """Seeds this sequence's own generator: same seed, same tokens, whatever else runs."""
    logprobs: int = 0
    """Also return the top-N alternatives (and their logprobs) per token; 0 = only the chosen one."""

    def __post_init__(self) -> None:
        def bad(msg: str) -> LLMClockError:
            return LLMClockError(f"sampling: {msg}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2.0 <= v <= 2.0):
                raise bad(f"{name} must be in [-2, 2], got {v!r}")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20:
            raise bad(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop strings must be non-empty strings")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise bad(f"seed must be a non-negative integer, got {self.seed!r}")
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        for t in list(self.logit_bias) + list(self.stop_token_ids):
            if not 0 <= t < vocab_size:
                raise LLMClockError(f"sampling: token id {t} is outside the vocabulary (0..{vocab_size - 1})")

    @property
    def needs_counts(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


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

