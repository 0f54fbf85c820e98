"""Option types that check a value when it is parsed, and flags made from the config dataclasses.

A type raises argparse.ArgumentTypeError; the parser then prints `llmclock: error: argument
--flag: <why>` and exits 2. `add_config_flags` makes one flag per dataclass field, with the
field's type, its Range, its docstring as help and its default, so a flag accepts exactly what
the field does and no default is written twice.

A new subcommand uses them like this (the real ones: train_cmds.py, engine_cmds.py, hf_cmds.py):

    def add_frob(sub) -> None:
        p = sub.add_parser("frob", help="...")
        p.add_argument("--times", type=integer(1), default=3, help="...")
        add_config_flags(p.add_argument_group("sampling"), SamplingParams, SAMPLING_FLAGS)
        p.set_defaults(fn=cmd_frob)

and `cmd_frob(a)` builds the dataclass with `config_from_args(SamplingParams, a)`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
from collections.abc import Callable

from ..config import DEVICE, SEED, Range


def _type(name: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    convert.__name__ = name  # argparse names the type in some messages
    return convert


def ranged(r: Range, field: str = "") -> Callable[[str], int | float]:
    """An option type: an int or a finite float within the Range, else an error naming the bound
    (and the config field the flag sets, when it sets one)."""

    def convert(text: str) -> int | float:
        try:
            v = int(text, 0) if r.kind is int else float(text)
        except ValueError:
            v = None
        if v is None or not r.ok(v):
            raise argparse.ArgumentTypeError(f"{field + ' ' if field else ''}must be {r.describe()}, got {text!r}")
        return v

    return _type("int" if r.kind is int else "float", convert)


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (each bound optional); at most 2**63 - 1 unless a bound says otherwise."""
    return ranged(Range(int, lo, hi if hi is not None else SEED.hi))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """A finite float in the given interval (bounds optional, each open or closed)."""
    return ranged(Range(float, lo, hi, lo_open, hi_open))


seed = ranged(SEED)


def device(text: str) -> str:
    """auto, cpu, mps, cuda or cuda:N (whether it is present is checked when it is used)."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, mps, cuda or cuda:N, got {text!r}")
    return text


def text(value: str) -> str:
    """A string that was valid UTF-8 on the command line (Python keeps invalid bytes as surrogates)."""
    if re.search("[\udc80-\udcff]", value):
        raw = value.encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text: {raw!r}")
    return value


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[nrtabfv0\\'\"])")
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}


def escaped(value: str) -> str:
    r"""`text` with the escapes \n \t \r \\ \xHH \uXXXX (as in a Python string) turned into characters;
    any other backslash stays as it is."""

    def one(m: re.Match) -> str:
        e = m.group(1)
        if e[0] in "xuU":
            try:
                return chr(int(e[1:], 16))
            except ValueError:  # beyond U+10FFFF
                raise argparse.ArgumentTypeError(f"bad escape \\{e} in {value!r}") from None
        return _SIMPLE.get(e, e)

    return _ESCAPE.sub(one, text(value))


def nonempty(value: str) -> str:
    """Non-empty text (valid UTF-8)."""
    value = text(value)
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def path(value: str) -> str:
    """A non-empty path (any bytes: a file name need not be UTF-8)."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def token_bias(value: str) -> tuple[int, float]:
    """ID=BIAS, e.g. 50256=-100."""
    from ..config import SamplingParams

    tid, sep, bias = value.partition("=")
    try:
        t, b = int(tid), float(bias)
    except ValueError:
        t = b = None
    if not sep or t is None or t < 0 or not SamplingParams.BIAS.ok(b):
        raise argparse.ArgumentTypeError(
            f"must be ID=BIAS with ID a token id >= 0 and BIAS {SamplingParams.BIAS.describe()}, got {value!r}"
        )
    return t, b


def choice_of(names: Callable[[], list[str]], what: str) -> Callable[[str], str]:
    """One of names() (called when parsing, so the list stays where it is defined)."""

    def convert(value: str) -> str:
        if value not in names():
            raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; choose one of: {', '.join(names())}")
        return value

    return _type(what, convert)


# ---------------------------------------------------------------- flags from dataclasses


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), read from the source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError, SyntaxError):  # no source (frozen app): help without the docstrings
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(group, cls, names: dict[str, str | None], *, types: dict | None = None,
                     defaults: bool = True) -> None:
    """One flag per field in `names` (field -> flag, or None for --field-name), dest = the field.

    Numbers get the field's Range as their type; bools a store_true flag (--no-FIELD when the field
    defaults to True); other fields need a type in `types`. The parsed default is None, so
    `explicit_fields` can tell what the user gave; `config_from_args` fills in the defaults.
    `defaults=False` leaves the default out of the help (for fields a preset fills in).
    """
    docs = field_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, flag in names.items():
        f = fields[name]
        flag = flag or _flag(name)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = docs.get(name, "")
        if isinstance(default, bool):
            if default:
                flag = "--no-" + flag.removeprefix("--")
                help_ = f"turn off: {help_}"
            group.add_argument(flag, dest=name, action="store_const", const=not default, help=help_)
            continue
        kind = (types or {}).get(name) or (ranged(cls.RANGES[name], name) if name in cls.RANGES else None)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{name}: give its option type in types=")
        if defaults and default is not None:
            help_ += f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
        if name in cls.RANGES:
            help_ += f" [{cls.RANGES[name].describe()}]"
        group.add_argument(flag, dest=name, type=kind, metavar=flag.removeprefix("--").replace("-", "_").upper(),
                           help=help_.replace("%", "%%"))


def explicit_fields(cls, a: argparse.Namespace, names=None) -> dict:
    """The fields of `cls` (or those in `names`) the user gave on the command line."""
    names = names if names is not None else [f.name for f in dataclasses.fields(cls)]
    return {n: getattr(a, n) for n in names if getattr(a, n, None) is not None}


def config_from_args(cls, a: argparse.Namespace, base: dict | None = None, **extra):
    """`cls` from `base` (default: the dataclass defaults), the flags given, then `extra`."""
    return cls(**{**(base or {}), **explicit_fields(cls, a), **extra})
