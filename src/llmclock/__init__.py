"""llmclock: a GPT-2-architecture language model as a clocked machine.

Importing the package is cheap: torch and the optional parts load when used.
"""

__version__ = "0.1.0"

from .errors import LLMClockError  # noqa: E402

__all__ = ["LLMClockError", "__version__"]
