"""CPU decode kernels: a panel-packed fp32 GEMV/small-GEMM, decode attention, a whole Block per
decode step, and a bandwidth probe. The C++ is in csrc/decode.cpp (built at install, loaded by
llmclock/cbuild.py for this CPU's ISA level).

Why (measured on the 2-core Cascade Lake box, fp32, 2 threads, weights streamed
from DRAM; bench/decode.py measures decode against this roofline):
  * Decoding is a stream over all weights once per step; M (batch rows) is 1..8,
    so the matmul must run at DRAM read speed.  For M=1 every torch path
    (F.linear on (out, in), x @ W(in, out), mv) reads ~18-23 GB/s, this kernel
    ~21 GB/s; for M=8 MKL drops to ~6-9 GB/s while this kernel keeps ~15-19.
  * `make_linear` packs W as panels of 32 output columns, each panel a
    contiguous (in, 32) block: every thread streams one contiguous region, one
    k-step is 128 contiguous bytes, and up to 8 rows share each weight load,
    so M=8 costs about the same memory traffic as M=1.  Bias, GELU (tanh or
    exact) and a residual add are fused into the store.
  * `make_block` runs a whole Block for one decode step in one
    call (LayerNorm, QKV GEMV, cache write, attention, projection + residual,
    LayerNorm, MLP with GELU, + residual): a tick is then ~n_layer + 2 calls
    instead of ~100 dispatched ops (~2 ms of Python per cycle).
  * The kernels are plain C++ with GCC vector types and OpenMP over panels,
    called through ctypes (~2 us per call).  Without the built library, or
    for non-fp32 / non-CPU tensors, everything falls back to torch ops with
    the same results.
"""
from __future__ import annotations

import ctypes
import time

import torch
import torch.nn.functional as F

from ..cbuild import Library

PANEL = 32


_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_kernels = Library({
    "linear_panels": [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, _int, _int, _int],
    "stream_sum": [_ptr, _i64, _int],
    "attend_decode": [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _int],
    "decode_block": [_ptr, ctypes.POINTER(_ptr), _ptr, ctypes.POINTER(_ptr), _ptr, _i64, _i64, _i64, _i64,
                       ctypes.c_float, ctypes.c_float, _int, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _int],
}, restypes={"stream_sum": ctypes.c_double})
get_lib = _kernels.get
"""The compiled kernel library (csrc/decode.cpp's entry points), or None where it is not built."""


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Machine read bandwidth in bytes/s: best of `repeats` full reads of an
    `nbytes` fp32 buffer (>> L3 so it streams from DRAM), using torch's thread
    count.  Uses the compiled AVX-512 streaming sum when available, else
    torch.sum (same speed within noise here)."""
    x = torch.ones(max(nbytes // 4 // 4096, 1) * 4096)
    lib = get_lib()
    if lib is not None:
        nt = torch.get_num_threads()
        fn = lambda: lib.stream_sum(x.data_ptr(), x.numel(), nt)  # noqa: E731
    else:
        fn = x.sum
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) -> panels (ceil(out/32), in, 32), zero-padded: each panel one contiguous stream."""
    n, k = weight.shape
    n_panels = (n + PANEL - 1) // PANEL
    padded = torch.zeros(n_panels * PANEL, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(n_panels, PANEL, k).transpose(1, 2).contiguous()


def _store(y, out, accumulate):
    if out is None:
        return y
    return out.add_(y) if accumulate else out.copy_(y)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, *, packed: bool = True,
                approximate: str = "tanh"):
    """A decode-time linear for one frozen (out, in) weight:

        f(x, *, gelu=False, out=None, accumulate=False) -> [act](x @ W.T + bias)

    written to `out` (or a new tensor), or added to it with accumulate=True (a fused residual add);
    `act` is the model's GELU (F.gelu's `approximate`: 'tanh', GPT-2's, or 'none', exact). The weight is packed once and
    everything a call needs (pointers, sizes) is bound here, so a call costs a few attribute reads
    and one ctypes call (~6 us). The kernel fuses either GELU. Inputs the kernel cannot take (not fp32 on CPU, autograd),
    packed=False, or no built library: plain torch ops with the same results. `f.packed` holds the
    panels (None on the torch path).
    """
    w = weight.detach()
    n, k = w.shape

    def torch_linear(x, *, gelu=False, out=None, accumulate=False):
        y = F.linear(x, w, bias)
        return _store(F.gelu(y, approximate=approximate) if gelu else y, out, accumulate)

    lib = get_lib() if packed and w.device.type == "cpu" and w.dtype == torch.float32 else None
    if lib is None or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous())):
        torch_linear.packed = None
        return torch_linear
    panels = _pack(w)
    kernel, f32, gelu_mode = lib.linear_panels, torch.float32, 1 if approximate == "tanh" else 2
    w_ptr, b_ptr = panels.data_ptr(), (bias.data_ptr() if bias is not None else None)

    def linear(x, *, gelu=False, out=None, accumulate=False):
        if x.dtype is not f32 or x.requires_grad or x.device.type != "cpu":
            return torch_linear(x, gelu=gelu, out=out, accumulate=accumulate)
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(*x.shape[:-1], n) if out is None else out
        kernel(x.data_ptr(), x.numel() // k, k, k, w_ptr, n, b_ptr, y.data_ptr(), n, gelu_mode if gelu else 0,
               accumulate, torch.get_num_threads())
        return y

    linear.packed = panels  # keeps the panels alive as long as the function
    return linear


