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

// Calls f(TypeTag<Term>, TypeTag<T>, TypeTag<TargetT>, TypeTag<ScaleT>) for a
// problem: Term the per-element term's traits (math::Likelihoods' entry, or
// math::ResidualOf it where one scale serves the batch), T the type of recon,
// TargetT that of target, ScaleT that of a per-element log_scale (T's or float;
// T where there is none).
// dispatch_recon's visitor of the likelihood table for a recon of type T (a
// class with T a template parameter: nvcc mis-resolves a type alias taken from
// an enclosing generic lambda inside a nested one).
template <typename T, typename HalfT, typename BFloat16T, typename F>
struct ReconVisitor {
  const ReconProblem& p;
  F& f;
  template <class Tag>
  void operator()(Tag) const {
    using L = typename Tag::type;
    dispatch_target<T, HalfT, BFloat16T>(p.target_dtype, [&](auto t_tag) {
      if constexpr (L::kHasScale) {
        if (p.shared_scale)
          return f(TypeTag<math::ResidualOf<L>>{}, TypeTag<T>{}, t_tag, TypeTag<T>{});
        if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
          if (p.scale_dtype == DType::kFloat32) {
            return f(TypeTag<L>{}, TypeTag<T>{}, t_tag, TypeTag<float>{});
          }
        }
      }
      f(TypeTag<L>{}, TypeTag<T>{}, t_tag, TypeTag<T>{});
    });
  }
};

// dispatch_recon for a recon whose type T is known (p.dtype's).
template <typename T, typename HalfT, typename BFloat16T, typename F>
void dispatch_recon_as(const ReconProblem& p, F&& f) {
  const ReconVisitor<T, HalfT, BFloat16T, F> visit{p, f};
  math::visit_likelihood(p.likelihood, visit);
}

template <typename HalfT, typename BFloat16T, typename F>
void dispatch_recon(const ReconProblem& p, F&& f) {
  dispatch_dtype<HalfT, BFloat16T>(p.dtype, [&](auto x_tag) {
    dispatch_recon_as<typename decltype(x_tag)::type, HalfT, BFloat16T>(p, f);
  });
}

}  // namespace fusedvae
