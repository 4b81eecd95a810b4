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
    case DType::kUInt8:
    case DType::kBool:
      return;  // targets only (dispatch_target); ops.cpp passes no other tensor of these
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

// Calls f(TypeTag<TargetT>) for a target of `dtype` beside a recon of type T
// (the combinations of ReconProblem's comment; others cannot reach here).
template <typename T, typename HalfT, typename BFloat16T, typename F>
void dispatch_target(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kUInt8:
      return f(TypeTag<uint8_t>{});
    case DType::kBool:
      return f(TypeTag<bool>{});
    default:
      break;
  }
  if constexpr (std::is_same_v<T, double>) {
    return f(TypeTag<double>{});
  } else {
    switch (dtype) {
      case DType::kFloat16:
        return f(TypeTag<HalfT>{});
      case DType::kBFloat16:
        return f(TypeTag<BFloat16T>{});
      default:
        return f(TypeTag<float>{});
    }
  }
}

// Calls f(likelihood constant, TypeTag<T>, TypeTag<TargetT>, TypeTag<ScaleT>)
// for a problem: T the type of recon, TargetT that of target, ScaleT that of
// log_scale for the heteroscedastic Gaussian (T's or float; T for the others,
// which have none).
template <typename HalfT, typename BFloat16T, typename F>
void dispatch_recon(const ReconProblem& p, F&& f) {
  dispatch_dtype<HalfT, BFloat16T>(p.dtype, [&](auto x_tag) {
    using T = typename decltype(x_tag)::type;
    dispatch_likelihood(p.likelihood, [&](auto l) {
      dispatch_target<T, HalfT, BFloat16T>(p.target_dtype, [&](auto t_tag) {
        if constexpr (decltype(l)::value == math::Likelihood::kGaussian &&
                      !std::is_same_v<T, float> && !std::is_same_v<T, double>) {
          if (p.scale_dtype == DType::kFloat32) return f(l, x_tag, t_tag, TypeTag<float>{});
        }
        f(l, x_tag, t_tag, x_tag);
      });
    });
  });
}

}  // namespace fusedvae
