// The discretized mixture of logistics on CUDA: dmol.h's per-pixel math, one
// pixel per thread. The forward writes one partial sum per block (a fixed-order
// block tree over its pixels) and a second kernel adds each sample's partials
// in block order: reproducible run to run, no atomics, no host synchronisation.
// The forward with the gradient (dmol_forward_with_grad) sums the same way the
// log-likelihoods the backward's per-pixel function returns while it writes the
// gradient for an output gradient of 1: two passes over a pixel's components
// instead of the three of a forward followed by a backward.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../dispatch.h"
#include "../dmol.h"
#include "../kernels.h"
#include "convert.cuh"

namespace fusedvae {
namespace cuda {
namespace {

// Threads per block, one pixel each: 8 warps; block_sum's second stage sums
// kThreads / 32 <= 32 warp totals in one warp.
constexpr int kThreads = 256;

template <typename Acc, typename T>
struct Read {
  const T* base;
  int64_t stride;
  __device__ Acc operator()(int64_t j) const { return to_acc<Acc>(base[j * stride]); }
};

template <typename Acc>
using Ops = math::ScalarOps<Acc>;

template <typename Acc>
__device__ dmol::Pixel<Ops<Acc>> load_pixel(const DmolProblem& p, int64_t b, int64_t i) {
  dmol::Pixel<Ops<Acc>> px;
  px.channels = p.channels;
  px.k = p.k;
  px.half_width = static_cast<Acc>(p.half_width);
  px.log_scale_min = static_cast<Acc>(p.log_scale_min);
  for (int c = 0; c < p.channels; ++c) {
    const int64_t at = b * p.target_strides[0] + c * p.target_strides[1] + i * p.target_strides[2];
    if (p.target_dtype == DType::kUInt8) {
      px.x[c] = static_cast<Acc>(static_cast<const uint8_t*>(p.target)[at]) / Acc(127.5) - Acc(1);
    } else if (p.target_dtype == DType::kFloat64) {
      px.x[c] = static_cast<Acc>(static_cast<const double*>(p.target)[at]);
    } else {
      px.x[c] = static_cast<Acc>(static_cast<const float*>(p.target)[at]);
    }
  }
  return px;
}

// The block's values summed in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
  if (threadIdx.x < 32) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

int64_t blocks_per_sample(const DmolProblem& p) { return (p.pixels + kThreads - 1) / kThreads; }

struct GradStrides {
  int64_t s[3];
};

// The parameters of pixel i of sample b, and where their gradient goes.
template <typename T>
__device__ Read<acc_t<T>, T> pixel_params(const DmolProblem& p, int64_t b, int64_t i) {
  return {static_cast<const T*>(p.params) + b * p.param_strides[0] + i * p.param_strides[2],
          p.param_strides[1]};
}

template <typename T>
struct PixelGrad {
  T* base;
  int64_t stride;
  __device__ void operator()(int64_t j, acc_t<T> v) const { base[j * stride] = from_acc<T>(v); }
};

template <typename T>
__device__ PixelGrad<T> pixel_grad(T* out, const GradStrides& strides, int64_t b, int64_t i) {
  return {out + b * strides.s[0] + i * strides.s[2], strides.s[1]};
}

// partial[b · blocks + block] = Σ over the block's pixels of -log p(pixel).
// Block `item` covers pixels [chunk·kThreads, (chunk + 1)·kThreads) of sample b,
// item = b · blocks + chunk (a one-dimensional grid: any batch size).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_partials(DmolProblem p, int64_t blocks, double* partial) {
  using Acc = acc_t<T>;
  const int64_t b = int64_t(blockIdx.x) / blocks;
  const int64_t i = (int64_t(blockIdx.x) % blocks) * kThreads + threadIdx.x;
  double v = 0.0;
  if (i < p.pixels) {
    v = static_cast<double>(dmol::pixel_nll(load_pixel<Acc>(p, b, i), pixel_params<T>(p, b, i)));
  }
  v = block_sum(v);
  if (threadIdx.x == 0) partial[blockIdx.x] = v;
}

// forward_partials' partial sums (same blocks, same order), and the gradient
// for an output gradient of 1 written as backward_kernel writes it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_with_grad_partials(DmolProblem p, int64_t blocks, double* partial, T* out,
                               GradStrides strides) {
  using Acc = acc_t<T>;
  const int64_t b = int64_t(blockIdx.x) / blocks;
  const int64_t i = (int64_t(blockIdx.x) % blocks) * kThreads + threadIdx.x;
  double v = 0.0;
  if (i < p.pixels) {
    const Acc log_like =
        dmol::pixel_nll_backward<0>(load_pixel<Acc>(p, b, i), pixel_params<T>(p, b, i),
                                    dmol::UnitScale{}, pixel_grad(out, strides, b, i));
    v = static_cast<double>(Acc(0) - log_like);
  }
  v = block_sum(v);
  if (threadIdx.x == 0) partial[blockIdx.x] = v;
}

// nll[b] = Σ_block partial[b · blocks + block], in block order.
template <typename Acc>
__global__ void add_partials(const double* partial, int64_t batch, int64_t blocks, Acc* nll) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double sum = 0.0;
  for (int64_t k = 0; k < blocks; ++k) sum += partial[b * blocks + k];
  nll[b] = static_cast<Acc>(sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(DmolProblem p, int64_t blocks, const acc_t<T>* grad, T* out,
                    GradStrides strides) {
  using Acc = acc_t<T>;
  const int64_t b = int64_t(blockIdx.x) / blocks;
  const int64_t i = (int64_t(blockIdx.x) % blocks) * kThreads + threadIdx.x;
  if (i >= p.pixels) return;
  // Two passes over the components rather than a per-thread cache of them.
  dmol::pixel_nll_backward<0>(load_pixel<Acc>(p, b, i), pixel_params<T>(p, b, i), grad[b],
                              pixel_grad(out, strides, b, i));
}

// nll[b] from the partial sums (add_partials).
template <typename Acc>
void add_partials_launch(const DmolProblem& p, int64_t blocks, const double* partial, void* nll,
                         cudaStream_t s) {
  constexpr int threads = 128;
  add_partials<Acc><<<static_cast<unsigned>((p.batch + threads - 1) / threads), threads, 0, s>>>(
      partial, p.batch, blocks, static_cast<Acc*>(nll));
}

}  // namespace

int64_t dmol_workspace_bytes(const DmolProblem& p) {
  return p.batch * blocks_per_sample(p) * static_cast<int64_t>(sizeof(double));
}

void dmol_forward(const DmolProblem& p, void* nll, void* workspace, void* stream) {
  if (p.batch == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t blocks = blocks_per_sample(p);
  double* partial = static_cast<double*>(workspace);
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    if (blocks > 0) {
      forward_partials<T><<<static_cast<unsigned>(p.batch * blocks), kThreads, 0, s>>>(p, blocks,
                                                                                     partial);
    }
    add_partials_launch<Acc>(p, blocks, partial, nll, s);
  });
}

