// The CPU kernels for AVX-512 (16 floats per register), chosen at run time by
// kernels.cpp where the CPU has it. The global build flags say AVX2; this file
// alone retargets. Inline functions it shares with other files (c10, std) are
// also emitted, AVX2-compiled, by kernels_avx2.cpp, which links first, so the
// linker keeps those copies and nothing outside this file needs AVX-512.
#if defined(__x86_64__) || defined(_M_X64)
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// g++ does not define the feature macros for a target pragma; the at::vec and
// Sleef headers select their AVX-512 code by them.
#ifndef __AVX512F__
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#include "kernels_impl.h"
#endif
