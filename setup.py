"""Builds llmclock's C++ kernels (src/llmclock/csrc) into plain shared libraries at install time.

Registering a kernel source: put the `.cpp` in src/llmclock/csrc/ (headers next to it; declare its
extern "C" entry points in csrc/kernels.h). Every `.cpp` there is compiled into the one library, so
nothing else in this file changes; the Python side gives the functions their ctypes signatures with
`llmclock.cbuild.Library(...)` and calls `.get()` (see engine/kernels.py).

The library is plain C ABI (no Python, no torch headers), loaded with ctypes. On x86-64 it is built
once per ISA level, `_kernels_avx512.so` (x86-64-v4), `_kernels_avx2.so` (x86-64-v3) and
`_kernels_base.so` (any x86-64); llmclock/cbuild.py picks the best one this CPU runs when it loads.
Elsewhere (aarch64, ...) there is one `_kernels_base.so` for the compiler's default target. An
editable install (`make setup`, `pip install -e .`) builds them in place, next to the package's
sources; `python setup.py build_ext --inplace` rebuilds them after an edit. CXX picks the compiler;
LLMCLOCK_ISA_LEVELS (e.g. "avx2,base") builds only the levels it names.
"""

from __future__ import annotations

import glob
import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/llmclock/csrc"
COMMON = ["-O3", "-std=c++17", "-fopenmp", "-fPIC", "-Wall", "-Wno-psabi"]
X86_LEVELS = {"avx512": ["-march=x86-64-v4"], "avx2": ["-march=x86-64-v3"], "base": ["-march=x86-64"]}


def levels() -> dict[str, list[str]]:
    if platform.machine().lower() in ("x86_64", "amd64"):
        return X86_LEVELS
    return {"base": []}


class BuildSharedLibrary(build_ext):
    """build_ext for libraries that ctypes loads: no Python ABI tag in the file name, and each ISA
    level compiled into a temporary folder of its own (the levels share their sources)."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext: Extension) -> None:
        temp = self.build_temp
        self.build_temp = os.path.join(temp, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = temp


def chosen_levels() -> dict[str, list[str]]:
    """The levels to build: all of this architecture's, or those LLMCLOCK_ISA_LEVELS names (e.g.
    "base" or "avx2,base", for a quicker build for known machines; cbuild.py loads the best built)."""
    wanted = [w.strip() for w in os.environ.get("LLMCLOCK_ISA_LEVELS", "").split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(levels()))
    if unknown:
        raise SystemExit(f"LLMCLOCK_ISA_LEVELS: unknown level(s) {', '.join(unknown)} (this machine: {', '.join(levels())})")
    return {k: v for k, v in levels().items() if not wanted or k in wanted}


sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
headers = sorted(glob.glob(os.path.join(CSRC, "*.h")))
setup(
    ext_modules=[
        Extension(f"llmclock._kernels_{level}", sources=sources, depends=headers, language="c++",
                  extra_compile_args=COMMON + flags, extra_link_args=["-fopenmp"])
        for level, flags in chosen_levels().items()
    ],
    cmdclass={"build_ext": BuildSharedLibrary},
)
