// Runtime dtype / likelihood -> compile-time types, shared by the CPU and CUDA
// kernels. Each backend names its own 16-bit float types (c10::Half on the
// CPU, __half on CUDA), so those are template parameters.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace fusedvae {

// Accumulation type: double for double, float for float and the 16-bit floats.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>) for the element type of `dtype`.
template <typename HalfT, typename BFloat16T, typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat64:
      return f(TypeTag<double>{});
    case DType::kFloat16:
      return f(TypeTag<HalfT>{});
    case DType::kBFloat16:
      return f(TypeTag<BFloat16T>{});
  }
}

// Calls f(std::integral_constant<Likelihood, L>) for the runtime likelihood.
template <typename F>
void dispatch_likelihood(math::Likelihood l, F&& f) {
  using L = math::Likelihood;
  switch (l) {
    case L::kBernoulliLogits:
      return f(std::integral_constant<L, L::kBernoulliLogits>{});
    case L::kBernoulliProbs:
      return f(std::integral_constant<L, L::kBernoulliProbs>{});
    case L::kContinuousBernoulliLogits:
      return f(std::integral_constant<L, L::kContinuousBernoulliLogits>{});
    case L::kContinuousBernoulliProbs:
      return f(std::integral_constant<L, L::kContinuousBernoulliProbs>{});
    case L::kSquaredError:
      return f(std::integral_constant<L, L::kSquaredError>{});
    case L::kGaussian:
      return f(std::integral_constant<L, L::kGaussian>{});
  }
}

// Calls f(likelihood constant, TypeTag<T>, TypeTag<TargetT>) for a problem:
// T the dtype of recon, TargetT that or uint8_t.
template <typename HalfT, typename BFloat16T, typename F>
void dispatch_recon(const ReconProblem& p, F&& f) {
  dispatch_dtype<HalfT, BFloat16T>(p.dtype, [&](auto x_tag) {
    dispatch_likelihood(p.likelihood, [&](auto l) {
      if (p.target_is_uint8) {
        f(l, x_tag, TypeTag<uint8_t>{});
      } else {
        f(l, x_tag, x_tag);
      }
    });
  });
}

}  // namespace fusedvae
