/* Fused CPU kernels for the full-sequence forward and backward (llmclock/fused.py calls them):
   GELU, causal attention over c_attn's output, LayerNorm, and a whole transformer block whose matrix
   products go to the BLAS sgemm inside torch. Why each exists and what it measured: fused.py. */
#include <stdlib.h>
#include <omp.h>
#include "kernels.h"
#include "vec.h"

/* ---- GELU: y = x * Phi(x), exact (erf) or GPT-2's tanh approximation; dx = dy * y'(x) ---- */
static inline vf gelu_grad_v(vf x, int approx) {
  if (approx) {
    const vf e = e_minus_2u(x), s = vrcp(1.f + e);
    return s + 2.f * x * s * (e * s) * 0.7978845608028654f * (1.f + 0.134145f * x * x);
  }
  vf pdf;
  const vf cdf = vphi(x, &pdf);
  return cdf + x * pdf;
}

/* one template for both passes: n elements, VL at a time, the tail through a zero-padded copy */
template <class F>
static inline void elementwise(int64_t n, int nthreads, F f) {
  const int64_t nv = n / VL;
  #pragma omp parallel for schedule(static) num_threads(n > 32768 ? nthreads : 1)
  for (int64_t i = 0; i < nv; ++i) f(VL * i, VL);
  if (n % VL) f(VL * nv, n % VL);
}

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
   (T, Tp) tiles (Tp = T rounded up to the vector width VL); Q, K, V, Y and dY are read in place
   from their (B, T, .) tensors and K^T, V^T copied into (hs, Tp) panels. Two register-blocked
   kernels do every product, 4 output rows at a time: abt (rows against a transposed panel, ABT_NB
   vectors of columns per pass) and ab (weighted sums of rows, or with TRANS of columns of the
   weights, AB_NV vectors of the head's columns per pass). The blocks are sized to the target's
   registers (32 with AVX-512 and NEON, 16 with AVX2 and SSE): 4 x ABT_NB or 4 x AB_NV accumulators
   plus the loads. Causality skips the blocks above the diagonal; masked entries of P and dS are
   exactly 0, so diagonal blocks need no care. */
#ifndef ABT_NB /* (-D overrides, for tuning) */
#if VL == 16
#define ABT_NB 4 /* 64 columns a pass: 16 accumulators */
#define AB_NV 4
#else
#define ABT_NB 3 /* 4 x 3 accumulators, 3 loads and a broadcast fill AVX2's 16 registers */
#define AB_NV 2
#endif
#endif

/* Cm[i, j] = alpha A[i, :] . Bt[:, j] for i in [i0, i0+MR), j in [j0, j0+VL*NB); A (., K) row
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
    for (int q = 0; q < NB; ++q) bv[q] = ld(b + VL * q);
    for (int r = 0; r < MR; ++r) {
      const float x = a[r * lda + k];
      for (int q = 0; q < NB; ++q) c[r][q] += x * bv[q];
    }
  }
  for (int r = 0; r < MR; ++r) for (int q = 0; q < NB; ++q) st(Cm + (i0 + r) * ldc + j0 + VL * q, c[r][q] * alpha);
}

/* the last nb < ABT_NB vectors of columns, from j0 */
template <int MR, int NB>
static inline void abt_tail(int64_t nb, const float* A, int64_t lda, const float* Bt, int64_t ldb, int64_t K,
                            float alpha, float* Cm, int64_t ldc, int64_t i0, int64_t j0) {
  if constexpr (NB > 0) {
    if (nb == NB) abt_block<MR, NB>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, j0);
    else abt_tail<MR, NB - 1>(nb, A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, j0);
  }
}

/* rows [i0, i0+MR) of Cm, columns [0, ncols), ncols a multiple of VL */
template <int MR>
static void abt_rows(const float* A, int64_t lda, const float* Bt, int64_t ldb, int64_t K, float alpha, float* Cm,
                     int64_t ldc, int64_t i0, int64_t ncols) {
  int64_t j0 = 0;
  for (; j0 + ABT_NB * VL <= ncols; j0 += ABT_NB * VL) abt_block<MR, ABT_NB>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, j0);
  abt_tail<MR, ABT_NB - 1>((ncols - j0) / VL, A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, j0);
}

