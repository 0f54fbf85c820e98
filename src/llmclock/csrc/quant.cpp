// Decode GEMV / small GEMM for compressed weights: y[m, :] = act(x[m, :] @ W^T + bias) for M <= 8 rows.
//
// Weights are packed in panels of 16 output columns, each panel one contiguous stream over K:
//   bf16  (np, K, 16) uint16           -> float by a 16-bit shift
//   int8  (np, K, 16) int8             per-output-channel scale (np*16,) applied once at the end
//   int4  (np, K, 8)  uint8            byte j of a k-step holds column j (low nibble) and j+8 (high),
//                                      each u = q + 8 with q in [-8, 7]; scales (np, K/G, 16) per group
// so one pass reads every packed byte exactly once and dequantizes in registers; fp32 is never
// materialized. int4 uses the offset trick: sum x*(u-8) = sum x*u - 8*sum x, with the per-group
// sum of x computed once per call, so the inner loop is load, widen, convert, FMA.
// With AVX-512 VNNI, int4 instead uses integer dot products on x quantized to 23 bits (see
// panel_int4_vnni): numerically within fp32 rounding of the float path, about 2.5x fewer vector ops.
//
// Written with GCC vector extensions; the widening loads use AVX2 intrinsics where the compiler targets
// AVX2 (-march=native) and portable vector code elsewhere (aarch64 NEON), so the file builds anywhere
// g++ does (without a compiler, callers fall back to torch). OpenMP over panels shares torch's libgomp, so torch.set_num_threads applies.
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#include "vec.h"

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));
typedef uint8_t v8ub __attribute__((vector_size(8)));
typedef uint16_t v8h __attribute__((vector_size(16)));

#define P 16
#define MR 4     // rows per pass: 2 accumulators per row + weights fit 16 vector registers
#define PF 512   // software prefetch distance in bytes

