"""The scheduler: which sequences run this cycle, in which slot, and how much of each prompt.

A cycle has a budget of `max_batched_tokens` tokens, as in vLLM: every running sequence whose
prompt is in the cache ticks (one token each); what is left goes to prompts, first to those
already partly prefilled, then to waiting sequences admitted first come, first served into the
lowest free slot. A prompt longer than what is left is prefilled in chunks over several cycles
(chunked prefill), so admitting sequences never stalls the running ones for more than one
budget's worth of prompt tokens.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from .sequence import SeqState, Sequence


@dataclass
class Chunk:
    """Prompt positions start..end of `seq` to prefill this cycle."""

    seq: Sequence
    start: int
    end: int

    @property
    def last(self) -> bool:
        """This chunk ends the prompt: its last row's logits give the sequence's first token."""
        return self.end == len(self.seq.prompt_ids)


@dataclass
class Schedule:
    """What one cycle runs: prompt chunks (one packed forward) and the sequences that tick (slot order)."""

    prefill: list[Chunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """'prefill', 'tick' or 'prefill+tick' (both in one cycle)."""
        return "+".join(k for k, work in (("prefill", self.prefill), ("tick", self.decode)) if work)

    @property
    def slots(self) -> list[int]:
        return [c.seq.slot for c in self.prefill] + [s.slot for s in self.decode]


class Scheduler:
    def __init__(self, slots: int, max_batched_tokens: int):
        self.free = list(range(slots))
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence (prefilling or decoding)
        self.max_batched_tokens = max_batched_tokens
        self._admissions = itertools.count()  # admission order, for fair chunking

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        out = Schedule()
        prefilling = []
        for slot in sorted(self.running):
            s = self.running[slot]
            (out.decode if s.in_cache else prefilling).append(s)
        budget = self.max_batched_tokens - len(out.decode)
        prefilling.sort(key=lambda s: s.admitted)
        for s in prefilling:
            if budget <= 0:
                break
            out.prefill.append(Chunk(s, s.prefilled, min(len(s.prompt_ids), s.prefilled + budget)))
            budget -= out.prefill[-1].end - out.prefill[-1].start
        while self.waiting and self.free and budget > 0:
            s = self.waiting.popleft()
            s.slot, s.state, s.admitted = self.free.pop(0), SeqState.RUNNING, next(self._admissions)
            self.running[s.slot] = s
            out.prefill.append(Chunk(s, 0, min(len(s.prompt_ids), budget)))
            budget -= out.prefill[-1].end
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.state, seq.finish_reason = SeqState.FINISHED, reason
        del self.running[seq.slot]
        self.free.append(seq.slot)
        self.free.sort()

    def drop_waiting(self, request_id: str) -> None:
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
