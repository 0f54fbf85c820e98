"""Fused CPU kernels for the full-sequence forward and backward: causal attention, GELU, LayerNorm.

Why (nanoGPT's CPU recipe: 4 layers, 128 wide, T=64, batch 12, 2 threads; measured here): a
training step is ~60 ms, of which torch's matmuls take ~33 ms (~130 GFLOP/s, near what this CPU
gives such small shapes), while causal SDPA forward + backward took ~8 ms, GELU ~6 ms and LayerNorm
~2 ms for a few MFLOP and ~1.5 MB of activations each. These kernels do the same arithmetic in
one pass per call (plain C++ with GCC vector types and OpenMP, built by llmclock.cbuild):

  attention  reads q, k and v in place from c_attn's (B, T, 3C) output (no split, no transposes),
             writes y as (B, T, C) for c_proj and keeps each row's log-sum-exp; the backward
             recomputes the probabilities from it (as FlashAttention does) and writes one
             (B, T, 3C) gradient, so autograd needs no cat of three gradients. Per (batch, head)
             the score matrices live in cache and register-blocked loops do the products.
  gelu       GPT-2's tanh form or the exact erf form, forward and backward, with polynomial
             exp / normal cdf (libmvec's measured slower here).
  layernorm  forward keeps mean and 1/std per row; backward in one pass per row.

Measured in one process, alternating (bench-style A/B of whole training steps): ~5% off a step
here; most of a step is matmuls. `fuse_cpu_ops(model)` installs them on a GPT whose parameters
are fp32 on the CPU; each call then uses them whenever its inputs allow (fp32 CPU tensors, no
cache, no attention dropout, head size a multiple of 16) and torch's ops otherwise, with the same
results to float rounding (tests/test_fused.py). The model file stays plain PyTorch.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from .cbuild import Library

_SRC = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
typedef float vf __attribute__((vector_size(64)));
static inline vf ld(const float* p) { vf v; memcpy(&v, p, 64); return v; }
static inline void st(float* p, vf v) { memcpy(p, &v, 64); }
/* exp and Phi on 16 lanes, branch-free; libmvec's expf/erff measured 0.8-1.5 ns per element here.
   exp: Cephes' expf (reduction by ln 2, degree-6 polynomial, ~1 ulp), exp(-inf) = 0.
   Phi (normal cdf) from erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), whose exp(-z^2) is
   also the density that the backward needs. */
typedef int vi __attribute__((vector_size(64)));
static inline vf splat(float a) { return (vf){} + a; }

static inline vf vexp(vf x) {
  const vi dead = x < -87.3f;  /* exp underflows to 0 below here */
  x = x < -87.3f ? splat(-87.3f) : x;
  x = x > 88.3f ? splat(88.3f) : x;  /* keeps 2^n finite (n <= 127); exp(88.3) = 2.1e38 */
  const vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  /* round(x / ln 2) */
  const vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f; p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f; p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;  /* 2^n as float bits */
  vf scale;
  memcpy(&scale, &e, 64);
  return dead ? splat(0.f) : p * scale;
}
static inline vf vphi(vf x, vf* pdf) {  /* standard normal cdf; its density too if pdf */
  const vf z = (x < 0.f ? -x : x) * 0.7071067811865476f;
  const vf ez2 = vexp(-z * z);
  const vf t = 1.f / (1.f + 0.3275911f * z);
  const vf poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const vf c = 0.5f * poly * ez2;  /* P(N > |x|) = erfc(z) / 2 */
  if (pdf) *pdf = ez2 * 0.3989422804014327f;
  return x < 0.f ? c : 1.f - c;
}
/* ---- GELU: y = x * Phi(x), exact (erf) or GPT-2's tanh approximation; dx = dy * y'(x) ---- */
/* tanh form through the logistic: 0.5 (1 + tanh u) = 1 / (1 + e^-2u), free of cancellation where
   tanh u is near -1 (u = sqrt(2/pi) (x + 0.044715 x^3)); its derivative 0.5 (1 - tanh^2 u) = 2 s (1 - s). */
static inline vf e_minus_2u(vf x) { return vexp(-1.5957691216057308f * (x + 0.044715f * x * x * x)); }
static inline vf gelu_v(vf x, int approx) {
  if (approx) return x / (1.f + e_minus_2u(x));
  return x * vphi(x, 0);
}
static inline vf gelu_grad_v(vf x, int approx) {
  if (approx) {
    const vf e = e_minus_2u(x), s = 1.f / (1.f + e);
    return s + 2.f * x * s * (e * s) * 0.7978845608028654f * (1.f + 0.134145f * x * x);
  }
  vf pdf;
  const vf cdf = vphi(x, &pdf);
  return cdf + x * pdf;
}

/* one template for both passes: n elements, 16 at a time, the tail through a zero-padded copy */
template <class F>
static inline void elementwise(int64_t n, int nthreads, F f) {
  const int64_t nv = n / 16;
  #pragma omp parallel for schedule(static) num_threads(n > 32768 ? nthreads : 1)
  for (int64_t i = 0; i < nv; ++i) f(16 * i, 16);
  if (n % 16) f(16 * nv, n % 16);
}
static inline vf ldn(const float* p, int64_t m) { if (m == 16) return ld(p); float t[16] = {0}; memcpy(t, p, m * 4); return ld(t); }
static inline void stn(float* p, vf v, int64_t m) { if (m == 16) st(p, v); else memcpy(p, &v, m * 4); }

extern "C" void gelu_fwd(const float* x, float* y, int64_t n, int approx, int nthreads) {
  elementwise(n, nthreads, [=](int64_t i, int64_t m) { stn(y + i, gelu_v(ldn(x + i, m), approx), m); });
}

extern "C" void gelu_bwd(const float* x, const float* dy, float* dx, int64_t n, int approx, int nthreads) {
  elementwise(n, nthreads, [=](int64_t i, int64_t m) {
    stn(dx + i, ldn(dy + i, m) * gelu_grad_v(ldn(x + i, m), approx), m);
  });
}

/* ---- causal attention over c_attn's output ----
   qkv (B, T, 3C) holds q | k | v per row, head h at columns h*hs of each; y (B, T, C); lse (B, nh, T).
   Per (batch, head), with s = 1/sqrt(hs): S = s Q K^T, P = softmax(S), Y = P V; backward
   dP = dY V^T, dS = P (dP - rowsum(dY Y)), dQ = s dS K, dK = s dS^T Q, dV = P^T dY. S and dS are
   (T, Tp) tiles in cache (Tp = T rounded up to 16); Q, K, V, Y and dY are read in place from their
   (B, T, .) tensors and K^T, V^T copied into (hs, Tp) panels. Two register-blocked kernels do every
   product, 4 output rows at a time: abt (rows against a transposed panel, 64 columns per pass) and
   ab (weighted sums of rows, or with TRANS of columns of the weights). Causality skips the blocks
   above the diagonal; masked entries of P and dS are exactly 0, so diagonal blocks need no care. */
static inline int64_t pad16(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* all 16 lanes folded by op in four butterfly steps, the result in every lane */
template <class Op>
static inline float hreduce(vf v, Op op) {
  v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}
static inline float hsum(vf v) { return hreduce(v, [](vf a, vf b) { return a + b; }); }
static inline float hmax(vf v) { return hreduce(v, [](vf a, vf b) { return a > b ? a : b; }); }

/* Cm[i, j] = alpha A[i, :] . Bt[:, j] for i in [i0, i0+MR), j in [j0, j0+16*NB); A (., K) row
   stride lda, Bt (K, ldb). MR x NB accumulators stay in registers. */
template <int MR, int NB>
static inline void abt_block(const float* A, int64_t lda, const float* Bt, int64_t ldb, int64_t K, float alpha,
                             float* Cm, int64_t ldc, int64_t i0, int64_t j0) {
  vf c[MR][NB];
  for (int r = 0; r < MR; ++r) for (int q = 0; q < NB; ++q) c[r][q] = (vf){};
  const float* a = A + i0 * lda;
  for (int64_t k = 0; k < K; ++k) {
    const float* b = Bt + k * ldb + j0;
    vf bv[NB];
    for (int q = 0; q < NB; ++q) bv[q] = ld(b + 16 * q);
    for (int r = 0; r < MR; ++r) {
      const float x = a[r * lda + k];
      for (int q = 0; q < NB; ++q) c[r][q] += x * bv[q];
    }
  }
  for (int r = 0; r < MR; ++r) for (int q = 0; q < NB; ++q) st(Cm + (i0 + r) * ldc + j0 + 16 * q, c[r][q] * alpha);
}

template <int MR>
static void abt_rows(const float* A, int64_t lda, const float* Bt, int64_t ldb, int64_t K, float alpha, float* Cm,
                     int64_t ldc, int64_t i0, int64_t n16) {
  int64_t j0 = 0;
  for (; j0 + 64 <= n16; j0 += 64) abt_block<MR, 4>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, j0);
  switch ((n16 - j0) / 16) {
    case 3: abt_block<MR, 3>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, j0); break;
    case 2: abt_block<MR, 2>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, j0); break;
    case 1: abt_block<MR, 1>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, j0); break;
  }
}

/* the causal part of Cm = alpha A Bt: for each block of 4 rows, the columns up to its diagonal */
static void abt_causal(const float* A, int64_t lda, const float* Bt, int64_t ldb, int64_t K, float alpha, float* Cm,
                       int64_t ldc, int64_t T) {
  int64_t i0 = 0;
  for (; i0 + 4 <= T; i0 += 4) abt_rows<4>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, pad16(i0 + 4));
  switch (T - i0) {
    case 3: abt_rows<3>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, pad16(T)); break;
    case 2: abt_rows<2>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, pad16(T)); break;
    case 1: abt_rows<1>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, pad16(T)); break;
  }
}

/* Y[i, :] = alpha rs[i] sum_{j in [j0, j1)} W'[i, j] R[j, :] for i in [i0, i0+MR), where W' = W, or
   W^T with TRANS; R rows of 16*NV with stride ldr; rs (row scales) may be null. */
template <int NV, int MR, bool TRANS>
static inline void ab_block(const float* W, int64_t ldw, const float* R, int64_t ldr, int64_t j0, int64_t j1,
                            float alpha, const float* rs, float* Y, int64_t ldy, int64_t i0) {
  vf c[MR][NV];
  for (int r = 0; r < MR; ++r) for (int v = 0; v < NV; ++v) c[r][v] = (vf){};
  for (int64_t j = j0; j < j1; ++j) {
    vf rv[NV];
    for (int v = 0; v < NV; ++v) rv[v] = ld(R + j * ldr + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const float x = TRANS ? W[j * ldw + i0 + r] : W[(i0 + r) * ldw + j];
      for (int v = 0; v < NV; ++v) c[r][v] += x * rv[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    const float f = rs ? alpha * rs[i0 + r] : alpha;
    for (int v = 0; v < NV; ++v) st(Y + (i0 + r) * ldy + 16 * v, c[r][v] * f);
  }
}

/* all T rows of Y = alpha rs W' R, causally: row i sums j <= i (W' = W) or j >= i (W' = W^T) */
template <int NV, bool TRANS>
static void ab_causal(const float* W, int64_t ldw, const float* R, int64_t ldr, int64_t T, float alpha,
                      const float* rs, float* Y, int64_t ldy) {
  for (int64_t i0 = 0; i0 < T; i0 += 4) {
    const int64_t j0 = TRANS ? i0 : 0, j1 = TRANS ? T : (i0 + 4 < T ? i0 + 4 : T);
    switch (T - i0 < 4 ? T - i0 : 4) {
      case 4: ab_block<NV, 4, TRANS>(W, ldw, R, ldr, j0, j1, alpha, rs, Y, ldy, i0); break;
      case 3: ab_block<NV, 3, TRANS>(W, ldw, R, ldr, j0, j1, alpha, rs, Y, ldy, i0); break;
      case 2: ab_block<NV, 2, TRANS>(W, ldw, R, ldr, j0, j1, alpha, rs, Y, ldy, i0); break;
      default: ab_block<NV, 1, TRANS>(W, ldw, R, ldr, j0, j1, alpha, rs, Y, ldy, i0);
    }
  }
}

/* T rows of hs floats (row stride ld_src) transposed -> cols (hs, Tp), zero past T */
static void gather_cols(const float* src, int64_t T, int64_t ld_src, int64_t hs, float* cols, int64_t Tp) {
  for (int64_t t = 0; t < hs; ++t) {
    float* c = cols + t * Tp;
    for (int64_t j = 0; j < T; ++j) c[j] = src[j * ld_src + t];
    for (int64_t j = T; j < Tp; ++j) c[j] = 0.f;
  }
}

template <int NV>
static void attn_fwd_head(const float* base, int64_t T, int64_t C, float* y, float* lse) {
  const int64_t hs = 16 * NV, Tp = pad16(T);
  float* buf = (float*)malloc((hs * Tp + T * Tp + T) * sizeof(float));
  float *kt = buf, *P = kt + hs * Tp, *inv = P + T * Tp;
  gather_cols(base + C, T, 3 * C, hs, kt, Tp);
  abt_causal(base, 3 * C, kt, Tp, hs, 1.f / sqrtf((float)hs), P, Tp, T);
  for (int64_t i = 0; i < T; ++i) {  /* P = exp(S - max), unnormalised; 1/sum goes to the output */
    float* s = P + i * Tp;
    const int64_t Lp = pad16(i + 1);
    for (int64_t j = i + 1; j < Lp; ++j) s[j] = -INFINITY;
    vf vm = ld(s);
    for (int64_t j = 16; j < Lp; j += 16) { const vf x = ld(s + j); vm = x > vm ? x : vm; }
    const float m = hmax(vm);
    vf acc = {};
    for (int64_t j = 0; j < Lp; j += 16) { const vf e = vexp(ld(s + j) - m); st(s + j, e); acc += e; }
    const float sum = hsum(acc);
    inv[i] = 1.f / sum;
    lse[i] = m + logf(sum);
  }
  ab_causal<NV, false>(P, Tp, base + 2 * C, 3 * C, T, 1.f, inv, y, C);
  free(buf);
}

template <int NV>
static void attn_bwd_head(const float* base, const float* y, const float* lse, const float* dy, int64_t T, int64_t C,
                          float* dbase) {
  const int64_t hs = 16 * NV, Tp = pad16(T);
  const float scale = 1.f / sqrtf((float)hs);
  float* buf = (float*)malloc((2 * hs * Tp + 2 * T * Tp) * sizeof(float));
  float *kt = buf, *vt = kt + hs * Tp, *P = vt + hs * Tp, *dS = P + T * Tp;
  gather_cols(base + C, T, 3 * C, hs, kt, Tp);
  gather_cols(base + 2 * C, T, 3 * C, hs, vt, Tp);
  abt_causal(base, 3 * C, kt, Tp, hs, scale, P, Tp, T);  /* S */
  abt_causal(dy, C, vt, Tp, hs, 1.f, dS, Tp, T);          /* dP */
  for (int64_t i = 0; i < T; ++i) {  /* P = exp(S - lse); dS = P (dP - D), D = dY_i . Y_i */
    vf dd = {};
    for (int v = 0; v < NV; ++v) dd += ld(dy + i * C + 16 * v) * ld(y + i * C + 16 * v);
    const float D = hsum(dd), m = lse[i];
    float *p = P + i * Tp, *ds = dS + i * Tp;
    const int64_t Lp = pad16(i + 1);
    for (int64_t j = i + 1; j < Lp; ++j) p[j] = -INFINITY;
    for (int64_t j = 0; j < Lp; j += 16) {
      const vf e = vexp(ld(p + j) - m);
      st(p + j, e);
      st(ds + j, e * (ld(ds + j) - D));
    }
    for (int64_t j = Lp; j < Tp; ++j) p[j] = ds[j] = 0.f;  /* read by the TRANS sums below */
  }
  ab_causal<NV, false>(dS, Tp, base + C, 3 * C, T, scale, 0, dbase, 3 * C);     /* dQ = s dS K */
  ab_causal<NV, true>(dS, Tp, base, 3 * C, T, scale, 0, dbase + C, 3 * C);      /* dK = s dS^T Q */
  ab_causal<NV, true>(P, Tp, dy, C, T, 1.f, 0, dbase + 2 * C, 3 * C);           /* dV = P^T dY */
  free(buf);
}

/* ---- LayerNorm over the last dim (n rows of C, C a multiple of 16): y = (x - mean) rstd w + b ----
   Keeps mean and rstd per row. Rows are independent; the backward's dw and db are per-thread
   partial sums added at the end. */
extern "C" void ln_fwd(const float* x, const float* w, const float* b, int64_t n, int64_t C, float eps, float* y,
                       float* mean, float* rstd, int nthreads) {
  #pragma omp parallel for schedule(static) num_threads(n * C > 32768 ? nthreads : 1)
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + i * C;
    float* yr = y + i * C;
    vf s = {};
    for (int64_t c = 0; c < C; c += 16) s += ld(xr + c);
    const float m = hsum(s) / C;
    vf ss = {};
    for (int64_t c = 0; c < C; c += 16) { const vf d = ld(xr + c) - m; ss += d * d; }
    const float r = 1.f / sqrtf(hsum(ss) / C + eps);
    for (int64_t c = 0; c < C; c += 16) st(yr + c, (ld(xr + c) - m) * r * ld(w + c) + (b ? ld(b + c) : (vf){}));
    mean[i] = m;
    rstd[i] = r;
  }
}

/* dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w; dw += sum dy xhat; db += sum dy.
   scratch holds nthreads * 2C floats. */
extern "C" void ln_bwd(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                       int64_t n, int64_t C, float* dx, float* dw, float* db, float* scratch, int nthreads) {
  const int nt = n * C > 32768 ? nthreads : 1;
  memset(scratch, 0, (size_t)nt * 2 * C * sizeof(float));
  #pragma omp parallel num_threads(nt)
  {
    float* pw = scratch + (int64_t)omp_get_thread_num() * 2 * C;
    float* pb = pw + C;
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float *xr = x + i * C, *g = dy + i * C;
      const float m = mean[i], r = rstd[i];
      vf sg = {}, sgx = {};
      for (int64_t c = 0; c < C; c += 16) {
        const vf xh = (ld(xr + c) - m) * r, gc = ld(g + c), gw = gc * ld(w + c);
        sg += gw; sgx += gw * xh;
        st(pw + c, ld(pw + c) + gc * xh);
        st(pb + c, ld(pb + c) + gc);
      }
      const float mg = hsum(sg) / C, mgx = hsum(sgx) / C;
      float* d = dx + i * C;
      for (int64_t c = 0; c < C; c += 16)
        st(d + c, r * (ld(g + c) * ld(w + c) - mg - (ld(xr + c) - m) * r * mgx));
    }
  }
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) {
      dw[c] += scratch[t * 2 * C + c];
      if (db) db[c] += scratch[t * 2 * C + C + c];
    }
}

#define BY_NV(call) switch (hs / 16) { case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; \
  case 4: call(4); break; case 5: call(5); break; case 6: call(6); break; case 7: call(7); break; default: call(8); }

/* hs must be a multiple of 16 and at most 128 (the caller checks) */
extern "C" void attn_fwd(const float* qkv, int64_t B, int64_t T, int64_t nh, int64_t hs, float* y, float* lse,
                         int nthreads) {
  const int64_t C = nh * hs;
  #pragma omp parallel for collapse(2) schedule(static) num_threads(B * nh > 1 ? nthreads : 1)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nh; ++h) {
#define FWD(nv) attn_fwd_head<nv>(qkv + b * T * 3 * C + h * hs, T, C, y + b * T * C + h * hs, lse + (b * nh + h) * T)
      BY_NV(FWD)
    }
}

extern "C" void attn_bwd(const float* qkv, const float* y, const float* lse, const float* dy, int64_t B, int64_t T,
                         int64_t nh, int64_t hs, float* dqkv, int nthreads) {
  const int64_t C = nh * hs;
  #pragma omp parallel for collapse(2) schedule(static) num_threads(B * nh > 1 ? nthreads : 1)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nh; ++h) {
#define BWD(nv) attn_bwd_head<nv>(qkv + b * T * 3 * C + h * hs, y + b * T * C + h * hs, lse + (b * nh + h) * T, \
                                  dy + b * T * C + h * hs, T, C, dqkv + b * T * 3 * C + h * hs)
      BY_NV(BWD)
    }
}
"""

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_kernels = Library("llmclock_fused", _SRC, {
    "gelu_fwd": [_ptr, _ptr, _i64, _int, _int],
    "gelu_bwd": [_ptr, _ptr, _ptr, _i64, _int, _int],
    "attn_fwd": [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _int],
    "attn_bwd": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _int],
    "ln_fwd": [_ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float, _ptr, _ptr, _ptr, _int],
    "ln_bwd": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _int],
})
get_lib = _kernels.get
"""The compiled kernels (built on first call), or None where they cannot be built."""