#if defined(__AVX2__)
#include <immintrin.h>
// x86: one widening load per 8 weights (the generic code below is scalarized by GCC for 8-byte vectors).
static inline v8f bf16x8(const uint16_t* p) {
  return (v8f)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline v8f i8x8(const int8_t* p) {
  return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline v8i u8x8(const uint8_t* p) { return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
#else
// Portable (aarch64 NEON, older x86): the same arithmetic with GCC vector extensions.
static inline v8f bf16x8(const uint16_t* p) {
  v8h h; memcpy(&h, p, 16);
  v8u u = __builtin_convertvector(h, v8u) << 16;
  v8f f; memcpy(&f, &u, 32);
  return f;
}
static inline v8f i8x8(const int8_t* p) {
  v8b b; memcpy(&b, p, 8);
  return __builtin_convertvector(__builtin_convertvector(b, v8i), v8f);
}
static inline v8i u8x8(const uint8_t* p) { v8ub b; memcpy(&b, p, 8); return __builtin_convertvector(b, v8i); }
#endif
static inline v8f bcast(float a) { return (v8f){a, a, a, a, a, a, a, a}; }
static inline v8f load8(const float* p) { v8f v; memcpy(&v, p, 32); return v; }

// Store one panel's results: y[m, j] (=|+=) act(acc[m][j] + bias[j]) for j < nj.
static inline void store(int mr, v8f (*acc)[2], const float* bias, float* y, int64_t ldy, int nj, int gelu, int acc_out) {
  for (int m = 0; m < mr; ++m) {
    float r[P];
    memcpy(r, &acc[m][0], 32); memcpy(r + 8, &acc[m][1], 32);
    epilogue(r, bias, y + m * ldy, nj, gelu, acc_out);
  }
}

// K-steps in flight per row: an FMA has ~4 cycles of latency and two issue per cycle, so a pass
// needs ~8 independent accumulator chains to run at the FMA rate. A panel row has 2 (16 columns), so
// one row (batch 1) unrolls K by 4 and two rows by 2; without it batch 1 ran at the chains' latency
// (int4 then read 8 bytes per 4 cycles: slower than int8).
template <int R> struct Unroll { static constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1; };

// The accumulators of U k-steps, folded into acc at the end of a pass.
template <int R, int U>
static inline void fold(v8f (*a)[R][2], v8f (*acc)[2]) {
  for (int m = 0; m < R; ++m) {
    v8f s0 = a[0][m][0], s1 = a[0][m][1];
    for (int u = 1; u < U; ++u) { s0 += a[u][m][0]; s1 += a[u][m][1]; }
    acc[m][0] = s0; acc[m][1] = s1;
  }
}

template <int R, int U>
static inline void zero(v8f (*a)[R][2]) {
  for (int u = 0; u < U; ++u) for (int m = 0; m < R; ++m) a[u][m][0] = a[u][m][1] = bcast(0.f);
}

template <int R>
static inline void panel_bf16(const float* x, int64_t ldx, int64_t K, const uint16_t* w, v8f (*acc)[2]) {
  constexpr int U = Unroll<R>::U;
  v8f a[U][R][2];
  zero<R, U>(a);
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    for (int u = 0; u < U; ++u)
      if (!((k + u) & 1)) __builtin_prefetch((const char*)(w + (k + u) * P) + PF);  // 64 bytes per 2 k-steps
    for (int u = 0; u < U; ++u) {
      const v8f w0 = bf16x8(w + (k + u) * P), w1 = bf16x8(w + (k + u) * P + 8);
      for (int m = 0; m < R; ++m) {
        const v8f b = bcast(x[m * ldx + k + u]);
        a[u][m][0] += b * w0; a[u][m][1] += b * w1;
      }
    }
  }
  for (; k < K; ++k) {
    const v8f w0 = bf16x8(w + k * P), w1 = bf16x8(w + k * P + 8);
    for (int m = 0; m < R; ++m) {
      const v8f b = bcast(x[m * ldx + k]);
      a[0][m][0] += b * w0; a[0][m][1] += b * w1;
    }
  }
  fold<R, U>(a, acc);
}

template <int R>
static inline void panel_int8(const float* x, int64_t ldx, int64_t K, const int8_t* w, const float* s, v8f (*acc)[2]) {
  constexpr int U = Unroll<R>::U;
  v8f a[U][R][2];
  zero<R, U>(a);
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    if (!(k & 3)) __builtin_prefetch((const char*)(w + k * P) + PF);  // 64 bytes per 4 k-steps
    for (int u = 0; u < U; ++u) {
      const v8f w0 = i8x8(w + (k + u) * P), w1 = i8x8(w + (k + u) * P + 8);
      for (int m = 0; m < R; ++m) {
        const v8f b = bcast(x[m * ldx + k + u]);
        a[u][m][0] += b * w0; a[u][m][1] += b * w1;
      }
    }
  }
  for (; k < K; ++k) {
    const v8f w0 = i8x8(w + k * P), w1 = i8x8(w + k * P + 8);
    for (int m = 0; m < R; ++m) {
      const v8f b = bcast(x[m * ldx + k]);
      a[0][m][0] += b * w0; a[0][m][1] += b * w1;
    }
  }
  fold<R, U>(a, acc);
  const v8f s0 = load8(s), s1 = load8(s + 8);
  for (int m = 0; m < R; ++m) { acc[m][0] *= s0; acc[m][1] *= s1; }
}

// One int4 k-step's 16 weights, as the floats u (= q + 8) of columns 0..7 and 8..15.
static inline void int4x16(const uint8_t* p, v8f* lo, v8f* hi) {
  const v8i u = u8x8(p);
  *lo = __builtin_convertvector(u & 15, v8f);
  *hi = __builtin_convertvector(u >> 4, v8f);
}

// xs: (R, K/G) per-group sums of x, precomputed. G (32, 64, 128) is a multiple of any U.
template <int R>
static inline void panel_int4(const float* x, int64_t ldx, int64_t K, int64_t G, const uint8_t* w, const float* s,
                              const float* xs, int64_t ngroups, v8f (*acc)[2]) {
  constexpr int U = Unroll<R>::U;
  for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = bcast(0.f);
  for (int64_t g = 0; g < ngroups; ++g) {
    v8f a[U][R][2], t[R][2];
    zero<R, U>(a);
    const uint8_t* wg = w + g * G * (P / 2);
    const float* xg = x + g * G;
    for (int64_t k = 0; k < G; k += U) {
      if (!(k & 7)) __builtin_prefetch(wg + k * (P / 2) + PF);  // 64 bytes per 8 k-steps
      for (int u = 0; u < U; ++u) {
        v8f w0, w1;
        int4x16(wg + (k + u) * (P / 2), &w0, &w1);
        for (int m = 0; m < R; ++m) {
          const v8f b = bcast(xg[m * ldx + k + u]);
          a[u][m][0] += b * w0; a[u][m][1] += b * w1;
        }
      }
    }
    fold<R, U>(a, t);
    const v8f s0 = load8(s + g * P), s1 = load8(s + g * P + 8);
    for (int m = 0; m < R; ++m) {
      const v8f off = bcast(8.f * xs[m * ngroups + g]);
      acc[m][0] += s0 * (t[m][0] - off); acc[m][1] += s1 * (t[m][1] - off);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// AVX-512 (x86-64-v4): a 16-column panel k-step is one zmm, so each format needs half the
// instructions per weight of the 256-bit code above (which stays the AVX2 path).
//   bf16, int8: one widening load (+ shift / convert) and one FMA per row per 16 weights.
//   int4 (AVX-512 without VNNI/VBMI, or LLMCLOCK_QUANT_VNNI=0): see panel_int4_512; with VNNI, see
//   panel_int4_vnni. On Zen 4 (512-bit ops on 256-bit units) the float paths gain little; the
//   integer int4 path is what makes int4 faster than int8.
#define QUANT_AVX512 1
template <int R> struct Unroll512 { static constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1; };

static inline void store512(int R, const __m512* t, v8f (*acc)[2]) {
  for (int m = 0; m < R; ++m) {
    float r[P];
    _mm512_storeu_ps(r, t[m]);
    memcpy(&acc[m][0], r, 32); memcpy(&acc[m][1], r + 8, 32);
  }
}

static inline __m512 bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 i8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// fmt 0 bf16, 1 int8: the same loop, one zmm of weights per k-step.
template <int R, int F>
static inline void panel512(const float* x, int64_t ldx, int64_t K, const void* wv, const float* s, v8f (*acc)[2]) {
  constexpr int U = Unroll512<R>::U;
  constexpr int B = F == 0 ? 2 : 1;  // bytes per weight
  const char* w = (const char*)wv;
  __m512 a[U][R];
  for (int u = 0; u < U; ++u) for (int m = 0; m < R; ++m) a[u][m] = _mm512_setzero_ps();
  auto wk = [&](int64_t k) { return F == 0 ? bf16x16((const uint16_t*)(w + k * P * B)) : i8x16((const int8_t*)(w + k * P * B)); };
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    for (int u = 0; u < U; ++u)
      if (!(((k + u) * P * B) & 63)) __builtin_prefetch(w + (k + u) * P * B + PF);
    for (int u = 0; u < U; ++u) {
      const __m512 wu = wk(k + u);
      for (int m = 0; m < R; ++m) a[u][m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * ldx + k + u]), wu, a[u][m]);
    }
  }
  for (; k < K; ++k) {
    const __m512 wu = wk(k);
    for (int m = 0; m < R; ++m) a[0][m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * ldx + k]), wu, a[0][m]);
  }
  __m512 t[R];
  for (int m = 0; m < R; ++m) {
    t[m] = a[0][m];
    for (int u = 1; u < U; ++u) t[m] = _mm512_add_ps(t[m], a[u][m]);
    if (F == 1) t[m] = _mm512_mul_ps(t[m], _mm512_loadu_ps(s));
  }
  store512(R, t, acc);
}

