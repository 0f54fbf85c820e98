"""Will it fit? Estimates of what training and evaluation allocate, checked before they allocate it.

A request that cannot fit (a --batch-size of a million) is refused with the estimate, instead of
being killed by the kernel's OOM killer half-way or asking numpy for 48 GiB. The estimates are
deliberately rough upper-ish bounds of the big buffers; they only have to be right to within a
factor of two to tell "fits" from "absurd".
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LLMClockError

GiB = 2**30


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, if it has one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_bytes(device=None) -> int:
    """Memory this process can still allocate on `device` (a torch.device or None for the CPU)."""
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not POSIX: no way to tell, so no refusal
            return 2**62
    cg = _cgroup_free()
    return min(free, cg) if cg is not None else free


def train_bytes(model_config, cfg) -> int:
    """Training with TrainConfig `cfg`: weights, gradients and AdamW moments (16 bytes a parameter),
    one micro-batch's activations (per token and layer about 16 residual-width vectors and a row of
    attention weights per head; the logits with their gradient), all fp32, and the fixed
    validation and test windows (int64)."""
    c = model_config
    params = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * 12 * c.n_embd**2
    tokens = cfg.batch_size * cfg.block_size
    per_token = c.n_layer * (16 * c.n_embd + c.n_head * cfg.block_size) + 3 * c.vocab_size + 4 * c.n_embd
    windows = 2 * 3 * 8 * cfg.eval_batches * cfg.batch_size * (cfg.block_size + 1)
    return 16 * params + 4 * tokens * per_token + windows


def eval_bytes(model_config, rows: int, chunk: int, block_size: int) -> int:
    """The fixed evaluation windows (int64 inputs and targets, and the index that builds them) plus
    one forward of `chunk` rows (activations and logits)."""
    c = model_config
    windows = 3 * 8 * rows * (block_size + 1)
    forward = 4 * chunk * block_size * (6 * c.n_embd + c.n_head * block_size + 2 * c.vocab_size)
    return windows + forward


def check_fits(need: int, what: str, hint: str, device=None) -> None:
    """Raise LLMClockError naming `what` and its estimate when `need` exceeds the memory available."""
    have = available_bytes(device)
    if need > have:
        where = "GPU memory" if device is not None and getattr(device, "type", "cpu") == "cuda" else "memory"
        raise LLMClockError(
            f"{what} needs about {need / GiB:,.1f} GiB but {have / GiB:,.1f} GiB of {where} is available; {hint}"
        )
