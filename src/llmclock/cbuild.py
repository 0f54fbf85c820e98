"""Load llmclock's compiled kernel library, the build that suits this CPU, with ctypes.

The kernels are C++ sources in `llmclock/csrc/`, built when the package is installed (setup.py;
`make setup`, `pip install .`, a wheel) into one plain shared library per x86-64 ISA level:
`_kernels_avx512.so`, `_kernels_avx2.so`, `_kernels_base.so` (one `_kernels_base.so` elsewhere).
At first use the baseline build says which level this CPU and its OS support
(`llmclock_isa_level`) and the best build present is loaded; LLMCLOCK_ISA=avx2|base caps the level.
The library uses OpenMP with an explicit thread count per call (torch.get_num_threads()).

Where no build loads (a source checkout run without installing, a platform without a compiler at
install time) one warning says why and callers use torch ops. LLMCLOCK_REQUIRE_KERNELS=1 turns that
into an error (CI sets it); LLMCLOCK_NO_CKERNELS=1 turns the kernels off without a warning.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

from .errors import LLMClockError

LEVELS = ("base", "avx2", "avx512")
"""Builds by ISA level, in the order of llmclock_isa_level()'s answers 0, 2, 3."""
_LEVEL_OF_ANSWER = {0: "base", 2: "avx2", 3: "avx512"}
DIR = Path(__file__).resolve().parent


def library_path(level: str, directory: Path | None = None) -> Path:
    return (directory or DIR) / f"_kernels_{level}.so"


def best_level(directory: Path | None = None) -> str:
    """The highest built level this CPU runs (capped by LLMCLOCK_ISA); raises OSError where even
    the baseline build cannot be loaded."""
    base = ctypes.CDLL(str(library_path("base", directory)))
    base.llmclock_isa_level.restype = ctypes.c_int
    level = _LEVEL_OF_ANSWER.get(base.llmclock_isa_level(), "base")
    cap = os.environ.get("LLMCLOCK_ISA")
    if cap in LEVELS and LEVELS.index(cap) < LEVELS.index(level):
        level = cap
    while level != "base" and not library_path(level, directory).exists():
        level = LEVELS[LEVELS.index(level) - 1]
    return level


def load(directory: Path | None = None) -> tuple[ctypes.CDLL | None, str]:
    """(the library, its level) or (None, why not)."""
    directory = directory or DIR
    if os.environ.get("LLMCLOCK_NO_CKERNELS"):
        return None, "LLMCLOCK_NO_CKERNELS is set"
    if not library_path("base", directory).exists():
        return None, (f"no compiled kernels in {directory} (build them by installing the package: "
                      "`make setup` or `pip install .`)")
    try:
        level = best_level(directory)
        return ctypes.CDLL(str(library_path(level, directory))), level
    except OSError as e:
        return None, f"the compiled kernels in {directory} do not load: {e}"


_loaded: tuple[ctypes.CDLL | None, str] | None = None


def shared() -> ctypes.CDLL | None:
    """The process's kernel library, loaded once; None (after one warning) where it cannot be, or
    an LLMClockError when LLMCLOCK_REQUIRE_KERNELS=1."""
    global _loaded
    if _loaded is None:
        _loaded = load()
        lib, why = _loaded
        if lib is None and not os.environ.get("LLMCLOCK_NO_CKERNELS"):
            if os.environ.get("LLMCLOCK_REQUIRE_KERNELS") == "1":
                raise LLMClockError(f"compiled kernels required (LLMCLOCK_REQUIRE_KERNELS=1) but {why}")
            warnings.warn(f"llmclock: {why}; using torch ops instead", RuntimeWarning, stacklevel=3)
    return _loaded[0]


def level() -> str | None:
    """The ISA level of the loaded library ('avx512', 'avx2', 'base'), None when none is loaded."""
    lib = shared()
    return _loaded[1] if lib is not None else None


class Library:
    """The kernel library seen through one module's entry points and their ctypes signatures.

    `signatures` maps each extern "C" function to its argument types (ctypes), `restypes` those
    that return something to the return type (the rest return void), and `on_load(lib)`, if given,
    runs once after loading (to hand the library what it needs from elsewhere). `get()` returns the
    loaded CDLL, or None where there is none; the outcome is kept in `lib` (None: not tried yet,
    False: none), so tests can force either path.
    """

    def __init__(self, signatures: dict[str, list], restypes: dict | None = None, on_load=None, loader=None):
        self.signatures, self.restypes, self.on_load = signatures, restypes or {}, on_load
        self.loader = loader or shared
        self.lib: ctypes.CDLL | bool | None = None

    def get(self) -> ctypes.CDLL | None:
        if self.lib is None:
            lib = self.loader()
            if lib is not None:
                for fn, argtypes in self.signatures.items():
                    getattr(lib, fn).argtypes = argtypes
                    getattr(lib, fn).restype = self.restypes.get(fn)
                if self.on_load is not None:
                    self.on_load(lib)
            self.lib = lib or False
        return self.lib or None