/* the causal part of Cm = alpha A Bt: for each block of 4 rows, the columns up to its diagonal */
static void abt_causal(const float* A, int64_t lda, const float* Bt, int64_t ldb, int64_t K, float alpha, float* Cm,
                       int64_t ldc, int64_t T) {
  int64_t i0 = 0;
  for (; i0 + 4 <= T; i0 += 4) abt_rows<4>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, padv(i0 + 4));
  switch (T - i0) {
    case 3: abt_rows<3>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, padv(T)); break;
    case 2: abt_rows<2>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, padv(T)); break;
    case 1: abt_rows<1>(A, lda, Bt, ldb, K, alpha, Cm, ldc, i0, padv(T)); break;
  }
}

/* Y[i, :VL*NV] = alpha rs[i] sum_{j in [j0, j1)} W'[i, j] R[j, :VL*NV] for i in [i0, i0+MR), where
   W' = W, or W^T with TRANS; R rows with stride ldr; rs (row scales) may be null. */
template <int NV, int MR, bool TRANS>
static inline void ab_block(const float* W, int64_t ldw, const float* R, int64_t ldr, int64_t j0, int64_t j1,
                            float alpha, const float* rs, float* Y, int64_t ldy, int64_t i0) {
  vf c[MR][NV];
  for (int r = 0; r < MR; ++r) for (int v = 0; v < NV; ++v) c[r][v] = (vf){};
  for (int64_t j = j0; j < j1; ++j) {
    vf rv[NV];
    for (int v = 0; v < NV; ++v) rv[v] = ld(R + j * ldr + VL * v);
    for (int r = 0; r < MR; ++r) {
      const float x = TRANS ? W[j * ldw + i0 + r] : W[(i0 + r) * ldw + j];
      for (int v = 0; v < NV; ++v) c[r][v] += x * rv[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    const float f = rs ? alpha * rs[i0 + r] : alpha;
    for (int v = 0; v < NV; ++v) st(Y + (i0 + r) * ldy + VL * v, c[r][v] * f);
  }
}

/* rows [i0, i0+MR) of Y, all hs columns, AB_NV vectors at a time (nv < AB_NV in the tail) */
template <int MR, bool TRANS, int NV = AB_NV>
static inline void ab_cols(const float* W, int64_t ldw, const float* R, int64_t ldr, int64_t hs, int64_t j0,
                           int64_t j1, float alpha, const float* rs, float* Y, int64_t ldy, int64_t i0) {
  if constexpr (NV == AB_NV) {
    int64_t c = 0;
    for (; c + AB_NV * VL <= hs; c += AB_NV * VL)
      ab_block<AB_NV, MR, TRANS>(W, ldw, R + c, ldr, j0, j1, alpha, rs, Y + c, ldy, i0);
    if (c < hs) ab_cols<MR, TRANS, AB_NV - 1>(W, ldw, R + c, ldr, hs - c, j0, j1, alpha, rs, Y + c, ldy, i0);
  } else if constexpr (NV > 0) {
    if (hs == NV * VL) ab_block<NV, MR, TRANS>(W, ldw, R, ldr, j0, j1, alpha, rs, Y, ldy, i0);
    else ab_cols<MR, TRANS, NV - 1>(W, ldw, R, ldr, hs, j0, j1, alpha, rs, Y, ldy, i0);
  }
}

/* all T rows of Y = alpha rs W' R (hs columns, a multiple of VL), causally: row i sums j <= i
   (W' = W) or j >= i (W' = W^T) */
template <bool TRANS>
static void ab_causal(const float* W, int64_t ldw, const float* R, int64_t ldr, int64_t T, int64_t hs, float alpha,
                      const float* rs, float* Y, int64_t ldy) {
  for (int64_t i0 = 0; i0 < T; i0 += 4) {
    const int64_t j0 = TRANS ? i0 : 0, j1 = TRANS ? T : (i0 + 4 < T ? i0 + 4 : T);
    switch (T - i0 < 4 ? T - i0 : 4) {
      case 4: ab_cols<4, TRANS>(W, ldw, R, ldr, hs, j0, j1, alpha, rs, Y, ldy, i0); break;
      case 3: ab_cols<3, TRANS>(W, ldw, R, ldr, hs, j0, j1, alpha, rs, Y, ldy, i0); break;
      case 2: ab_cols<2, TRANS>(W, ldw, R, ldr, hs, j0, j1, alpha, rs, Y, ldy, i0); break;
      default: ab_cols<1, TRANS>(W, ldw, R, ldr, hs, j0, j1, alpha, rs, Y, ldy, i0);
    }
  }
}

/* row i of a score tile: -inf after the diagonal, in the VL columns ending at Lp = padv(i + 1). One
   vector store, so the vector loads that follow are forwarded from it (scalar stores would stall them). */
static inline void causal_mask(float* row, int64_t Lp, int64_t i) {
  vf lane;
  for (int l = 0; l < VL; ++l) lane[l] = (float)l;
  const int64_t j0 = Lp - VL;
  st(row + j0, lane + (float)j0 > (float)i ? splat(-INFINITY) : ld(row + j0));
}

/* T rows of hs floats (row stride ld_src) transposed -> cols (hs, Tp), zero past T */
static void gather_cols(const float* src, int64_t T, int64_t ld_src, int64_t hs, float* cols, int64_t Tp) {
  for (int64_t t = 0; t < hs; ++t) {
    float* c = cols + t * Tp;
    for (int64_t j = 0; j < T; ++j) c[j] = src[j * ld_src + t];
    for (int64_t j = T; j < Tp; ++j) c[j] = 0.f;
  }
}

/* HS, the head size, a compile-time constant: the products' inner loops over it unroll (measured 1.4x
   on the attention with AVX-512) */
template <int HS>
static void attn_fwd_head(const float* base, int64_t T, int64_t C, float* y, float* lse) {
  const int64_t hs = HS;
  const int64_t Tp = padv(T);
  float* buf = (float*)malloc((hs * Tp + T * Tp + T) * sizeof(float));
  float *kt = buf, *P = kt + hs * Tp, *inv = P + T * Tp;
  gather_cols(base + C, T, 3 * C, hs, kt, Tp);
  abt_causal(base, 3 * C, kt, Tp, hs, 1.f / sqrtf((float)hs), P, Tp, T);
  for (int64_t i = 0; i < T; ++i) {  /* P = exp(S - max), unnormalised; 1/sum goes to the output */
    float* s = P + i * Tp;
    const int64_t Lp = padv(i + 1);
    causal_mask(s, Lp, i);
    vf vm = ld(s);
    for (int64_t j = VL; j < Lp; j += VL) { const vf x = ld(s + j); vm = x > vm ? x : vm; }
    const float m = hmax(vm);
    vf acc = {};
    for (int64_t j = 0; j < Lp; j += VL) { const vf e = vexp(ld(s + j) - m); st(s + j, e); acc += e; }
    const float sum = hsum(acc);
    inv[i] = 1.f / sum;
    lse[i] = m + logf(sum);
  }
  ab_causal<false>(P, Tp, base + 2 * C, 3 * C, T, hs, 1.f, inv, y, C);
  free(buf);
}

template <int HS>
static void attn_bwd_head(const float* base, const float* y, const float* lse, const float* dy, int64_t T, int64_t C,
                          float* dbase) {
  const int64_t hs = HS;
  const int64_t Tp = padv(T);
  const float scale = 1.f / sqrtf((float)hs);
  float* buf = (float*)malloc((2 * hs * Tp + 2 * T * Tp) * sizeof(float));
  float *kt = buf, *vt = kt + hs * Tp, *P = vt + hs * Tp, *dS = P + T * Tp;
  gather_cols(base + C, T, 3 * C, hs, kt, Tp);
  gather_cols(base + 2 * C, T, 3 * C, hs, vt, Tp);
  abt_causal(base, 3 * C, kt, Tp, hs, scale, P, Tp, T);  /* S */
  abt_causal(dy, C, vt, Tp, hs, 1.f, dS, Tp, T);          /* dP */
  for (int64_t i = 0; i < T; ++i) {  /* P = exp(S - lse); dS = P (dP - D), D = dY_i . Y_i */
    vf dd = {};
    for (int64_t c = 0; c < hs; c += VL) dd += ld(dy + i * C + c) * ld(y + i * C + c);
    const float D = hsum(dd), m = lse[i];
    float *p = P + i * Tp, *ds = dS + i * Tp;
    const int64_t Lp = padv(i + 1);
    causal_mask(p, Lp, i);
    for (int64_t j = 0; j < Lp; j += VL) {
      const vf e = vexp(ld(p + j) - m);
      st(p + j, e);
      st(ds + j, e * (ld(ds + j) - D));
    }
    for (int64_t j = Lp; j < Tp; j += VL) { st(p + j, (vf){}); st(ds + j, (vf){}); }  /* defined, never read as garbage */
  }
  ab_causal<false>(dS, Tp, base + C, 3 * C, T, hs, scale, 0, dbase, 3 * C);     /* dQ = s dS K */
  ab_causal<true>(dS, Tp, base, 3 * C, T, hs, scale, 0, dbase + C, 3 * C);      /* dK = s dS^T Q */
  ab_causal<true>(P, Tp, dy, C, T, hs, 1.f, 0, dbase + 2 * C, 3 * C);           /* dV = P^T dY */
  free(buf);
}

/* ---- LayerNorm over the last dim (n rows of C, C a multiple of 16, so of VL): y = (x - mean) rstd w + b ----
   Keeps mean and rstd per row. Rows are independent; the backward's dw and db are per-thread
   partial sums added at the end. */
extern "C" void ln_fwd(const float* x, const float* w, const float* b, int64_t n, int64_t C, float eps, float* y,
                       float* mean, float* rstd, int nthreads) {
  #pragma omp parallel for schedule(static) num_threads(n * C > 32768 ? nthreads : 1)
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + i * C;
    float* yr = y + i * C;
    vf s = {}, s1 = {};  /* two chains of adds */
    int64_t c = 0;
    for (; c + 2 * VL <= C; c += 2 * VL) { s += ld(xr + c); s1 += ld(xr + c + VL); }
    if (c < C) s += ld(xr + c);
    const float m = hsum(s + s1) / C;
    vf ss = {}, ss1 = {};
    for (c = 0; c + 2 * VL <= C; c += 2 * VL) {
      const vf d = ld(xr + c) - m, d1 = ld(xr + c + VL) - m;
      ss += d * d; ss1 += d1 * d1;
    }
    if (c < C) { const vf d = ld(xr + c) - m; ss += d * d; }
    const float r = 1.f / sqrtf(hsum(ss + ss1) / C + eps);
    for (c = 0; c < C; c += VL) st(yr + c, (ld(xr + c) - m) * r * ld(w + c) + (b ? ld(b + c) : (vf){}));
    mean[i] = m;
    rstd[i] = r;
  }
}

/* dx = dres + rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w (dres, the gradient arriving by
   a residual path, may be null); dw += sum dy xhat; db += sum dy. scratch holds nthreads * 2C floats. */
extern "C" void ln_bwd(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                       const float* dres, int64_t n, int64_t C, float* dx, float* dw, float* db, float* scratch,
                       int nthreads) {
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
      for (int64_t c = 0; c < C; c += VL) {
        const vf xh = (ld(xr + c) - m) * r, gc = ld(g + c), gw = gc * ld(w + c);
        sg += gw; sgx += gw * xh;
        st(pw + c, ld(pw + c) + gc * xh);
        st(pb + c, ld(pb + c) + gc);
      }
      const float mg = hsum(sg) / C, mgx = hsum(sgx) / C;
      float* d = dx + i * C;
      const float* res = dres ? dres + i * C : 0;
      for (int64_t c = 0; c < C; c += VL)
        st(d + c, (res ? ld(res + c) : (vf){}) + r * (ld(g + c) * ld(w + c) - mg - (ld(xr + c) - m) * r * mgx));
    }
  }
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) {
      dw[c] += scratch[t * 2 * C + c];
      if (db) db[c] += scratch[t * 2 * C + C + c];
    }
}

