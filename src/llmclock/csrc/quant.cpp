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
//
// Written with GCC vector extensions; the widening loads use AVX2 intrinsics where the compiler targets
// AVX2 (-march=native) and portable vector code elsewhere (aarch64 NEON), so the file builds anywhere
// g++ does (without a compiler, callers fall back to torch). OpenMP over panels shares torch's libgomp, so torch.set_num_threads applies.
#include <stdint.h>
#include <string.h>
#include <math.h>

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
    float* yr = y + m * ldy;
    for (int j = 0; j < nj; ++j) {
      float t = r[j] + (bias ? bias[j] : 0.f);
      if (gelu == 1) t = 0.5f * t * (1.f + tanhf(0.7978845608028654f * (t + 0.044715f * t * t * t)));
      else if (gelu == 2) t = 0.5f * t * (1.f + erff(t * 0.7071067811865476f));
      yr[j] = acc_out ? yr[j] + t : t;
    }
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
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t p = 0; p < np; ++p) {
    const int nj = (int)(N - p * P < P ? N - p * P : P);
    const float* b = bias ? bias + p * P : 0;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      v8f acc[MR][2];
      const float* xr = x + m0 * ldx;
      const int mr = (int)(M - m0 < MR ? M - m0 : MR);
      if (fmt == 0) {
        const uint16_t* w = (const uint16_t*)wp + p * K * P;
        ROWS(panel_bf16, xr, ldx, K, w, acc)
      } else if (fmt == 1) {
        const int8_t* w = (const int8_t*)wp + p * K * P;
        ROWS(panel_int8, xr, ldx, K, w, scales + p * P, acc)
      } else {
        const uint8_t* w = (const uint8_t*)wp + p * K * (P / 2);
        ROWS(panel_int4, xr, ldx, K, G, w, scales + p * ngroups * P, xs + m0 * ngroups, ngroups, acc)
      }
      store(mr, acc, b, y + m0 * ldy + p * P, ldy, nj, gelu, acc_out);
    }
  }
}
