/* Vector helpers shared by llmclock's training kernels (fused.cpp): a vector of the target's native
   width, VL floats (16 with AVX-512, 8 with AVX/AVX2, 4 with SSE or NEON; GCC vector extensions
   lowered by the compiler), loads and stores that need no alignment, a polynomial exp and normal
   cdf, and horizontal reductions. A vector wider than the registers (64 bytes on AVX2) would be
   split by GCC through memory, several times slower, so every loop steps by VL. x86 intrinsics are
   used only where the target has them (__AVX512F__, __AVX__), so the same source builds for any CPU. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int vi __attribute__((vector_size(VL * 4)));
static inline vf ld(const float* p) { vf v; memcpy(&v, p, VL * 4); return v; }
static inline void st(float* p, vf v) { memcpy(p, &v, VL * 4); }
/* m <= VL floats, the rest of the vector zero */
static inline vf ldn(const float* p, int64_t m) { if (m == VL) return ld(p); float t[VL] = {0}; memcpy(t, p, m * 4); return ld(t); }
static inline void stn(float* p, vf v, int64_t m) { if (m == VL) st(p, v); else memcpy(p, &v, m * 4); }
static inline int64_t padv(int64_t n) { return (n + VL - 1) & ~(int64_t)(VL - 1); }  /* n rounded up to VL */
/* exp and Phi on VL lanes, branch-free; libmvec's expf/erff measured 0.8-1.5 ns per element here.
   exp: Cephes' expf (reduction by ln 2, degree-6 polynomial, ~1 ulp), exp(-inf) = 0.
   Phi (normal cdf) from erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), whose exp(-z^2) is
   also the density that the backward needs. */
static inline vf splat(float a) { return (vf){} + a; }
/* 1 / d: the hardware's reciprocal estimate (14 bits AVX-512, 12 bits AVX) and one Newton step
   (~1 ulp after AVX-512's, a few ulp after AVX's), a fraction of a division's cost */
static inline vf vrcp(vf d) {
#if defined(__AVX512F__)
  const vf r = (vf)_mm512_rcp14_ps((__m512)d);
  return r * (2.f - d * r);
#elif defined(__AVX__)
  const vf r = (vf)_mm256_rcp_ps((__m256)d);
  return r * (2.f - d * r);
#else
  return 1.f / d;
#endif
}

static inline vf vexp(vf x) {
  const vi dead = x < -87.3f;  /* exp underflows to 0 below here */
#if defined(__AVX512F__)  /* the same steps in fewer instructions: max/min, roundscale, scalef */
  x = (vf)_mm512_min_ps(_mm512_max_ps((__m512)x, (__m512)splat(-87.3f)), (__m512)splat(88.3f));
  const vf n = (vf)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  /* round(x / ln 2) */
#elif defined(__AVX__)
  x = (vf)_mm256_min_ps(_mm256_max_ps((__m256)x, (__m256)splat(-87.3f)), (__m256)splat(88.3f));
  const vf n = (vf)_mm256_round_ps((__m256)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  x = x < -87.3f ? splat(-87.3f) : x;
  x = x > 88.3f ? splat(88.3f) : x;  /* keeps 2^n finite (n <= 127); exp(88.3) = 2.1e38 */
  const vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  /* round(x / ln 2) */
#endif
  const vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f; p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f; p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
#if defined(__AVX512F__)
  return dead ? splat(0.f) : (vf)_mm512_scalef_ps((__m512)p, (__m512)n);  /* p 2^n */
#else
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;  /* 2^n as float bits */
  vf scale;
  memcpy(&scale, &e, sizeof scale);
  return dead ? splat(0.f) : p * scale;
#endif
}
static inline vf vphi(vf x, vf* pdf) {  /* standard normal cdf; its density too if pdf */
  const vf z = (x < 0.f ? -x : x) * 0.7071067811865476f;
  const vf ez2 = vexp(-z * z);
  const vf t = vrcp(1.f + 0.3275911f * z);
  const vf poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const vf c = 0.5f * poly * ez2;  /* P(N > |x|) = erfc(z) / 2 */
  if (pdf) *pdf = ez2 * 0.3989422804014327f;
  return x < 0.f ? c : 1.f - c;
}

/* GELU on VL lanes: the exact (erf) form, or GPT-2's tanh approximation through the logistic,
   0.5 (1 + tanh u) = 1 / (1 + e^-2u), free of cancellation where tanh u is near -1
   (u = sqrt(2/pi) (x + 0.044715 x^3)). */
static inline vf e_minus_2u(vf x) { return vexp(-1.5957691216057308f * (x + 0.044715f * x * x * x)); }
static inline vf gelu_v(vf x, int approx) {
  if (approx) return x * vrcp(1.f + e_minus_2u(x));
  return x * vphi(x, 0);
}

/* The decode GEMVs' store: y[0:n] (=, or += when acc) act(r[0:n] + bias[0:n]), VL lanes at a time;
   act is none (gelu 0), GELU's tanh form (1) or its exact form (2). libm's scalar tanhf here cost
   ~10% of a decode cycle of a small model. */
static inline void epilogue(const float* r, const float* bias, float* y, int64_t n, int gelu, int acc) {
  for (int64_t j = 0; j < n; j += VL) {
    const int64_t m = n - j < VL ? n - j : VL;
    vf t = ldn(r + j, m);
    if (bias) t += ldn(bias + j, m);
    if (gelu) t = gelu_v(t, gelu == 1);
    if (acc) t += ldn(y + j, m);
    stn(y + j, t, m);
  }
}

/* all VL lanes folded by op in log2(VL) butterfly steps, the result in every lane */
template <class Op>
static inline float hreduce(vf v, Op op) {
#if VL == 16
  v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
#elif VL == 8
  v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
#else
  v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1));
  v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2));
#endif
  return v[0];
}
static inline float hsum(vf v) { return hreduce(v, [](vf a, vf b) { return a + b; }); }
static inline float hmax(vf v) { return hreduce(v, [](vf a, vf b) { return a > b ? a : b; }); }