def make_attend(cache_k: torch.Tensor):
    """The compiled decode attention for caches shaped like `cache_k` (slots, nh, max_len, hs), or
    None when it cannot be used (no built library, not fp32 on CPU): callers then use index writes and
    scaled_dot_product_attention.

    f(qkv (n, 3 nh hs), kc, vc, pos (n,) int64, slots (n,) int64 | None) -> y (n, nh hs), nh the head
    count of the cache given (layers may differ where heads were pruned): writes each row's
    key/value at its position in its cache slot (slots[b], or b when slots is None) and attends
    over that slot's history. One call per layer replaces two index_put
    writes and an SDPA call (~60 us of fixed cost per layer here).
    """
    lib = get_lib()
    if lib is None or cache_k.dtype != torch.float32 or cache_k.device.type != "cpu":
        return None
    _, _, max_len, hs = cache_k.shape
    kernel = lib.attend_decode

    def attend(qkv, kc, vc, pos, slots=None):
        n, nh = qkv.size(0), kc.size(1)
        y = torch.empty(n, nh * hs)
        kernel(qkv.data_ptr(), n, nh, hs, kc.data_ptr(), vc.data_ptr(), max_len, pos.data_ptr(),
               None if slots is None else slots.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y

    return attend


def decode_linear(module, *, packed: bool = True, approximate: str = "tanh"):
    """make_linear for a plain nn.Linear; a layer with its own `decode_linear` (llmclock.compress's
    quantized layers) brings its own kernel with the same signature; anything else in a Linear's
    place (an adapter wrapping it) is called as the module it is, with the same call signature."""
    if hasattr(module, "decode_linear"):
        return module.decode_linear(packed=packed, approximate=approximate)
    if type(module) is torch.nn.Linear:
        return make_linear(module.weight, module.bias, packed=packed, approximate=approximate)

    def linear(x, *, gelu=False, out=None, accumulate=False):
        y = module(x)
        return _store(F.gelu(y, approximate=approximate) if gelu else y, out, accumulate)

    linear.packed = None
    return linear


def make_block(block, c_attn, attn_proj, c_fc, mlp_proj, *, approximate: str = "tanh"):
    """The whole-block decode kernel for `block` (a Block) whose four Linears are packed in the
    make_linear functions given (fp32 panels, or a quantized layer's panels: decode_linear), or None
    where it cannot run (no built library, a Linear not packed, not fp32 on the CPU, or a block that
    is not made of its own parts: an adapter changes what the weights alone compute):

        f(x (n, C), kc, vc, pos (n,) int64, slots (n,) int64 | None) -> None

    runs LayerNorm, the QKV GEMV, the cache write, attention, the projection + residual, LayerNorm,
    the MLP with GELU (any width: a pruned MLP too) and its residual for one decode step in one call,
    x updated in place; row b writes and attends over cache slot slots[b] (b when slots is None) at
    position pos[b]. One call instead of ~10 torch ops and kernel calls per block: for GPT-2 124M in
    int4 those cost ~1 ms of a 4-5 ms cycle, while the other thread waited.
    """
    from ..fused import is_plain

    lib, lins = get_lib(), (c_attn, attn_proj, c_fc, mlp_proj)
    if lib is None or not is_plain(block, own_kernels=True):  # first: an adapted Linear has no .bias to read
        return None
    ln_1, ln_2, a, m = block.ln_1, block.ln_2, block.attn, block.mlp
    C, H = ln_1.weight.numel(), m.c_fc.out_features
    params = [ln_1.weight, ln_1.bias, a.c_attn.bias, a.c_proj.bias, ln_2.weight, ln_2.bias, m.c_fc.bias, m.c_proj.bias]
    if (any(f.packed is None for f in lins) or a.c_attn.out_features != 3 * C or a.c_proj.in_features != C
            or any(p is not None and (p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous())
                   for p in params)):
        return None
    panels = [f.packed[0] if isinstance(f.packed, tuple) else f.packed for f in lins]
    quant = [getattr(f, "quant", None) for f in lins]  # (format, scales, group) of a quantized layer
    ptrs = [ln_1.weight, ln_1.bias, panels[0], a.c_attn.bias, panels[1], a.c_proj.bias, ln_2.weight, ln_2.bias,
            panels[2], m.c_fc.bias, panels[3], m.c_proj.bias]
    w = (ctypes.c_void_p * 12)(*[None if t is None else t.data_ptr() for t in ptrs])
    fmt = (ctypes.c_int * 4)(*[-1 if q is None else q[0] for q in quant])
    scales = (ctypes.c_void_p * 4)(*[None if q is None or q[1] is None else q[1].data_ptr() for q in quant])
    group = (ctypes.c_int64 * 4)(*[0 if q is None else q[2] for q in quant])
    kernel, nh, eps1, eps2 = lib.decode_block, a.n_head, ln_1.eps, ln_2.eps
    gelu = 1 if approximate == "tanh" else 2

    def fused_block(x, kc, vc, pos, slots=None):
        n = x.size(0)
        work = torch.empty(n * (5 * C + H))
        kernel(x.data_ptr(), w, fmt, scales, group, n, C, H, nh, eps1, eps2, gelu, kc.data_ptr(), vc.data_ptr(),
               kc.size(2), pos.data_ptr(), None if slots is None else slots.data_ptr(), work.data_ptr(),
               torch.get_num_threads())

    fused_block.keep = (ptrs, lins, w, fmt, scales, group)  # the panels and the arrays live as long as the function
    return fused_block
