/* Decode kernels (llmclock/engine/kernels.py calls them): a panel-packed fp32 GEMV / small GEMM with
   bias, GELU and a residual add fused into its store, decode attention that writes the cache and
   attends per slot, a whole transformer block for one decode step, and a streaming read for the
   bandwidth probe. Why and what they measured: engine/kernels.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#include "vec.h"
typedef float v16 __attribute__((vector_size(64), aligned(4)));
#if defined(__AVX512F__)
#define SW 16
#elif defined(__AVX__)
#define SW 8
#else
#define SW 4
#endif
typedef float vw __attribute__((vector_size(SW * 4), aligned(4)));  /* the native vector width */
#define P 32
#define PF 1024 /* software prefetch distance (floats): +10% M=1, +25% M=8 */

/* the finished sums of MR rows (r, MR x 32) -> y[0:MR, 0:nj], with bias, GELU and the residual add */
static inline void store_rows(int MR, const float* r, const float* bias, float* y, int64_t ldy, int nj, int gelu,
                              int acc) {
  for (int m = 0; m < MR; ++m) epilogue(r + m * P, bias, y + m * ldy, nj, gelu, acc);
}

#if defined(__AVX512F__)
/* AVX-512: a panel row is two registers; up to 8 rows share each weight load, two k-steps in flight
   (4 independent FMA chains per row), 32 accumulators in the 32 zmm registers. */
#define MR_MAX 8
template <int MR>
static inline void panel_rows(const float* x, int64_t ldx, int64_t K, const float* wp, const float* bias, float* y,
                              int64_t ldy, int nj, int gelu, int acc) {
  v16 a0[MR], a1[MR], c0[MR], c1[MR];
  for (int m = 0; m < MR; ++m) a0[m] = a1[m] = c0[m] = c1[m] = (v16){0};
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
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
  float r[MR * P];
  for (int m = 0; m < MR; ++m) {
    const v16 s0 = a0[m] + c0[m], s1 = a1[m] + c1[m];
    memcpy(r + m * P, &s0, 64); memcpy(r + m * P + 16, &s1, 64);
  }
  store_rows(MR, r, bias, y, ldy, nj, gelu, acc);
}
#else
/* Narrower vectors (AVX2: 8 floats, SSE / NEON: 4): a panel row is P / VW registers, and as many
   rows share each weight load as keep the accumulators in the 16 registers (a 64-byte vector type
   here would be split by the compiler through memory, ~10x slower). */
#if defined(__AVX__)
#define VW 8
#define MR_MAX 3
#else
#define VW 4
#define MR_MAX 2
#endif
typedef float vn __attribute__((vector_size(VW * 4), aligned(4)));
#define NV (P / VW)
template <int MR>
static inline void panel_rows(const float* x, int64_t ldx, int64_t K, const float* wp, const float* bias, float* y,
                              int64_t ldy, int nj, int gelu, int acc) {
  vn a[MR][NV];
  for (int m = 0; m < MR; ++m) for (int v = 0; v < NV; ++v) a[m][v] = (vn){0};
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(wp + k * P + PF); __builtin_prefetch(wp + k * P + PF + 16);
    vn w[NV];
    for (int v = 0; v < NV; ++v) w[v] = *(const vn*)(wp + k * P + v * VW);
    for (int m = 0; m < MR; ++m) {
      const float u = x[m * ldx + k];
      for (int v = 0; v < NV; ++v) a[m][v] += u * w[v];
    }
  }
  float r[MR * P];
  for (int m = 0; m < MR; ++m) for (int v = 0; v < NV; ++v) memcpy(r + m * P + v * VW, &a[m][v], VW * 4);
  store_rows(MR, r, bias, y, ldy, nj, gelu, acc);
}
#endif

/* y (M, N) (=|+=) act(x (M, K) W^T + bias), W packed as panels of 32 output columns (K, 32) each;
   the panels are split over the threads, up to MR_MAX rows per pass over a panel. */
extern "C" void linear_panels(const float* x, int64_t M, int64_t ldx, int64_t K,
                              const float* wp, int64_t N, const float* bias, float* y,
                              int64_t ldy, int gelu, int acc, int nthreads) {
  const int64_t np = (N + P - 1) / P;
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t p = 0; p < np; ++p) {
    const float* w = wp + p * K * P;
    const int nj = (int)(N - p * P < P ? N - p * P : P);
    const float* b = bias ? bias + p * P : 0;
    for (int64_t m0 = 0; m0 < M; m0 += MR_MAX) {
      const float* xr = x + m0 * ldx; float* yr = y + m0 * ldy + p * P;
      switch (M - m0 < MR_MAX ? M - m0 : MR_MAX) {
#define R(n) case n: panel_rows<n>(xr, ldx, K, w, b, yr, ldy, nj, gelu, acc); break;
#if MR_MAX == 8
        R(1) R(2) R(3) R(4) R(5) R(6) R(7) default: R(8)
#elif MR_MAX == 3
        R(1) R(2) default: R(3)
#else
        R(1) default: R(2)
#endif
#undef R
      }
    }
  }
}

