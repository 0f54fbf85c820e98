"""Build a small C++ source into a shared library once, cached per CPU, and load it with ctypes.

The kernels in llmclock are plain C++ with GCC vector types and OpenMP (sharing torch's libgomp, so
torch.set_num_threads applies). g++ builds one in about a second, against ~50 s for a torch
extension that includes torch/extension.h. The library lands in torch's extensions cache under a
name keyed by the source, the flags and this CPU's model and flags (-march=native output only runs
on this CPU model). Without a compiler, or when the build fails, callers get None and use torch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({ln for ln in f if ln.startswith(("model name", "flags"))}))
    except OSError:
        return os.uname().machine


def build(name: str, src: str) -> ctypes.CDLL | None:
    """Compile `src` (C++ with extern "C" entry points) into `<cache>/<name>/<name>_<key>.so` unless
    it is there already, and load it; None when LLMCLOCK_NO_CKERNELS is set, there is no compiler,
    or the build fails."""
    if os.environ.get("LLMCLOCK_NO_CKERNELS"):
        return None
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return None
    tag = hashlib.sha1((src + " ".join(FLAGS) + cxx + _cpu_id()).encode()).hexdigest()[:16]
    from torch.utils.cpp_extension import get_default_build_root

    d = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR", get_default_build_root()), name)
    so = os.path.join(d, f"{name}_{tag}.so")
    try:
        if not os.path.exists(so):
            os.makedirs(d, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                path = os.path.join(tmp, "k.cpp")
                with open(path, "w") as f:
                    f.write(src)
                out = os.path.join(tmp, "k.so")
                subprocess.run([cxx, path, *FLAGS, "-o", out], check=True, capture_output=True, timeout=120)
                os.replace(out, so)  # atomic: concurrent builders are safe
        return ctypes.CDLL(so)
    except (OSError, subprocess.SubprocessError):
        return None


class Library:
    """A kernel source built and loaded on first use, with its entry points' ctypes signatures.

    `signatures` maps each extern "C" function to its argument types (ctypes), `restypes` those
    that return something to the return type (the rest return void), and `on_load(lib)`, if given,
    runs once after loading (to hand the library what it needs from elsewhere). `get()` returns the
    loaded CDLL, or None where it cannot be built; the outcome is kept in `lib` (None: not tried
    yet, False: failed), so a failed build is not retried.
    """

    def __init__(self, name: str, src: str, signatures: dict[str, list], restypes: dict | None = None,
                 on_load=None):
        self.name, self.src, self.signatures, self.restypes = name, src, signatures, restypes or {}
        self.on_load = on_load
        self.lib: ctypes.CDLL | bool | None = None

    def get(self) -> ctypes.CDLL | None:
        if self.lib is None:
            lib = build(self.name, self.src)
            if lib is not None:
                for fn, argtypes in self.signatures.items():
                    getattr(lib, fn).argtypes = argtypes
                    getattr(lib, fn).restype = self.restypes.get(fn)
                if self.on_load is not None:
                    self.on_load(lib)
            self.lib = lib or False
        return self.lib or None
