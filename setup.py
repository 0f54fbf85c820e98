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
sources; `python setup.py build_ext --inplace` rebuilds them after an edit. CXX picks the compiler.
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


sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
headers = sorted(glob.glob(os.path.join(CSRC, "*.h")))
setup(
    ext_modules=[
        Extension(f"llmclock._kernels_{level}", sources=sources, depends=headers, language="c++",
                  extra_compile_args=COMMON + flags, extra_link_args=["-fopenmp"])
        for level, flags in levels().items()
    ],
    cmdclass={"build_ext": BuildSharedLibrary},
)
