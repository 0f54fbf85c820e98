/* The C entry points of llmclock's kernel library (one shared library built from every .cpp in this
   folder; setup.py builds it, llmclock/cbuild.py loads it and each Python module declares the ctypes
   signatures of the functions it calls). Plain C ABI: pointers, int64 sizes, no torch types. */
#pragma once
#include <stdint.h>

extern "C" {
/* dispatch.cpp */
int llmclock_isa_level(void);

/* fused.cpp: training kernels (llmclock/fused.py) */
void gelu_fwd(const float* x, float* y, int64_t n, int approx, int nthreads);
void gelu_bwd(const float* x, const float* dy, float* dx, int64_t n, int approx, int nthreads);
void ln_fwd(const float* x, const float* w, const float* b, int64_t n, int64_t C, float eps, float* y, float* mean,
            float* rstd, int nthreads);
void ln_bwd(const float* x, const float* w, const float* mean, const float* rstd, const float* dy, const float* dres,
            int64_t n, int64_t C, float* dx, float* dw, float* db, float* scratch, int nthreads);
void attn_fwd(const float* qkv, int64_t B, int64_t T, int64_t nh, int64_t hs, float* y, float* lse, int nthreads);
void attn_bwd(const float* qkv, const float* y, const float* lse, const float* dy, int64_t B, int64_t T, int64_t nh,
              int64_t hs, float* dqkv, int nthreads);
void set_sgemm(void* f);
int has_sgemm(void);
int64_t block_saved_floats(int64_t B, int64_t T, int64_t C, int64_t nh);
int64_t block_work_floats(int64_t B, int64_t T, int64_t C, int nthreads);
void block_fwd(const float* x, const float* const* p, int64_t B, int64_t T, int64_t C, int64_t nh, float eps,
               int approx, float* out, float* s, int nthreads);
void block_bwd(const float* x, const float* const* p, const float* s, const float* dout, int64_t B, int64_t T,
               int64_t C, int64_t nh, int approx, float* dx, float* const* gr, float* work, int nthreads);

/* decode.cpp: decode kernels (llmclock/engine/kernels.py) */
void linear_panels(const float* x, int64_t M, int64_t ldx, int64_t K, const float* wp, int64_t N, const float* bias,
                   float* y, int64_t ldy, int gelu, int acc, int nthreads);
void attend_decode(const float* qkv, int64_t n, int64_t nh, int64_t hs, float* kc, float* vc, int64_t max_len,
                   const int64_t* pos, const int64_t* slots, float* y, int nthreads);
void layer_norm_rows(const float* x, const float* w, const float* b, int64_t n, int64_t C, float eps, float* y);
void decode_block(float* x, const void* const* w, const int* fmt, const float* const* scales, const int64_t* group,
                    int64_t n, int64_t C, int64_t H, int64_t nh, float eps1, float eps2, int gelu, float* kc, float* vc,
                    int64_t max_len, const int64_t* pos, const int64_t* slots, float* work, int nthreads);
double stream_sum(const float* p, int64_t n, int nthreads);

/* quant.cpp: weight-only quantized GEMV (llmclock/compress/quant.py) */
void quant_linear(int fmt, const float* x, int64_t M, int64_t ldx, int64_t K, const void* wp, const float* scales,
                  int64_t G, int64_t N, const float* bias, float* y, int64_t ldy, int gelu, int acc_out, int nthreads);
}
