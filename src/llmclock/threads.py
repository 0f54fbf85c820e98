"""CPU runtime policy for compute-bound commands: OpenMP threads, and malloc's handling of freed memory.

A training step on a small model is hundreds of short OpenMP-parallel ops. With libgomp's default
policy the worker threads go to sleep between ops and are woken for the next one; on a 2-core
machine that wake-up dominates short ops. Spinning threads (OMP_WAIT_POLICY=ACTIVE) measured a
step of the nanoGPT CPU recipe at 46 ms instead of 63 ms here. It burns the cores while waiting —
also while the process itself waits on something else, once its threads have started — so it is
only right for a dedicated job: `llmclock train` and `llmclock demo` ask for it unless
the user already chose a policy; on a shared machine set OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import ctypes
import os
import sys


def prefer_spinning_threads() -> bool:
    """Set OMP_WAIT_POLICY=ACTIVE unless the user set a policy or OpenMP is already loaded.

    Returns whether it was set. Must run before torch is imported to take effect.
    """
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    return True


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    A training step frees and allocates tens of MB of activations and gradients. By default glibc
    serves big blocks with fresh mmaps and trims the heap's free top, so every step page-faults
    its memory in again (750-4,200 faults a step for the bench's model, measured here) and the
    kernel zeroes each page; with blocks up to 32 MB from the heap and no trimming, a step of the
    nanoGPT CPU recipe had no faults and took 40-48 ms instead of 50-64 (two processes, alternating).
    The process keeps its peak memory until it exits, which a training job reaches every step
    anyway. A no-op (False) off glibc, or when the user set malloc's tunables (MALLOC_TRIM_THRESHOLD_,
    MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES) themselves.
    """
    if not sys.platform.startswith("linux"):
        return False
    if any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
