"""CPU decode kernels: a panel-packed fp32 GEMV/small-GEMM and a bandwidth probe.

Why (measured on the 2-core Cascade Lake box, fp32, 2 threads, weights streamed
from DRAM; bench/decode.py measures decode against this roofline):
  * Decoding is a stream over all weights once per step; M (batch rows) is 1..8,
    so the matmul must run at DRAM read speed.  For M=1 every torch path
    (F.linear on (out, in), x @ W(in, out), mv) reads ~18-23 GB/s, this kernel
    ~21 GB/s; for M=8 MKL drops to ~6-9 GB/s while this kernel keeps ~15-19.
  * `make_linear` packs W as panels of 32 output columns, each panel a
    contiguous (in, 32) block: every thread streams one contiguous region, one
    k-step is 128 contiguous bytes, and up to 8 rows share each weight load,
    so M=8 costs about the same memory traffic as M=1.  Bias, GELU(tanh) and a
    residual add are fused into the store.
  * The kernel is plain C++ with GCC vector types (AVX-512 with -march=native),
    OpenMP over panels, built once by llmclock.cbuild and called through
    ctypes (~2 us per call).  Without a compiler, or for non-fp32 / non-CPU
    tensors, everything falls back to torch ops with the same results.
"""
from __future__ import annotations

import ctypes
import time

import torch
import torch.nn.functional as F

from ..cbuild import Library

PANEL = 32

_SRC = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define P 32
#define PF 1024 /* software prefetch distance (floats): +10% M=1, +25% M=8 */

/* y[0:MR, 0:nj] (=|+=) act(x[0:MR] @ panel + bias); panel is (K, 32) contiguous */
static inline __attribute__((always_inline)) void panel_rows(
    const int MR, const float* x, int64_t ldx, int64_t K, const float* wp,
    const float* bias, float* y, int64_t ldy, int nj, int gelu, int acc) {
  v16 a0[8], a1[8], c0[8], c1[8];
  for (int m = 0; m < MR; ++m) a0[m] = a1[m] = c0[m] = c1[m] = (v16){0};
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {  /* two k-steps in flight: 4 independent FMA chains/row */
    __builtin_prefetch(wp + k * P + PF);      __builtin_prefetch(wp + k * P + PF + 16);
    __builtin_prefetch(wp + k * P + PF + 32); __builtin_prefetch(wp + k * P + PF + 48);
    const v16 w0 = *(const v16*)(wp + k * P), w1 = *(const v16*)(wp + k * P + 16);
    const v16 w2 = *(const v16*)(wp + k * P + 32), w3 = *(const v16*)(wp + k * P + 48);
    for (int m = 0; m < MR; ++m) {
      const float u = x[m * ldx + k], v = x[m * ldx + k + 1];
      a0[m] += u * w0; a1[m] += u * w1; c0[m] += v * w2; c1[m] += v * w3;
    }
  }
  if (k < K) {
    const v16 w0 = *(const v16*)(wp + k * P), w1 = *(const v16*)(wp + k * P + 16);
    for (int m = 0; m < MR; ++m) { a0[m] += x[m * ldx + k] * w0; a1[m] += x[m * ldx + k] * w1; }
  }
  for (int m = 0; m < MR; ++m) {
    float r[P];
    const v16 s0 = a0[m] + c0[m], s1 = a1[m] + c1[m];
    memcpy(r, &s0, 64); memcpy(r + 16, &s1, 64);
    float* yr = y + m * ldy;
    for (int j = 0; j < nj; ++j) {
      float t = r[j] + (bias ? bias[j] : 0.f);
      if (gelu) t = 0.5f * t * (1.f + tanhf(0.7978845608028654f * (t + 0.044715f * t * t * t)));
      yr[j] = acc ? yr[j] + t : t;
    }
  }
}

extern "C" void linear_panels(const float* x, int64_t M, int64_t ldx, int64_t K,
                              const float* wp, int64_t N, const float* bias, float* y,
                              int64_t ldy, int gelu, int acc, int nthreads) {
  const int64_t np = (N + P - 1) / P;
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t p = 0; p < np; ++p) {
    const float* w = wp + p * K * P;
    const int nj = (int)(N - p * P < P ? N - p * P : P);
    const float* b = bias ? bias + p * P : 0;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const float* xr = x + m0 * ldx; float* yr = y + m0 * ldy + p * P;
      switch (M - m0 < 8 ? M - m0 : 8) {
#define R(n) case n: panel_rows(n, xr, ldx, K, w, b, yr, ldy, nj, gelu, acc); break;
        R(1) R(2) R(3) R(4) R(5) R(6) R(7) default: R(8)
      }
    }
  }
}

/* One decode step of attention for rows b < n (row b = cache slot b): write row b's key and value
   at position pos[b], then y[b] = softmax(q K[0..pos[b]]^T / sqrt(hs)) V[0..pos[b]] per head.
   qkv is (n, 3C) as c_attn produces it; kc, vc are (slots, nh, max_len, hs) contiguous. Each row
   sees exactly its own history, so slots at different positions need no mask. */