template <int R>
static inline void panel_bf16_512(const float* x, int64_t ldx, int64_t K, const uint16_t* w, v8f (*acc)[2]) {
  panel512<R, 0>(x, ldx, K, w, 0, acc);
}
template <int R>
static inline void panel_int8_512(const float* x, int64_t ldx, int64_t K, const int8_t* w, const float* s, v8f (*acc)[2]) {
  panel512<R, 1>(x, ldx, K, w, s, acc);
}

// Lane L of a k-step holds column col(L) = 4*(L&1) + (L>>2) + 8*((L>>1)&1): the k-step's 8 bytes are
// broadcast (a load, no shuffle), lane L shifts its dword (L&1) right by 4*(L>>1) and the vpermps
// table lookup reads the low nibble; the column order is undone once per group.
template <int R>
static inline void panel_int4_512(const float* x, int64_t ldx, int64_t K, int64_t G, const uint8_t* w, const float* s,
                                  const float* xs, int64_t ngroups, v8f (*acc)[2]) {
  constexpr int U = Unroll512<R>::U;
  const __m512i sh = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // inverse of col(L): lane L -> column; idx[c] = L
  const __m512i inv = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512 out[R];
  for (int m = 0; m < R; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m512 a[U][R];
    for (int u = 0; u < U; ++u) for (int m = 0; m < R; ++m) a[u][m] = _mm512_setzero_ps();
    const uint8_t* wg = w + g * G * (P / 2);
    const float* xg = x + g * G;
    for (int64_t k = 0; k < G; k += U) {
      if (!(k & 7)) __builtin_prefetch(wg + k * (P / 2) + PF);  // 64 bytes per 8 k-steps
      for (int u = 0; u < U; ++u) {
        long long q; memcpy(&q, wg + (k + u) * (P / 2), 8);
        const __m512 wu = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(q), sh), lut);
        for (int m = 0; m < R; ++m) a[u][m] = _mm512_fmadd_ps(_mm512_set1_ps(xg[m * ldx + k + u]), wu, a[u][m]);
      }
    }
    const __m512 sg = _mm512_loadu_ps(s + g * P);
    for (int m = 0; m < R; ++m) {
      __m512 t = a[0][m];
      for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, a[u][m]);
      t = _mm512_permutexvar_ps(inv, t);
      out[m] = _mm512_fmadd_ps(sg, _mm512_sub_ps(t, _mm512_set1_ps(8.f * xs[m * ngroups + g])), out[m]);
    }
  }
  store512(R, out, acc);
}

