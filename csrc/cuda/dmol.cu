// The discretized mixture of logistics on CUDA: dmol.h's per-pixel math, each
// pixel on `split` adjacent threads of a warp (1, 2 or 4), thread r of a pixel
// taking the components r, r + split, ...; their log-sum-exps are merged with
// warp shuffles. A split above 1 is used where one thread per pixel would leave
// the GPU mostly idle (small images: 32x3x32x32 is 32768 pixels, an eighth of
// what an H100's multiprocessors hold), since a pixel is a long chain of
// dependent transcendental functions. The forward writes one partial sum per
// block (a fixed-order block tree over its pixels) and a second kernel adds
// each sample's partials in a fixed order: reproducible run to run, no atomics,
// no host synchronisation. The forward can also keep each pixel's NLL, which
// lets the backward take one pass over a pixel's components instead of two:
// what dmol_nll's autograd does on CUDA (csrc/autograd.cpp), two passes per
// training step and no pass over the gradient to scale it. The forward with
// the gradient (dmol_forward_with_grad) sums the same log-likelihoods while it
// writes the gradient for an output gradient of 1, in two passes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../dispatch.h"
#include "../dmol.h"
#include "../kernels.h"
#include "convert.cuh"
#include "kernels.cuh"

namespace fusedvae {
namespace cuda {
namespace {

// Threads per block: 8 warps; block_sum's second stage sums kThreads / 32 <= 32
// warp totals in one warp.
constexpr int kThreads = 256;
// Threads a multiprocessor of sm_80/sm_90 keeps resident at the kernels' 64
// registers per thread (65536 registers): the split is the largest that keeps
// the threads of all pixels within what the GPU holds at once.
constexpr int64_t kResidentThreadsPerSm = 65536 / 64;
constexpr int kMaxSplit = 4;
// Blocks a multiprocessor keeps resident: 4 caps the per-pixel kernels at 64
// registers a thread (kResidentThreadsPerSm).
constexpr int kMinBlocksPerSm = kResidentThreadsPerSm / kThreads;

template <typename Acc, typename T>
struct Read {
  const T* base;
  int64_t stride;
  __device__ Acc operator()(int64_t j) const { return to_acc<Acc>(base[j * stride]); }
};

// The ops policy O of a kernel: math::ScalarOps<acc_t<T>>, or for float
// accumulation one with the hardware's logarithm or exponential (with_ops).
template <class O>
__device__ dmol::Pixel<O> load_pixel(const DmolProblem& p, int64_t b, int64_t i) {
  using Acc = typename O::V;
  dmol::Pixel<O> px;
  px.channels = p.channels;
  px.k = p.k;
  px.half_width = static_cast<Acc>(p.half_width);
  px.log_scale_min = static_cast<Acc>(p.log_scale_min);
  dmol::for_each_channel(px, [&](auto c) {
    const int64_t at = b * p.target_strides[0] + c * p.target_strides[1] + i * p.target_strides[2];
    if (p.target_dtype == DType::kUInt8) {
      // v / 127.5 - 1 = 2·(v / 255) - 1, the doubling exact (as the CPU reads it).
      px.x[c] = Acc(2) * to_acc<Acc>(static_cast<const uint8_t*>(p.target)[at]) - Acc(1);
    } else if (p.target_dtype == DType::kFloat64) {
      px.x[c] = static_cast<Acc>(static_cast<const double*>(p.target)[at]);
    } else {
      px.x[c] = static_cast<Acc>(static_cast<const float*>(p.target)[at]);
    }
  });
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

// Threads per pixel: 4, 2 or 1, at most the components (every thread has one).
int pixel_split(const DmolProblem& p) {
  const int64_t resident =
      int64_t(detail::sm_count(detail::current_device())) * kResidentThreadsPerSm;
  int split = kMaxSplit;
  while (split > 1 && (split > p.k || p.batch * p.pixels * split > resident)) split /= 2;
  return split;
}

int64_t blocks_per_sample(const DmolProblem& p, int split) {
  return (p.pixels * split + kThreads - 1) / kThreads;
}

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

// This thread's place: sample b, pixel i, component offset r < kSplit.
template <int kSplit>
struct Place {
  int64_t b, i;
  int r;
  __device__ Place(int64_t blocks) {
    b = int64_t(blockIdx.x) / blocks;
    const int64_t item = (int64_t(blockIdx.x) % blocks) * kThreads + threadIdx.x;
    i = item / kSplit;
    r = static_cast<int>(item % kSplit);
  }
};

// log p(pixel) from this thread's components r, r + kSplit, ..., merged with
// the pixel's other threads (all of them call it: a pixel's threads are in or
// out of range together). Every thread of the pixel returns the same bits.
template <int kSplit, class O, typename Read>
__device__ typename O::V split_log_likelihood(const dmol::Pixel<O>& px, const Read& p,
                                              typename O::V norm, int r) {
  dmol::LogSumExp<O> lse = dmol::components_log_sum_exp(px, p, norm, r, kSplit);
  if constexpr (kSplit > 1) {
    const unsigned lanes = ((1u << kSplit) - 1u) << (threadIdx.x % 32 / kSplit * kSplit);
    for (int d = 1; d < kSplit; d *= 2) {
      lse.merge(__shfl_xor_sync(lanes, lse.max, d), __shfl_xor_sync(lanes, lse.sum, d));
    }
  }
  return lse.value();
}

// Writes g times the gradient of this thread's components; returns log p(pixel).
// Given the forward's -log p(pixel) (`nll`, not null), one pass over the
// components; otherwise a first pass forms log p(pixel).
template <int kSplit, class O, typename Read, typename G, typename Write>
__device__ typename O::V split_backward(const dmol::Pixel<O>& px, const Read& p, int r, const G& g,
                                        const Write& write, const typename O::V* nll) {
  const typename O::V norm = dmol::logit_normalizer(px, p);
  const typename O::V log_like =
      nll != nullptr ? O::splat(0.0) - *nll : split_log_likelihood<kSplit>(px, p, norm, r);
  dmol::components_backward(px, p, norm, log_like, r, kSplit, g, write);
  return log_like;
}

// partial[b · blocks + block] = Σ over the block's pixels of -log p(pixel),
// and pixel_nll[b · pixels + i] = -log p(pixel i) where pixel_nll is not null.
// Block `item` covers items [chunk·kThreads, (chunk + 1)·kThreads) of sample b,
// item = b · blocks + chunk (a one-dimensional grid: any batch size). With
// kWithGrad the same sums, and the gradient for an output gradient of 1 written
// as dmol_backward_kernel writes it.
template <int kSplit, bool kWithGrad, typename T, class O>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    forward_partials(DmolProblem p, int64_t blocks, double* partial, acc_t<T>* pixel_nll, T* out,
                     GradStrides strides) {
  using Acc = acc_t<T>;
  const Place<kSplit> at(blocks);
  double v = 0.0;
  if (at.i < p.pixels) {
    const auto px = load_pixel<O>(p, at.b, at.i);
    const auto read = pixel_params<T>(p, at.b, at.i);
    Acc log_like;
    if constexpr (kWithGrad) {
      log_like = split_backward<kSplit>(px, read, at.r, dmol::UnitScale{},
                                        pixel_grad(out, strides, at.b, at.i), nullptr);
    } else {
      log_like = split_log_likelihood<kSplit>(px, read, dmol::logit_normalizer(px, read), at.r);
    }
    if (at.r == 0) {
      const Acc nll = Acc(0) - log_like;
      if (pixel_nll != nullptr) pixel_nll[at.b * p.pixels + at.i] = nll;
      v = static_cast<double>(nll);
    }
  }
  v = block_sum(v);
  if (threadIdx.x == 0) partial[blockIdx.x] = v;
}

// nll[b] = the sum of partial[b · blocks + block], one warp per sample: lane l
// adds blocks l, l + 32, ... in order, then a fixed shuffle tree adds the lanes.
constexpr int kSumWarps = 4;
template <typename Acc>
__global__ void __launch_bounds__(kSumWarps * 32)
    add_partials(const double* partial, int64_t batch, int64_t blocks, Acc* nll) {
  const int64_t b = int64_t(blockIdx.x) * kSumWarps + threadIdx.x / 32;
  if (b >= batch) return;  // whole warps: the shuffles below see all 32 lanes
  const int lane = threadIdx.x % 32;
  double sum = 0.0;
  for (int64_t k = lane; k < blocks; k += 32) sum += partial[b * blocks + k];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (lane == 0) nll[b] = static_cast<Acc>(sum);
}

// Without pixel_nll, two passes over the components rather than a per-thread
// cache of them; with it, one.
template <int kSplit, typename T, class O>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    dmol_backward_kernel(DmolProblem p, int64_t blocks, const acc_t<T>* grad,
                         const acc_t<T>* pixel_nll, T* out, GradStrides strides) {
  const Place<kSplit> at(blocks);
  if (at.i >= p.pixels) return;
  split_backward<kSplit>(load_pixel<O>(p, at.b, at.i), pixel_params<T>(p, at.b, at.i), at.r,
                         grad[at.b], pixel_grad(out, strides, at.b, at.i),
                         pixel_nll != nullptr ? pixel_nll + at.b * p.pixels + at.i : nullptr);
}

// f(std::integral_constant<int, split>{}) for the problem's split.
template <typename F>
void with_split(int split, const F& f) {
  if (split == 4) {
    f(std::integral_constant<int, 4>{});
  } else if (split == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// f(O{}) for the ops policy of T's kernels (load_pixel): with float
// accumulation, the hardware's logarithm and exponential under
// KernelOptions::cuda_mixture_fast_math, and its inverse scales and bin
// widths under cuda_mixture_fast_scale as well.
template <typename T, typename F>
void with_ops(const F& f) {
  using Acc = acc_t<T>;
  if constexpr (std::is_same_v<Acc, float>) {
    const KernelOptions& options = kernel_options();
    if (options.cuda_mixture_fast_math.load(std::memory_order_relaxed)) {
      if (options.cuda_mixture_fast_scale.load(std::memory_order_relaxed)) {
        return f(math::FastScaleOps{});
      }
      return f(math::FastLogExpOps{});
    }
  }
  f(math::ScalarOps<Acc>{});
}

// dmol_forward's launches, and with grad_params dmol_forward_with_grad's.
void forward_launches(const DmolProblem& p, void* nll, void* pixel_nll, void* grad_params,
                      const int64_t* grad_strides, void* workspace, void* stream) {
  if (p.batch == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int split = pixel_split(p);
  const int64_t blocks = blocks_per_sample(p, split);
  double* partial = static_cast<double*>(workspace);
  const GradStrides strides = grad_params != nullptr
                                  ? GradStrides{{grad_strides[0], grad_strides[1], grad_strides[2]}}
                                  : GradStrides{{0, 0, 0}};
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    T* out = static_cast<T*>(grad_params);
    if (blocks > 0) {
      with_ops<T>([&](auto ops) {
        using O = decltype(ops);
        with_split(split, [&](auto n) {
          constexpr int kSplit = decltype(n)::value;
          const auto kernel = grad_params != nullptr ? forward_partials<kSplit, true, T, O>
                                                     : forward_partials<kSplit, false, T, O>;
          kernel<<<static_cast<unsigned>(p.batch * blocks), kThreads, 0, s>>>(
              p, blocks, partial, static_cast<Acc*>(pixel_nll), out, strides);
        });
      });
    }
    add_partials<Acc>
        <<<static_cast<unsigned>((p.batch + kSumWarps - 1) / kSumWarps), kSumWarps * 32, 0, s>>>(
            partial, p.batch, blocks, static_cast<Acc*>(nll));
  });
}

}  // namespace

int64_t dmol_workspace_bytes(const DmolProblem& p) {
  return p.batch * blocks_per_sample(p, pixel_split(p)) * static_cast<int64_t>(sizeof(double));
}

void dmol_forward(const DmolProblem& p, void* nll, void* pixel_nll, void* workspace, void* stream) {
  forward_launches(p, nll, pixel_nll, nullptr, nullptr, workspace, stream);
}

void dmol_forward_with_grad(const DmolProblem& p, void* nll, void* grad_params,
                            const int64_t* grad_strides, void* workspace, void* stream) {
  forward_launches(p, nll, nullptr, grad_params, grad_strides, workspace, stream);
}

void dmol_backward(const DmolProblem& p, const void* grad, const void* pixel_nll, void* grad_params,
                   const int64_t* grad_strides, void* stream) {
  const int split = pixel_split(p);
  const int64_t blocks = blocks_per_sample(p, split);
  if (p.batch == 0 || blocks == 0) return;
  const GradStrides strides{{grad_strides[0], grad_strides[1], grad_strides[2]}};
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_ops<T>([&](auto ops) {
      with_split(split, [&](auto n) {
        dmol_backward_kernel<decltype(n)::value, T, decltype(ops)>
            <<<static_cast<unsigned>(p.batch * blocks), kThreads, 0,
               static_cast<cudaStream_t>(stream)>>>(p, blocks, static_cast<const acc_t<T>*>(grad),
                                                    static_cast<const acc_t<T>*>(pixel_nll),
                                                    static_cast<T*>(grad_params), strides);
      });
    });
  });
}

}  // namespace cuda
}  // namespace fusedvae