void dmol_forward_with_grad(const DmolProblem& p, void* nll, void* grad_params,
                            const int64_t* grad_strides, void* workspace, void* stream) {
  if (p.batch == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t blocks = blocks_per_sample(p);
  double* partial = static_cast<double*>(workspace);
  const GradStrides strides{{grad_strides[0], grad_strides[1], grad_strides[2]}};
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (blocks > 0) {
      forward_with_grad_partials<T><<<static_cast<unsigned>(p.batch * blocks), kThreads, 0, s>>>(
          p, blocks, partial, static_cast<T*>(grad_params), strides);
    }
    add_partials_launch<acc_t<T>>(p, blocks, partial, nll, s);
  });
}

void dmol_backward(const DmolProblem& p, const void* grad, void* grad_params,
                   const int64_t* grad_strides, void* stream) {
  const int64_t blocks = blocks_per_sample(p);
  if (p.batch == 0 || blocks == 0) return;
  const GradStrides strides{{grad_strides[0], grad_strides[1], grad_strides[2]}};
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    backward_kernel<T><<<static_cast<unsigned>(p.batch * blocks), kThreads, 0,
                         static_cast<cudaStream_t>(stream)>>>(
        p, blocks, static_cast<const acc_t<T>*>(grad), static_cast<T*>(grad_params), strides);
  });
}

}  // namespace cuda
}  // namespace fusedvae
