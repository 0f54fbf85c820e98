"""The command line: one table from subcommand to a typed function.

Each subcommand is an `add_<name>(sub)` function that registers its parser (flags typed and
checked by `options`) and sets `fn`, the function that runs it. Every user-facing problem is an
LLMClockError, printed as one `llmclock: error: ...` line with a non-zero exit; Ctrl-C at any
moment ends with one line and exit 130.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import LLMClockError
from . import apps_cmds, compress_cmds, engine_cmds, hf_cmds, serve_cmds, train_cmds
from .common import printable

COMMANDS = [
    train_cmds.add_demo,
    train_cmds.add_tokenizer,
    train_cmds.add_prepare,
    train_cmds.add_train,
    apps_cmds.add_eval,
    apps_cmds.add_finetune,
    apps_cmds.add_merge,
    apps_cmds.add_data,
    apps_cmds.add_summarize,
    engine_cmds.add_generate,
    engine_cmds.add_chat,
    engine_cmds.add_trace,
    engine_cmds.add_replay,
    hf_cmds.add_import_hf,
    hf_cmds.add_export_hf,
    serve_cmds.add_serve,
    compress_cmds.add_compress,
]
"""Subcommands in `llmclock --help` order: each registers its parser on the subparsers object."""

SPINNING_COMMANDS = ("train", "demo", "finetune")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one `llmclock: error:` line (exit 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"llmclock: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    ap = Parser(prog="llmclock", description="A GPT-2-architecture model as a clocked machine.")
    ap.add_argument("--version", action="version", version=f"llmclock {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return ap


def _line(message: str, *, own_line: bool = False) -> None:
    """One line on stderr; `own_line` starts it on a fresh terminal line (after a ^C mid-output)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    sys.stderr.write(("\n" if own_line and sys.stderr.isatty() else "") + printable(message) + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status: 0, 1 (an error), 2 (a usage error) or 130 (interrupted)."""
    try:
        return _run(argv)
    except KeyboardInterrupt as e:  # also while the parser or a lazy import was running
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the message
        _line(f"llmclock: interrupted{': ' + str(e) if e.args else ''}", own_line=True)
        return 130


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 0
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc` runs them again on each rank
    if args.command in SPINNING_COMMANDS:
        from ..threads import prefer_spinning_threads

        prefer_spinning_threads()
    try:
        return args.fn(args) or 0
    except LLMClockError as e:
        _line(f"llmclock: error: {e}")
        return 1
    except BrokenPipeError:  # `llmclock generate ... | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 0
    except MemoryError:
        _line("llmclock: error: out of memory (try a smaller --batch-size, --block-size or model)")
        return 1
    except OSError as e:  # disk full, permissions, ...: one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        _line(f"llmclock: error: {where}{e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a bug: still one line (the traceback with LLMCLOCK_TRACEBACK=1)
        if os.environ.get("LLMCLOCK_TRACEBACK"):
            raise
        _line(f"llmclock: error: internal error, please report it: {type(e).__name__}: {e} "
              "(LLMCLOCK_TRACEBACK=1 shows where)")
        return 1
