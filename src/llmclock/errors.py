"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class LLMClockError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint), stated in one line."""