def _ok(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approx: int):
        x = x.contiguous()
        y = torch.empty_like(x)
        get_lib().gelu_fwd(x.data_ptr(), y.data_ptr(), x.numel(), approx, torch.get_num_threads())
        ctx.save_for_backward(x)
        ctx.approx = approx
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        get_lib().gelu_bwd(x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.numel(), ctx.approx, torch.get_num_threads())
        return dx, None


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head: int):
        B, T, C3 = qkv.shape
        hs = C3 // 3 // n_head
        qkv = qkv.contiguous()
        y = torch.empty(B, T, C3 // 3)
        lse = torch.empty(B, n_head, T)
        get_lib().attn_fwd(qkv.data_ptr(), B, T, n_head, hs, y.data_ptr(), lse.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(qkv, y, lse)
        ctx.n_head = n_head
        return y

    @staticmethod
    def backward(ctx, dy):
        qkv, y, lse = ctx.saved_tensors
        B, T, C3 = qkv.shape
        dy = dy.contiguous()
        dqkv = torch.empty_like(qkv)
        get_lib().attn_bwd(qkv.data_ptr(), y.data_ptr(), lse.data_ptr(), dy.data_ptr(), B, T, ctx.n_head,
                      C3 // 3 // ctx.n_head, dqkv.data_ptr(), torch.get_num_threads())
        return dqkv, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        C = x.size(-1)
        x = x.contiguous()
        n = x.numel() // C
        y, mean, rstd = torch.empty_like(x), torch.empty(n), torch.empty(n)
        get_lib().ln_fwd(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None, n, C, eps,
                    y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        C = x.size(-1)
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dw = torch.zeros_like(weight)
        db = torch.zeros_like(weight) if ctx.has_bias else None
        nt = torch.get_num_threads()
        scratch = torch.empty(nt * 2 * C)
        get_lib().ln_bwd(x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dy.data_ptr(),
                         mean.numel(), C, dx.data_ptr(), dw.data_ptr(), db.data_ptr() if db is not None else None,
                         scratch.data_ptr(), nt)
        return dx, dw, db, None


class FusedLayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm through the fused kernel (fp32 CPU, width a multiple of 16), else torch's; the
    same parameters and state dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fusable = len(self.normalized_shape) == 1 and self.normalized_shape[0] % 16 == 0  # the kernel's shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fusable or get_lib() is None or not _ok(x, self.weight):
            return super().forward(x)
        return _LayerNorm.apply(x, self.weight, self.bias, self.eps)

    @classmethod
    def of(cls, ln: torch.nn.LayerNorm) -> "FusedLayerNorm":
        new = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=True, bias=ln.bias is not None)
        new.weight, new.bias = ln.weight, ln.bias  # the same Parameters: optimizers and state dicts see no change
        return new


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """F.gelu(x, approximate=...) through the fused kernel when it applies, else F.gelu."""
    if get_lib() is None or not _ok(x):
        return F.gelu(x, approximate=approximate)
    return _Gelu.apply(x, int(approximate == "tanh"))


def causal_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal softmax attention straight from c_attn's output: (B, T, 3C) -> (B, T, C).

    Equal to splitting q, k, v into heads and calling scaled_dot_product_attention(is_causal=True);
    the kernel takes head sizes that are multiples of 16 up to 128 (GPT-2's is 64), SDPA the rest.
    """
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    if get_lib() is None or not _ok(qkv) or hs % 16 or hs > 128:
        q, k, v = qkv.view(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C3 // 3)
    return _CausalAttention.apply(qkv, n_head)


def fuse_cpu_ops(model: torch.nn.Module) -> bool:
    """Route every block of `model` (a GPT) through the fused kernels; False (model unchanged) when
    they cannot be built or the parameters are not fp32 on the CPU."""
    if get_lib() is None or not all(_ok(p) for p in model.parameters()):
        return False
    for block in model.transformer.h:
        block.attn.fused_attention = causal_attention
        block.mlp.act = gelu
        block.ln_1, block.ln_2 = FusedLayerNorm.of(block.ln_1), FusedLayerNorm.of(block.ln_2)
    model.transformer.ln_f = FusedLayerNorm.of(model.transformer.ln_f)
    return True
