"""The scheduler: which sequences run this cycle, and in which slot.

Admission is first come, first served into the lowest free slot. A cycle either prefills the
newly admitted sequences or ticks every running one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .sequence import SeqState, Sequence


@dataclass
class Schedule:
    """What one cycle runs: `kind` is 'prefill' (seqs just admitted) or 'tick' (every running seq)."""

    kind: str
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, slots: int):
        self.free = list(range(slots))
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        if self.waiting and self.free:
            seqs = []
            while self.waiting and self.free:
                seq = self.waiting.popleft()
                seq.slot, seq.state = self.free.pop(0), SeqState.RUNNING
                self.running[seq.slot] = seq
                seqs.append(seq)
            return Schedule("prefill", seqs)
        return Schedule("tick", [self.running[slot] for slot in sorted(self.running)])

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.state, seq.finish_reason = SeqState.FINISHED, reason
        del self.running[seq.slot]
        self.free.append(seq.slot)
        self.free.sort()

    def drop_waiting(self, request_id: str) -> None:
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