#define BY_HS(call) switch (hs / 16) { case 1: call(16); break; case 2: call(32); break; case 3: call(48); break; \
  case 4: call(64); break; case 5: call(80); break; case 6: call(96); break; case 7: call(112); break; default: call(128); }

/* hs must be a multiple of 16 and at most 128 (the caller checks) */
extern "C" void attn_fwd(const float* qkv, int64_t B, int64_t T, int64_t nh, int64_t hs, float* y, float* lse,
                         int nthreads) {
  const int64_t C = nh * hs;
  #pragma omp parallel for collapse(2) schedule(static) num_threads(B * nh > 1 ? nthreads : 1)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nh; ++h) {
#define FWD(HS) attn_fwd_head<HS>(qkv + b * T * 3 * C + h * hs, T, C, y + b * T * C + h * hs, lse + (b * nh + h) * T)
      BY_HS(FWD)
    }
}

extern "C" void attn_bwd(const float* qkv, const float* y, const float* lse, const float* dy, int64_t B, int64_t T,
                         int64_t nh, int64_t hs, float* dqkv, int nthreads) {
  const int64_t C = nh * hs;
  #pragma omp parallel for collapse(2) schedule(static) num_threads(B * nh > 1 ? nthreads : 1)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nh; ++h) {
#define BWD(HS) attn_bwd_head<HS>(qkv + b * T * 3 * C + h * hs, y + b * T * C + h * hs, lse + (b * nh + h) * T, \
                                  dy + b * T * C + h * hs, T, C, dqkv + b * T * 3 * C + h * hs)
      BY_HS(BWD)
    }
}

