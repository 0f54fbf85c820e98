/* Vector helpers shared by llmclock's kernels: 16 floats per vector (GCC vector extensions, lowered
   to AVX-512, AVX2, SSE or NEON by the compiler for the target), loads and stores that need no
   alignment, a polynomial exp and normal cdf, and horizontal reductions. x86 intrinsics are used
   only where the target has AVX-512 (__AVX512F__), so the same source builds for any CPU. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));
static inline vf ld(const float* p) { vf v; memcpy(&v, p, 64); return v; }
static inline void st(float* p, vf v) { memcpy(p, &v, 64); }
/* m <= 16 floats, the rest of the vector zero */
static inline vf ldn(const float* p, int64_t m) { if (m == 16) return ld(p); float t[16] = {0}; memcpy(t, p, m * 4); return ld(t); }
static inline void stn(float* p, vf v, int64_t m) { if (m == 16) st(p, v); else memcpy(p, &v, m * 4); }
static inline int64_t pad16(int64_t n) { return (n + 15) & ~(int64_t)15; }
/* exp and Phi on 16 lanes, branch-free; libmvec's expf/erff measured 0.8-1.5 ns per element here.
   exp: Cephes' expf (reduction by ln 2, degree-6 polynomial, ~1 ulp), exp(-inf) = 0.
   Phi (normal cdf) from erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), whose exp(-z^2) is
   also the density that the backward needs. */
static inline vf splat(float a) { return (vf){} + a; }
/* 1 / d: AVX-512's 14-bit reciprocal and one Newton step (~1 ulp), a quarter of a division's cost */
static inline vf vrcp(vf d) {
#ifdef __AVX512F__
  const vf r = (vf)_mm512_rcp14_ps((__m512)d);
  return r * (2.f - d * r);
#else
  return 1.f / d;
#endif
}

static inline vf vexp(vf x) {
  const vi dead = x < -87.3f;  /* exp underflows to 0 below here */
#ifdef __AVX512F__  /* the same steps in fewer instructions: max/min, roundscale, scalef */
  x = (vf)_mm512_min_ps(_mm512_max_ps((__m512)x, (__m512)splat(-87.3f)), (__m512)splat(88.3f));
  const vf n = (vf)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  /* round(x / ln 2) */
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
#ifdef __AVX512F__
  return dead ? splat(0.f) : (vf)_mm512_scalef_ps((__m512)p, (__m512)n);  /* p 2^n */
#else
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;  /* 2^n as float bits */
  vf scale;
  memcpy(&scale, &e, 64);
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