// int4 with AVX512-VNNI + VBMI (Zen 4, Ice Lake and later; checked at run time): integer dot
// products, 64 multiply-adds per vpdpbusd instead of 16 per FMA. x is quantized per group to a
// signed 23-bit integer (step amax / 2^22, error <= amax * 2^-23, fp32's order) held as three
// signed 8-bit digits (q = d1 * 65536 + d2 * 256 + d3); each digit is dotted with the unsigned
// nibbles u exactly in int32, and the three sums are combined in fp32 per group. The weights of
// 4 k-steps (32 packed bytes) are transposed by one vpermb so each int32 lane holds its column's 4
// bytes; the high-nibble columns are shifted down by 4 and both masked to 4 bits.
template <int R>
__attribute__((target("avx512vnni,avx512vbmi")))
static void panel_int4_vnni(const int8_t* xq, int64_t K, int64_t G, const uint8_t* w, const float* s,
                            const float* xd, const float* xs, int64_t ngroups, v8f (*acc)[2]) {
  constexpr int U = R == 1 ? 2 : 1;  // independent int32 chains: 3 digits x U x R
  alignas(64) static const uint8_t idx[64] = {
      0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27, 4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31,
      0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27, 4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31};
  const __m512i perm = _mm512_load_si512(idx);
  const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
  const __m512i lo4 = _mm512_set1_epi8(15);
  __m512 out[R];
  for (int m = 0; m < R; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m512i a[U][R][3];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < R; ++m) a[u][m][0] = a[u][m][1] = a[u][m][2] = _mm512_setzero_si512();
    const uint8_t* wg = w + g * G * (P / 2);
    const int8_t* xg = xq + g * G;
    for (int64_t k = 0; k < G; k += 4 * U) {
      __builtin_prefetch(wg + k * (P / 2) + 4 * PF);  // 32 bytes per 4 k-steps; further ahead: it runs faster
      for (int u = 0; u < U; ++u) {
        const __m512i raw = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(wg + (k + 4 * u) * (P / 2))));
        const __m512i wu = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi8(perm, raw), sh), lo4);
        for (int m = 0; m < R; ++m)
          for (int d = 0; d < 3; ++d) {
            int32_t q; memcpy(&q, xg + (m * 3 + d) * K + k + 4 * u, 4);
            a[u][m][d] = _mm512_dpbusd_epi32(a[u][m][d], wu, _mm512_set1_epi32(q));
          }
      }
    }
    const __m512 sg = _mm512_loadu_ps(s + g * P);
    for (int m = 0; m < R; ++m) {
      __m512i c[3] = {a[0][m][0], a[0][m][1], a[0][m][2]};
      for (int u = 1; u < U; ++u)
        for (int d = 0; d < 3; ++d) c[d] = _mm512_add_epi32(c[d], a[u][m][d]);
      __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c[0]), _mm512_set1_ps(65536.f),
                                 _mm512_fmadd_ps(_mm512_cvtepi32_ps(c[1]), _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(c[2])));
      t = _mm512_fmsub_ps(t, _mm512_set1_ps(xd[m * ngroups + g]), _mm512_set1_ps(8.f * xs[m * ngroups + g]));
      out[m] = _mm512_fmadd_ps(sg, t, out[m]);
    }
  }
  store512(R, out, acc);
}