/* ---- one transformer block, forward and backward, in one call each ----
   x1 = x + Proj(Attn(LN1(x))),  out = x1 + Fc2(GELU(Fc(LN2(x1)))), every Linear y = a W^T + b with W
   (out, in) as nn.Linear stores it. Matrix products go to the BLAS sgemm that torch itself uses
   (handed over by set_sgemm, Fortran interface, column-major), the rest to the kernels above.
   p[] holds the 12 parameters in Block's order (ln_1.w, ln_1.b, c_attn.w, c_attn.b, attn.c_proj.w,
   attn.c_proj.b, ln_2.w, ln_2.b, c_fc.w, c_fc.b, mlp.c_proj.w, mlp.c_proj.b; biases may be null).
   The forward keeps in s (the caller's buffer, block_saved_floats long) what the backward reads. */
typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
static sgemm_fn SGEMM = 0;
extern "C" void set_sgemm(void* f) { SGEMM = (sgemm_fn)f; }
extern "C" int has_sgemm() { return SGEMM != 0; }

/* row-major C (M, N) = A (M, K) W^T (+ C if beta), W (N, K): column-major C^T = W A^T */
static void mm_abt(int M, int N, int K, const float* A, const float* W, float* C, float beta) {
  const char t = 'T', n = 'N';
  const float one = 1.f;
  SGEMM(&t, &n, &N, &M, &K, &one, W, &K, A, &K, &beta, C, &N);
}
/* row-major C (M, N) = A (M, K) W, W (K, N) */
static void mm_ab(int M, int N, int K, const float* A, const float* W, float* C) {
  const char n = 'N';
  const float one = 1.f, zero = 0.f;
  SGEMM(&n, &n, &N, &M, &K, &one, W, &N, A, &K, &zero, C, &N);
}
/* row-major G (N, K) = D^T X, D (M, N), X (M, K): the weight gradient */
static void mm_atb(int M, int N, int K, const float* D, const float* X, float* G) {
  const char t = 'T', n = 'N';
  const float one = 1.f, zero = 0.f;
  SGEMM(&n, &t, &K, &N, &M, &one, X, &K, D, &N, &zero, G, &K);
}
/* y rows = (res rows or 0) + b (n rows of N); b null: a copy of res, or zeros */
static void rows_plus_bias(float* y, const float* res, const float* b, int64_t n, int64_t N, int nthreads) {
  #pragma omp parallel for schedule(static) num_threads(n * N > 32768 ? nthreads : 1)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < N; c += VL) {
      const int64_t m = N - c < VL ? N - c : VL;
      stn(y + i * N + c, (res ? ldn(res + i * N + c, m) : (vf){}) + (b ? ldn(b + c, m) : (vf){}), m);
    }
}
/* db = column sums of d (n rows of N); per-thread partials in scratch (nthreads * N floats) */
static void colsum(const float* d, int64_t n, int64_t N, float* db, float* scratch, int nthreads) {
  const int nt = n * N > 32768 ? nthreads : 1;
  memset(scratch, 0, (size_t)nt * N * sizeof(float));
  #pragma omp parallel num_threads(nt)
  {
    float* part = scratch + (int64_t)omp_get_thread_num() * N;
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < N; c += VL) {
        const int64_t m = N - c < VL ? N - c : VL;
        stn(part + c, ldn(part + c, m) + ldn(d + i * N + c, m), m);
      }
  }
  for (int64_t c = 0; c < N; ++c) {
    float acc = 0.f;
    for (int t = 0; t < nt; ++t) acc += scratch[t * N + c];
    db[c] = acc;
  }
}

