"""Sequence state: one request's prompt, settings and output as it moves WAITING -> RUNNING -> FINISHED,
and what the engine hands back (one Event per sequence per cycle, a Completion at the end)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .detok import Detokenizer, StopMatcher
from .sampler import SamplingParams


class SeqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    state: SeqState = SeqState.WAITING
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    seed: int | None = None
    """The seed this sequence sampled with (drawn at random when the params gave none)."""
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    stopper: StopMatcher | None = None
    prefilled: int = 0
    """Prompt tokens already in the cache (a long prompt is prefilled over several cycles)."""
    admitted: int = -1
    """Admission order (-1 while waiting)."""

    @property
    def in_cache(self) -> bool:
        """The whole prompt is prefilled: the sequence ticks."""
        return self.prefilled == len(self.prompt_ids)

    @property
    def position(self) -> int:
        """Position of the next token fed to the model (the last one sampled)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


@dataclass
class Event:
    """One sequence's output in one clock cycle."""

    request_id: str
    cycle: int
    slot: int
    position: int
    """Position the new token will occupy in the sequence."""
    token_id: int
    text: str
    """Text released this cycle (may be empty while a character or a possible stop string is pending)."""
    logprob: float
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    """None while running; 'stop' (end-of-text, stop token or string) or 'length' when done."""


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]
