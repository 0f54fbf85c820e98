"""The registers: a preallocated KV cache of `slots` sequences, written by position.

One tensor per layer of shape (slots, n_head, max_len, head_size) for keys and one for values,
allocated once. A tick writes one position per slot in place; nothing is concatenated, and a
freed slot is simply overwritten by the next sequence's prefill.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, slots: int, n_head: int, max_len: int, head_size: int, *, dtype, device):
        shape = (slots, n_head, max_len, head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.slots, self.max_len = slots, max_len
        self.lengths = [0] * slots  # positions filled per slot
        self._bytes_per_position = 2 * n_layer * n_head * head_size * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole cache."""
        return self._bytes_per_position * self.slots * self.max_len

    def bytes_in_use(self, slot: int | None = None) -> int:
        """Bytes holding live keys/values (one slot, or all)."""
        n = self.lengths[slot] if slot is not None else sum(self.lengths)
        return self._bytes_per_position * n

    def prefill_views(self, slot: int, start: int, length: int) -> list["SlotView"]:
        """Per-layer cache views that write positions start..start+length of one slot."""
        return [SlotView(self.k[i], self.v[i], slot, start, length) for i in range(len(self.k))]


class SlotView:
    """What the model's attention sees during a prefill: `update` writes, then returns the history."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slot: int, start: int, length: int):
        self.k, self.v, self.slot, self.start, self.end = k, v, slot, start, start + length

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (1, nh, T, hs) -> cache[slot, :, start:end]
        s = self.slot
        self.k[s : s + 1, :, self.start : self.end] = k
        self.v[s : s + 1, :, self.start : self.end] = v
        return self.k[s : s + 1, :, : self.end], self.v[s : s + 1, :, : self.end]  # (1, nh, end, hs)
