// Element type <-> accumulation type on the device, shared by the CUDA kernels:
// 16-bit floats through their intrinsics (rounded to nearest even on the way
// out), uint8 targets read as pixels, value / 255 (math::pixel_quotient in
// float: a division is ten instructions and a branch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../vae_math.h"

namespace fusedvae {
namespace cuda {

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same_v<T, uint8_t>) {
    if constexpr (std::is_same_v<Acc, float>) {
      return math::pixel_quotient(static_cast<float>(v),
                                  [](float a, float b, float c) { return fmaf(a, b, c); });
    } else {
      return static_cast<Acc>(v) / Acc(255);
    }
  } else {
    return static_cast<Acc>(v);
  }
}

template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

}  // namespace cuda
}  // namespace fusedvae