/* a Linear's backward, y = x W^T (+ b) with W (out, in) over n rows: dW = dy^T x (and db), dx = dy W.
   (Running the two products side by side, one thread each, measured no faster than one after the
   other with both threads each.) */
static void linear_bwd(int n, int out, int in, const float* dy, const float* x, const float* W, float* dW, float* db,
                       float* dx, float* scratch, int nthreads) {
  mm_atb(n, out, in, dy, x, dW);
  if (db) colsum(dy, n, out, db, scratch, nthreads);
  mm_ab(n, in, out, dy, W, dx);
}

/* the saved activations, in floats: l1 x1 l2 att (n C each), qkv (n 3C), h g (n 4C each),
   mean/rstd of both norms (4n), lse (B nh T = n nh) */
extern "C" int64_t block_saved_floats(int64_t B, int64_t T, int64_t C, int64_t nh) {
  const int64_t n = B * T;
  return n * (4 * C + 3 * C + 8 * C + 4 + nh);
}
struct Saved { float *l1, *x1, *l2, *att, *qkv, *h, *g, *m1, *r1, *m2, *r2, *lse; };
static Saved carve(float* s, int64_t n, int64_t C) {
  Saved v;
  v.l1 = s; v.x1 = v.l1 + n * C; v.l2 = v.x1 + n * C; v.att = v.l2 + n * C; v.qkv = v.att + n * C;
  v.h = v.qkv + 3 * n * C; v.g = v.h + 4 * n * C; v.m1 = v.g + 4 * n * C; v.r1 = v.m1 + n; v.m2 = v.r1 + n;
  v.r2 = v.m2 + n; v.lse = v.r2 + n;
  return v;
}

