"""CPU threading policy for compute-bound commands.

A training step on a small model is hundreds of short OpenMP-parallel ops. With libgomp's default
policy the worker threads go to sleep between ops and are woken for the next one; on a 2-core
machine that wake-up dominates short ops. Spinning threads (OMP_WAIT_POLICY=ACTIVE) measured a
step of the nanoGPT CPU recipe at 46 ms instead of 63 ms here. It burns the cores while waiting —
also while the process itself waits on something else, once its threads have started — so it is
only right for a dedicated job: `llmclock train` and `llmclock demo` ask for it unless
the user already chose a policy; on a shared machine set OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import os
import sys


def prefer_spinning_threads() -> bool:
    """Set OMP_WAIT_POLICY=ACTIVE unless the user set a policy or OpenMP is already loaded.

    Returns whether it was set. Must run before torch is imported to take effect.
    """
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    os.environ["LLMCLOCK_SET_OMP_WAIT_POLICY"] = "1"  # so child processes can tell it was ours
    return True