extern "C" void attend_decode(const float* qkv, int64_t n, int64_t nh, int64_t hs, float* kc, float* vc,
                              int64_t max_len, const int64_t* pos, float* y, int nthreads) {
  const int64_t C = nh * hs;
  const float scale = 1.0f / sqrtf((float)hs);
  int64_t work = 0;
  for (int64_t b = 0; b < n; ++b) work += (pos[b] + 1) * C;
  #pragma omp parallel for collapse(2) schedule(static) num_threads(work > 65536 ? nthreads : 1)
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t h = 0; h < nh; ++h) {
      const float* q = qkv + b * 3 * C + h * hs;
      float* K = kc + (b * nh + h) * max_len * hs;
      float* V = vc + (b * nh + h) * max_len * hs;
      const int64_t L = pos[b] + 1;
      memcpy(K + pos[b] * hs, q + C, hs * sizeof(float));
      memcpy(V + pos[b] * hs, q + 2 * C, hs * sizeof(float));
      float* s = (float*)__builtin_alloca(L * sizeof(float));
      float mx = -INFINITY;
      for (int64_t j = 0; j < L; ++j) {
        float d = 0.f;
        for (int64_t t = 0; t < hs; ++t) d += q[t] * K[j * hs + t];
        s[j] = d * scale;
        mx = s[j] > mx ? s[j] : mx;
      }
      float sum = 0.f;
      for (int64_t j = 0; j < L; ++j) { s[j] = expf(s[j] - mx); sum += s[j]; }
      float* out = y + b * C + h * hs;
      for (int64_t t = 0; t < hs; ++t) out[t] = 0.f;
      for (int64_t j = 0; j < L; ++j) {
        const float p = s[j] / sum;
        for (int64_t t = 0; t < hs; ++t) out[t] += p * V[j * hs + t];
      }
    }
  }
}

extern "C" double stream_sum(const float* p, int64_t n, int nthreads) {
  double s = 0;
  #pragma omp parallel for reduction(+:s) schedule(static) num_threads(nthreads)
  for (int64_t c = 0; c < n / 4096; ++c) {
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    const float* q = p + c * 4096;
    for (int i = 0; i < 4096; i += 64) {
      a0 += *(const v16*)(q + i); a1 += *(const v16*)(q + i + 16);
      a2 += *(const v16*)(q + i + 32); a3 += *(const v16*)(q + i + 48);
    }
    const v16 a = a0 + a1 + a2 + a3;
    for (int i = 0; i < 16; ++i) s += a[i];
  }
  return s;
}
"""

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_kernels = Library("llmclock_kernels", _SRC, {
    "linear_panels": [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, _int, _int, _int],
    "stream_sum": [_ptr, _i64, _int],
    "attend_decode": [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _int],
}, restypes={"stream_sum": ctypes.c_double})
get_lib = _kernels.get
"""The compiled decode kernels (built on first call), or None where they cannot be built."""


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
    and one ctypes call (~6 us; a tick makes 4 * n_layer + 1 of them). The kernel fuses GPT-2's
    tanh GELU; exact GELU runs after it. Inputs the kernel cannot take (not fp32 on CPU, autograd),
    packed=False, or no compiler: plain torch ops with the same results. `f.packed` holds the
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
    kernel, f32, fused_gelu = lib.linear_panels, torch.float32, approximate == "tanh"
    w_ptr, b_ptr = panels.data_ptr(), (bias.data_ptr() if bias is not None else None)

    def linear(x, *, gelu=False, out=None, accumulate=False):
        if x.dtype is not f32 or x.requires_grad or x.device.type != "cpu":
            return torch_linear(x, gelu=gelu, out=out, accumulate=accumulate)
        if gelu and not fused_gelu:
            return _store(F.gelu(linear(x)), out, accumulate)
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(*x.shape[:-1], n) if out is None else out
        kernel(x.data_ptr(), x.numel() // k, k, k, w_ptr, n, b_ptr, y.data_ptr(), n, gelu, accumulate,
               torch.get_num_threads())
        return y

    linear.packed = panels  # keeps the panels alive as long as the function
    return linear


def make_attend(cache_k: torch.Tensor):
    """The compiled decode attention for caches shaped like `cache_k` (slots, nh, max_len, hs), or
    None when it cannot be used (no compiler, not fp32 on CPU): callers then use index writes and
    scaled_dot_product_attention.

    f(qkv (n, 3C), kc, vc, pos (n,) int64) -> y (n, C): writes each row's key/value at its
    position and attends over that row's own history. One call per layer replaces two index_put
    writes and an SDPA call (~60 us of fixed cost per layer here).
    """
    lib = get_lib()
    if lib is None or cache_k.dtype != torch.float32 or cache_k.device.type != "cpu":
        return None
    _, nh, max_len, hs = cache_k.shape
    kernel = lib.attend_decode

    def attend(qkv, kc, vc, pos):
        n = qkv.size(0)
        y = torch.empty(n, nh * hs)
        kernel(qkv.data_ptr(), n, nh, hs, kc.data_ptr(), vc.data_ptr(), max_len, pos.data_ptr(), y.data_ptr(),
               torch.get_num_threads())
        return y

    return attend