/* softmax(q K[0..L)^T * scale) V[0..L) for one head: the plain loops (any head size) */
static void attend_head(const float* q, const float* K, const float* V, int64_t L, int64_t hs, float scale,
                        float* out) {
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
  for (int64_t t = 0; t < hs; ++t) out[t] = 0.f;
  for (int64_t j = 0; j < L; ++j) {
    const float p = s[j] / sum;
    for (int64_t t = 0; t < hs; ++t) out[t] += p * V[j * hs + t];
  }
}

/* the same on vectors, for a head size that is a multiple of VL (GPT-2: 64): q and the output
   row in registers, scores reduced per position, the softmax's exp VL positions at a time */
static void attend_head_v(const float* q, const float* K, const float* V, int64_t L, int64_t hs, float scale,
                          float* out) {
  const int64_t nv = hs / VL, Lp = padv(L);
  vf qv[16], o[16];
  for (int64_t i = 0; i < nv; ++i) { qv[i] = ld(q + i * VL) * scale; o[i] = splat(0.f); }
  float* s = (float*)__builtin_alloca(Lp * sizeof(float));
  for (int64_t j = 0; j < L; ++j) {
    vf d = qv[0] * ld(K + j * hs);
    for (int64_t i = 1; i < nv; ++i) d += qv[i] * ld(K + j * hs + i * VL);
    s[j] = hsum(d);
  }
  for (int64_t j = L; j < Lp; ++j) s[j] = -INFINITY;  /* exp(-inf) = 0: the padding adds nothing */
  vf m = ld(s);
  for (int64_t j = VL; j < Lp; j += VL) { const vf t = ld(s + j); m = t > m ? t : m; }
  const float mx = hmax(m);
  vf acc = splat(0.f);
  for (int64_t j = 0; j < Lp; j += VL) { const vf e = vexp(ld(s + j) - mx); st(s + j, e); acc += e; }
  const float inv = 1.f / hsum(acc);
  for (int64_t j = 0; j < L; ++j) {
    const vf p = splat(s[j]);
    for (int64_t i = 0; i < nv; ++i) o[i] += p * ld(V + j * hs + i * VL);
  }
  for (int64_t i = 0; i < nv; ++i) st(out + i * VL, o[i] * inv);
}

/* One decode step of attention for rows b < n, row b in cache slot s = slots[b] (b where slots is
   null): write row b's key and value at position pos[b] of slot s, then
   y[b] = softmax(q K[0..pos[b]]^T / sqrt(hs)) V[0..pos[b]] per head over that slot's history.
   qkv is (n, 3C) as c_attn produces it; kc, vc are (slots, nh, max_len, hs) contiguous. Each row
   sees exactly its own history, so slots at different positions need no mask. Every row's key and
   value are written before any row attends, so rows of one slot at consecutive positions (a short
   prompt prefilled as rows) attend causally. Above 16384 floats of history the (row, head) pairs are
   split over the threads. */
extern "C" void attend_decode(const float* qkv, int64_t n, int64_t nh, int64_t hs, float* kc, float* vc,
                              int64_t max_len, const int64_t* pos, const int64_t* slots, float* y, int nthreads) {
  const int64_t C = nh * hs;
  const float scale = 1.0f / sqrtf((float)hs);
  int64_t work = 0;
  for (int64_t b = 0; b < n; ++b) work += (pos[b] + 1) * C;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t slot = slots ? slots[b] : b;
    for (int64_t h = 0; h < nh; ++h) {
      const float* q = qkv + b * 3 * C + h * hs;
      memcpy(kc + ((slot * nh + h) * max_len + pos[b]) * hs, q + C, hs * sizeof(float));
      memcpy(vc + ((slot * nh + h) * max_len + pos[b]) * hs, q + 2 * C, hs * sizeof(float));
    }
  }
  #pragma omp parallel for collapse(2) schedule(static) num_threads(work > 16384 ? nthreads : 1)
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t h = 0; h < nh; ++h) {
      const float* q = qkv + b * 3 * C + h * hs;
      const int64_t slot = slots ? slots[b] : b;
      const float* K = kc + (slot * nh + h) * max_len * hs;
      const float* V = vc + (slot * nh + h) * max_len * hs;
      float* out = y + b * C + h * hs;
      if (hs % VL == 0 && hs <= 16 * VL) attend_head_v(q, K, V, pos[b] + 1, hs, scale, out);
      else attend_head(q, K, V, pos[b] + 1, hs, scale, out);
    }
  }
}