// Row m's x as three int8 digits per k (xq[(m * 3 + d) * K + k]) and its per-group step xd.
// G is a multiple of 16 (32, 64, 128).
static void quantize_x(const float* x, int64_t M, int64_t ldx, int64_t K, int64_t G, int8_t* xq, float* xd) {
  const int64_t ngroups = K / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ngroups; ++g) {
      const float* xg = x + m * ldx + g * G;
      __m512 mx = _mm512_setzero_ps();
      for (int64_t k = 0; k < G; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xg + k)));
      const float amax = _mm512_reduce_max_ps(mx);
      xd[m * ngroups + g] = amax / 4194304.f;
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 4194304.f / amax : 0.f);
      for (int64_t k = 0; k < G; k += 16) {
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + k), inv));  // |q| <= 2^22, nearest
        const __m512i d3 = _mm512_srai_epi32(_mm512_slli_epi32(q, 24), 24);  // low byte, signed
        q = _mm512_srai_epi32(_mm512_sub_epi32(q, d3), 8);
        const __m512i d2 = _mm512_srai_epi32(_mm512_slli_epi32(q, 24), 24);
        q = _mm512_srai_epi32(_mm512_sub_epi32(q, d2), 8);  // |q| <= 64
        _mm_storeu_si128((__m128i*)(xq + (m * 3 + 0) * K + g * G + k), _mm512_cvtepi32_epi8(q));
        _mm_storeu_si128((__m128i*)(xq + (m * 3 + 1) * K + g * G + k), _mm512_cvtepi32_epi8(d2));
        _mm_storeu_si128((__m128i*)(xq + (m * 3 + 2) * K + g * G + k), _mm512_cvtepi32_epi8(d3));
      }
    }
}
#endif

#define ROWS(fn, ...)                                                            \
  switch (M - m0 < MR ? M - m0 : MR) {                                           \
    case 1: fn<1>(__VA_ARGS__); break;                                           \
    case 2: fn<2>(__VA_ARGS__); break;                                           \
    case 3: fn<3>(__VA_ARGS__); break;                                           \
    default: fn<4>(__VA_ARGS__); break;                                          \
  }

// fmt: 0 bf16, 1 int8, 2 int4. x (M, K) rows with stride ldx; y (M, N) rows with stride ldy.
// gelu: 0 none, 1 GPT-2's tanh approximation, 2 exact (erf); acc_out: add into y (a fused residual).
extern "C" void quant_linear(int fmt, const float* x, int64_t M, int64_t ldx, int64_t K, const void* wp,
                             const float* scales, int64_t G, int64_t N, const float* bias, float* y, int64_t ldy,
                             int gelu, int acc_out, int nthreads) {
  const int64_t np = (N + P - 1) / P;
  const int64_t ngroups = fmt == 2 ? K / G : 0;
  float* xs = (float*)__builtin_alloca((M * ngroups + 1) * sizeof(float));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ngroups; ++g) {
      float t = 0.f;
      for (int64_t k = 0; k < G; ++k) t += x[m * ldx + g * G + k];
      xs[m * ngroups + g] = t;
    }
  int8_t* xq = 0;
  float* xd = 0;
#if defined(QUANT_AVX512)
  // LLMCLOCK_QUANT_VNNI=0 keeps int4 on the float path (to test it on a CPU that has VNNI).
  static const bool vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
                           !(getenv("LLMCLOCK_QUANT_VNNI") && !strcmp(getenv("LLMCLOCK_QUANT_VNNI"), "0"));
  if (fmt == 2 && vnni && G % 16 == 0) {
    xq = (int8_t*)malloc(M * 3 * K + 64);
    xd = (float*)malloc((M * ngroups + 1) * sizeof(float));
    quantize_x(x, M, ldx, K, G, xq, xd);
  }
#endif
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t p = 0; p < np; ++p) {
    const int nj = (int)(N - p * P < P ? N - p * P : P);
    const float* b = bias ? bias + p * P : 0;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      v8f acc[MR][2];
      const float* xr = x + m0 * ldx;
      const int mr = (int)(M - m0 < MR ? M - m0 : MR);
#if defined(QUANT_AVX512)
#define SFX(fn) fn##_512
#else
#define SFX(fn) fn
#endif
      if (fmt == 0) {
        const uint16_t* w = (const uint16_t*)wp + p * K * P;
        ROWS(SFX(panel_bf16), xr, ldx, K, w, acc)
      } else if (fmt == 1) {
        const int8_t* w = (const int8_t*)wp + p * K * P;
        ROWS(SFX(panel_int8), xr, ldx, K, w, scales + p * P, acc)
      } else {
        const uint8_t* w = (const uint8_t*)wp + p * K * (P / 2);
#if defined(QUANT_AVX512)
        if (xq) {
          ROWS(panel_int4_vnni, xq + m0 * 3 * K, K, G, w, scales + p * ngroups * P, xd + m0 * ngroups, xs + m0 * ngroups, ngroups, acc)
        } else
#endif
        ROWS(SFX(panel_int4), xr, ldx, K, G, w, scales + p * ngroups * P, xs + m0 * ngroups, ngroups, acc)
      }
      store(mr, acc, b, y + m0 * ldy + p * P, ldy, nj, gelu, acc_out);
    }
  }
  free(xq);
  free(xd);
}