extern "C" void block_fwd(const float* x, const float* const* p, int64_t B, int64_t T, int64_t C, int64_t nh,
                          float eps, int approx, float* out, float* s, int nthreads) {
  const int64_t n = B * T;
  const int N = (int)n, c = (int)C;
  const Saved v = carve(s, n, C);
  ln_fwd(x, p[0], p[1], n, C, eps, v.l1, v.m1, v.r1, nthreads);
  if (p[3]) rows_plus_bias(v.qkv, 0, p[3], n, 3 * C, nthreads);
  mm_abt(N, 3 * c, c, v.l1, p[2], v.qkv, p[3] ? 1.f : 0.f);
  attn_fwd(v.qkv, B, T, nh, C / nh, v.att, v.lse, nthreads);
  rows_plus_bias(v.x1, x, p[5], n, C, nthreads);
  mm_abt(N, c, c, v.att, p[4], v.x1, 1.f);
  ln_fwd(v.x1, p[6], p[7], n, C, eps, v.l2, v.m2, v.r2, nthreads);
  if (p[9]) rows_plus_bias(v.h, 0, p[9], n, 4 * C, nthreads);
  mm_abt(N, 4 * c, c, v.l2, p[8], v.h, p[9] ? 1.f : 0.f);
  gelu_fwd(v.h, v.g, n * 4 * C, approx, nthreads);
  rows_plus_bias(out, v.x1, p[11], n, C, nthreads);
  mm_abt(N, c, 4 * c, v.g, p[10], out, 1.f);
}

