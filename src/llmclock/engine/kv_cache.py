"""The registers: a preallocated KV cache of `slots` sequences, written by position.

One tensor per layer of shape (slots, n_head, max_len, head_size) for keys and one for values,
allocated once (n_head may differ per layer: a model with attention heads pruned). A tick writes
one position per slot in place; a prefill writes a run of positions per slot; nothing grows, and a
freed slot is simply overwritten by its next sequence.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, slots: int, n_head: int | list[int], max_len: int, head_size: int, *, dtype,
                 device):
        heads = [n_head] * n_layer if isinstance(n_head, int) else list(n_head)  # per layer
        assert len(heads) == n_layer, (heads, n_layer)
        self.k = [torch.zeros((slots, nh, max_len, head_size), dtype=dtype, device=device) for nh in heads]
        self.v = [torch.zeros((slots, nh, max_len, head_size), dtype=dtype, device=device) for nh in heads]
        self.slots, self.max_len = slots, max_len
        self.lengths = [0] * slots  # positions filled per slot
        self._bytes_per_position = 2 * sum(heads) * head_size * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole cache."""
        return self._bytes_per_position * self.slots * self.max_len

    def bytes_in_use(self, slot: int | None = None) -> int:
        """Bytes holding live keys/values (one slot, or all)."""
        n = self.lengths[slot] if slot is not None else sum(self.lengths)
        return self._bytes_per_position * n

    def chunk_views(self, chunks: list[tuple[int, int, int]]) -> list[ChunkView]:
        """Per-layer views for one packed prefill forward of (slot, start, end) chunks, in row order."""
        return [ChunkView(self.k[i], self.v[i], chunks) for i in range(len(self.k))]


def chunk_mask(chunks: list[tuple[int, int, int]], device) -> torch.Tensor:
    """(N, S) bool: which keys each packed query may see. Rows are the chunks' new positions in order,
    columns each chunk's whole history 0..end (as ChunkView.update returns them); a query sees its
    own sequence's positions up to its own."""
    q_seq, q_pos, k_seq, k_pos = [], [], [], []
    for j, (_, start, end) in enumerate(chunks):
        q_seq += [j] * (end - start)
        q_pos += range(start, end)
        k_seq += [j] * end
        k_pos += range(end)
    q_seq, q_pos, k_seq, k_pos = (torch.tensor(a, device=device) for a in (q_seq, q_pos, k_seq, k_pos))
    return (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])  # (N, S)


class ChunkView:
    """What the model's attention sees in a packed prefill: `update` writes each chunk's new keys and
    values at its positions, then returns every chunk's history, concatenated along the sequence."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, chunks: list[tuple[int, int, int]]):
        self.k, self.v, self.chunks = k, v, chunks

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (1, nh, N, hs), the chunks' rows in order -> (1, nh, S, hs), S = sum of the chunks' ends
        row = 0
        for slot, start, end in self.chunks:
            self.k[slot, :, start:end] = k[0, :, row : row + end - start]
            self.v[slot, :, start:end] = v[0, :, row : row + end - start]
            row += end - start
        if len(self.chunks) == 1:
            slot, _, end = self.chunks[0]
            return self.k[slot : slot + 1, :, :end], self.v[slot : slot + 1, :, :end]  # views, no copy
        k_all = torch.cat([self.k[slot, :, :end] for slot, _, end in self.chunks], dim=1)  # (nh, S, hs)
        v_all = torch.cat([self.v[slot, :, :end] for slot, _, end in self.chunks], dim=1)
        return k_all.unsqueeze(0), v_all.unsqueeze(0)
