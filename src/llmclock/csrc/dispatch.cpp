/* Which build of the library this CPU runs best: 3 = AVX-512 (x86-64-v4), 2 = AVX2 + FMA
   (x86-64-v3), 0 = baseline. Every build exports it; llmclock/cbuild.py asks the baseline build
   and then loads the best one the CPU (and its operating system) supports. */
#include "kernels.h"

extern "C" int llmclock_isa_level(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return 3;
  if (__builtin_cpu_supports("x86-64-v3")) return 2;
#endif
  return 0;
}