/* y = LayerNorm(x) over rows of C (any C): two passes over each row, in float */
extern "C" void layer_norm_rows(const float* x, const float* w, const float* b, int64_t n, int64_t C, float eps,
                                float* y) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + i * C;
    float* yr = y + i * C;
    float s = 0.f;
    for (int64_t c = 0; c < C; ++c) s += xr[c];
    const float m = s / C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += (xr[c] - m) * (xr[c] - m);
    const float r = 1.f / sqrtf(ss / C + eps);
    for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - m) * r * w[c] + (b ? b[c] : 0.f);
  }
}

/* decode_block: one decode step of a whole transformer block for rows b < n (row b in cache slot slots[b], or b
   where slots is null, at position pos[b]), the residual stream x (n, C) updated in place:
     x += c_proj(attend(c_attn(LN1(x))))   (each row's key and value written at pos[b] first)
     x += mlp.c_proj(GELU(c_fc(LN2(x))))
   w[] holds ln_1.w, ln_1.b, c_attn panels, c_attn.b, attn.c_proj panels, attn.c_proj.b, ln_2.w,
   ln_2.b, c_fc panels, c_fc.b, mlp.c_proj panels, mlp.c_proj.b (panels as make_linear packs them;
   biases may be null); the MLP is H wide; gelu: 1 tanh form, 2 exact. kc, vc are this layer's
   (slots, nh, max_len, hs) caches; work holds n (5C + H) floats.
   Each of the four linears (i = 0 c_attn, 1 attn.c_proj, 2 c_fc, 3 mlp.c_proj) in
   its own format fmt[i]: -1 fp32 panels, else quant_linear's (0 bf16, 1 int8, 2 int4, with
   scales[i] and group[i]). */
static void block_linear(int fmt, const void* wp, const float* scales, int64_t group, const float* x, int64_t n,
                         int64_t K, int64_t N, const float* bias, float* y, int gelu, int acc, int nthreads) {
  if (fmt < 0) linear_panels(x, n, K, K, (const float*)wp, N, bias, y, N, gelu, acc, nthreads);
  else quant_linear(fmt, x, n, K, K, wp, scales, group, N, bias, y, N, gelu, acc, nthreads);
}

extern "C" void decode_block(float* x, const void* const* w, const int* fmt, const float* const* scales,
                               const int64_t* group, int64_t n, int64_t C, int64_t H, int64_t nh, float eps1,
                               float eps2, int gelu, float* kc, float* vc, int64_t max_len, const int64_t* pos,
                               const int64_t* slots, float* work, int nthreads) {
  float *l = work, *qkv = l + n * C, *att = qkv + 3 * n * C, *h = att + n * C;  /* (n, C) (n, 3C) (n, C) (n, H) */
  const float* const* f = (const float* const*)w;
  layer_norm_rows(x, f[0], f[1], n, C, eps1, l);
  block_linear(fmt[0], w[2], scales[0], group[0], l, n, C, 3 * C, f[3], qkv, 0, 0, nthreads);
  attend_decode(qkv, n, nh, C / nh, kc, vc, max_len, pos, slots, att, nthreads);
  block_linear(fmt[1], w[4], scales[1], group[1], att, n, C, C, f[5], x, 0, 1, nthreads);
  layer_norm_rows(x, f[6], f[7], n, C, eps2, l);
  block_linear(fmt[2], w[8], scales[2], group[2], l, n, C, H, f[9], h, gelu, 0, nthreads);
  block_linear(fmt[3], w[10], scales[3], group[3], h, n, H, C, f[11], x, 0, 1, nthreads);
}

/* the sum of n floats (n a multiple of 4096), read once at the widest native vector width */
extern "C" double stream_sum(const float* p, int64_t n, int nthreads) {
  double s = 0;
  #pragma omp parallel for reduction(+:s) schedule(static) num_threads(nthreads)
  for (int64_t c = 0; c < n / 4096; ++c) {
    vw a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    const float* q = p + c * 4096;
    for (int i = 0; i < 4096; i += 4 * SW) {
      a0 += *(const vw*)(q + i); a1 += *(const vw*)(q + i + SW);
      a2 += *(const vw*)(q + i + 2 * SW); a3 += *(const vw*)(q + i + 3 * SW);
    }
    const vw a = a0 + a1 + a2 + a3;
    for (int i = 0; i < SW; ++i) s += a[i];
  }
  return s;
}
