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