/* the backward's scratch, in floats: dh (n 4C), dqkv (n 3C), dl (n C), and nthreads 4C for the
   per-thread partial sums of the bias and LayerNorm gradients */
extern "C" int64_t block_work_floats(int64_t B, int64_t T, int64_t C, int nthreads) {
  return B * T * 8 * C + (int64_t)nthreads * 4 * C;
}
/* dout (n, C) -> dx (n, C) and the 12 gradients in gr[] (Block's order; a null bias has a null
   gradient); work is block_work_floats long. */
extern "C" void block_bwd(const float* x, const float* const* p, const float* s, const float* dout, int64_t B,
                          int64_t T, int64_t C, int64_t nh, int approx, float* dx, float* const* gr, float* work,
                          int nthreads) {
  const int64_t n = B * T;
  const int N = (int)n, c = (int)C;
  const Saved v = carve((float*)s, n, C);
  float *dh = work, *dqkv = dh + 4 * n * C, *dl = dqkv + 3 * n * C, *scratch = dl + n * C;
  float *dx1 = dx, *datt = dl;  /* dx holds dx1 until the last step adds LN1's part in place */
  /* out = x1 + g Wq^T + bq */
  linear_bwd(N, c, 4 * c, dout, v.g, p[10], gr[10], gr[11], dh, scratch, nthreads);
  gelu_bwd(v.h, dh, dh, n * 4 * C, approx, nthreads);
  /* h = l2 Wf^T + bf */
  linear_bwd(N, 4 * c, c, dh, v.l2, p[8], gr[8], gr[9], dl, scratch, nthreads);
  memset(gr[6], 0, C * sizeof(float));
  if (gr[7]) memset(gr[7], 0, C * sizeof(float));
  ln_bwd(v.x1, p[6], v.m2, v.r2, dl, dout, n, C, dx1, gr[6], gr[7], scratch, nthreads);
  /* x1 = x + att Wp^T + bp */
  linear_bwd(N, c, c, dx1, v.att, p[4], gr[4], gr[5], datt, scratch, nthreads);
  attn_bwd(v.qkv, v.att, v.lse, datt, B, T, nh, C / nh, dqkv, nthreads);
  /* qkv = l1 Wa^T + ba */
  linear_bwd(N, 3 * c, c, dqkv, v.l1, p[2], gr[2], gr[3], dl, scratch, nthreads);
  memset(gr[0], 0, C * sizeof(float));
  if (gr[1]) memset(gr[1], 0, C * sizeof(float));
  ln_bwd(x, p[0], v.m1, v.r1, dl, dx1, n, C, dx, gr[0], gr[1], scratch, nthreads);
}
