// The ops policy of vae_math.h over at::vec::Vectorized, so the CPU kernels
// evaluate the shared formulas on whole SIMD registers (AVX2 when the build sets
// CPU_CAPABILITY_AVX2; see setup.py).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../vae_math.h"

namespace fusedvae {
namespace cpu {

template <typename T>
struct VecOps {
  using Scalar = T;
  using V = at::vec::Vectorized<T>;
  using Mask = V;  // all-ones lanes where true, as Vectorized comparisons return
  static V splat(double c) { return V(static_cast<T>(c)); }
  static V exp(const V& x) { return x.exp(); }
  static V expm1(const V& x) { return x.expm1(); }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V tanh(const V& x) { return x.tanh(); }
  static V sinh(const V& x) { return x.sinh(); }
  static V abs(const V& x) { return x.abs(); }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask ge(const V& a, const V& b) { return a >= b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

}  // namespace cpu
}  // namespace fusedvae
