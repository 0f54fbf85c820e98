"""llmclock: a GPT-2-architecture language model as a clocked machine.

Importing the package is cheap: torch and the optional parts load when used.
"""

import os as _os
import signal as _signal
import sys as _sys

__version__ = "0.1.0"


def _starting_command_line() -> bool:
    """True while this import is the `llmclock` command starting (`llmclock ...`, `python -m llmclock ...`)."""
    argv = getattr(_sys, "orig_argv", [])
    by_module = "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "llmclock"
    return by_module or _os.path.basename(_sys.argv[0] if _sys.argv else "") == "llmclock"


def _interrupted_while_starting(signum, frame) -> None:
    _os.write(2, b"llmclock: interrupted\n")
    _os._exit(130)


# Ctrl-C before the command's own handler is in place (llmclock.__main__.run restores Python's)
# is one line and exit 130 too, not a traceback from the middle of an import.
if _starting_command_line() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)

from .errors import LLMClockError  # noqa: E402

__all__ = ["LLMClockError", "__version__"]
