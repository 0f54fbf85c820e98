"""The kernel library's build: every ISA level built here runs the kernels right, the sources
compile for other targets (x86-64 without AVX-512, aarch64 by cross compiler), and the library
that loads is the one this CPU supports best."""

import ctypes
import platform
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmclock import cbuild, fused
from llmclock.engine import kernels as K
from conftest import requires_kernels, requires_tool

CSRC = Path(cbuild.__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _compile(cxx: str, flags: list[str], tmp_path: Path) -> None:
    for src in SOURCES:
        r = subprocess.run([cxx, "-c", "-O2", "-std=c++17", "-fopenmp", "-fPIC", "-Wall", *flags, str(src),
                            "-o", str(tmp_path / (src.stem + ".o"))], capture_output=True, text=True)
        assert r.returncode == 0, f"{src.name}:\n{r.stderr[-3000:]}"


@pytest.mark.slow
def test_sources_compile_for_aarch64(tmp_path):
    _compile(requires_tool("aarch64-linux-gnu-g++"), [], tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not X86, reason="an x86-64 compiler target")
def test_sources_compile_for_x86_64_baseline(tmp_path):
    _compile(requires_tool("g++"), ["-march=x86-64", "-mno-avx", "-mno-avx512f"], tmp_path)


def _levels_here() -> list[str]:
    """The built levels this CPU can run."""
    requires_kernels(K)
    best = cbuild.best_level()
    return [lv for lv in cbuild.LEVELS[: cbuild.LEVELS.index(best) + 1] if cbuild.library_path(lv).exists()]


def test_loaded_library_is_the_best_this_cpu_runs():
    levels = _levels_here()
    assert cbuild.level() == levels[-1]
    assert cbuild.library_path("base").exists()
    if X86:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        if " avx2 " in flags and " fma " in flags:
            assert "avx2" in levels or "avx512" in levels


@pytest.mark.parametrize("level", cbuild.LEVELS)
def test_each_isa_build_matches_torch(level, monkeypatch):
    """The kernels of each built level (base and AVX2 run on any AVX2 machine) against torch ops."""
    if level not in _levels_here():
        pytest.skip(f"{level} is not built or not supported by this CPU")
    lib = ctypes.CDLL(str(cbuild.library_path(level)))
    for module in (K, fused):
        monkeypatch.setattr(module._kernels, "lib", None)
        monkeypatch.setattr(module._kernels, "loader", lambda: lib)
    torch.manual_seed(0)
    w, b, x = torch.randn(100, 96) / 10, torch.randn(100), torch.randn(5, 96)
    torch.testing.assert_close(K.make_linear(w, b)(x, gelu=True), F.gelu(F.linear(x, w, b), approximate="tanh"),
                               atol=1e-4, rtol=1e-4)
    t = torch.randn(2, 20, 3 * 64)
    q, k, v = t.view(2, 20, 3, 2, 32).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 20, 64)
    torch.testing.assert_close(fused.causal_attention(t, 2), ref, atol=1e-5, rtol=1e-4)
    z = torch.randn(1000) * 4
    torch.testing.assert_close(fused.gelu(z), F.gelu(z), atol=2e-6, rtol=1e-5)
    ln = torch.nn.LayerNorm(64)
    torch.testing.assert_close(fused.FusedLayerNorm.of(ln)(t[..., :64]), ln(t[..., :64]), atol=1e-5, rtol=1e-4)
