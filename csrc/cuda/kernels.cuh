// The CUDA kernels' shared parts: loads, per-element functors, reductions, the
// grid, the kernels and the launchers. No torch headers. kernels.cu launches
// the KL, continuous-Bernoulli and final-stage kernels; objective_<type>.cu
// instantiate the per-element objective kernels for one recon type each
// (objective_recon.cuh), so that nvcc compiles them in parallel.
//
// Work decomposition (shared by every kernel): a sample of N elements is cut
// into `chunks` chunks; block `item` handles chunk (item % chunks) of sample
// (item / chunks). Reductions write one partial per block (a fixed-order block
// tree) and a second kernel adds a sample's partials in chunk order, so results
// are bitwise reproducible run to run on a device, with no float atomics and no
// host synchronisation. Offsets are 64-bit throughout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../dispatch.h"
#include "../kernels.h"
#include "convert.cuh"

namespace fusedvae {
namespace cuda {
namespace detail {

// Threads per block: 8 warps, a multiple of 32 that block_sum's one-warp
// second stage (kThreads / 32 <= 32 partial sums) relies on.
constexpr int kThreads = 256;
constexpr int64_t kMinChunk = 4096;  // elements a block handles at least

// ---------------------------------------------------------------- loads ------

// VEC consecutive elements, loaded or stored in one instruction when aligned.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename Acc, typename T>
__device__ __forceinline__ void load(const T* ptr, int64_t i, Acc (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(ptr + i);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_acc<Acc>(pack.v[k]);
}

// One 16-byte store instruction (PTX st.global.v4.b32) to a 16-byte aligned
// global address. Assigning a Pack (or a uint4) compiled to one store per
// element in every kernel here that stores packs: nvcc 13 split the 16-byte
// store and did not merge it again (a minimal kernel keeps it whole), four
// times the store instructions for the same bytes. tests/test_build.py checks
// the PTX. The "memory" clobber keeps it ordered with the other accesses.
__device__ __forceinline__ void store_16_bytes(uint4* dst, const uint4& words) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(words.x), "r"(words.y),
               "r"(words.z), "r"(words.w)
               : "memory");
}

template <int VEC, typename T, typename Acc>
__device__ __forceinline__ void store(T* ptr, int64_t i, const Acc (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pack.v[k] = from_acc<T>(in[k]);
  constexpr int kBytes = sizeof(Pack<T, VEC>);
  if constexpr (kBytes % sizeof(uint4) == 0) {
#pragma unroll
    for (int piece = 0; piece < kBytes / int(sizeof(uint4)); ++piece) {
      uint4 words;
      memcpy(&words, reinterpret_cast<const char*>(&pack) + piece * sizeof(uint4), sizeof(uint4));
      store_16_bytes(reinterpret_cast<uint4*>(ptr + i) + piece, words);
    }
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(ptr + i) = pack;
  }
}

// ------------------------------------------------------------- per element --
// Each functor maps element i (and, for maps, its sample b) to its result.

// The weights of elements i .. i + VEC - 1 of one sample (WeightView in
// kernels.h), i counted from the first sample. The loop over dimensions runs
// to kMaxWeightDims, unrolled, so that w's arrays are indexed by constants: a
// run-time index would copy the kernel's whole functor, w inside it, to local
// memory, and every element's loads of its pointers would go there too.
template <int VEC, typename Acc>
__device__ __forceinline__ void load_weights(const WeightView& w, int64_t numel_per_sample,
                                             int64_t i, Acc (&out)[VEC]) {
  const Acc* data = static_cast<const Acc*>(w.data);
  const int64_t b = i / numel_per_sample;
  const int64_t first = i - b * numel_per_sample;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    int64_t k = first + e;
    int64_t offset = b * w.batch_stride;
#pragma unroll
    for (int d = kMaxWeightDims - 1; d >= 0; --d) {
      if (d < w.dims) {
        offset += (k % w.sizes[d]) * w.strides[d];
        k /= w.sizes[d];
      }
    }
    out[e] = data[offset];
  }
}

// O: the ops policy of the per-element math, math::ScalarOps<acc_t<T>> or, for
// the logits likelihoods under KernelOptions::cuda_fast_exp, math::FastExpOps
// (objective_recon.cuh).
template <class L, typename T, typename TargetT, typename ScaleT, class O>
struct ReconTerm {
  using Acc = acc_t<T>;
  const T* x;
  const TargetT* t;
  const ScaleT* s;
  WeightView w;
  int64_t numel_per_sample;
  template <int VEC>
  __device__ __forceinline__ Acc sum(int64_t i) const {
    Acc xv[VEC], tv[VEC], sv[VEC], wv[VEC];
    load<VEC>(x, i, xv);
    load<VEC>(t, i, tv);
    if constexpr (L::kHasScale) load<VEC>(s, i, sv);
    if (w.data != nullptr) load_weights<VEC>(w, numel_per_sample, i, wv);
    Acc total = 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      Acc value;
      if constexpr (L::kHasScale) {
        value = L::template loss<O>(xv[k], tv[k], sv[k]);
      } else {
        value = L::template loss<O>(xv[k], tv[k]);
      }
      total += w.data != nullptr ? wv[k] * value : value;
    }
    return total;
  }
};

// grad_x = g·∂ℓ/∂x (and grad_s = g·∂ℓ/∂s for the heteroscedastic Gaussian),
// with g the sample's coefficient (objective.h); O as in ReconTerm.
template <class L, typename T, typename TargetT, typename ScaleT, class O>
struct ReconGrad {
  using Acc = acc_t<T>;
  const T* x;
  const TargetT* t;
  const ScaleT* s;
  T* grad_x;
  ScaleT* grad_s;
  WeightView w;
  int64_t numel_per_sample;
  template <int VEC>
  __device__ __forceinline__ void apply(Acc coefficient, int64_t i) const {
    Acc xv[VEC], tv[VEC], gx[VEC], gv[VEC];
    load<VEC>(x, i, xv);
    load<VEC>(t, i, tv);
    if (w.data != nullptr) {
      load_weights<VEC>(w, numel_per_sample, i, gv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) gv[k] *= coefficient;
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) gv[k] = coefficient;
    }
    if constexpr (L::kHasScale) {
      Acc sv[VEC], gs[VEC];
      load<VEC>(s, i, sv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        L::template grad<O>(xv[k], tv[k], sv[k], &gx[k], &gs[k]);
        gx[k] *= gv[k];
        gs[k] *= gv[k];
      }
      if (grad_s != nullptr) store<VEC>(grad_s, i, gs);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) gx[k] = gv[k] * L::template grad<O>(xv[k], tv[k]);
    }
    store<VEC>(grad_x, i, gx);
  }
};

// The latent tensors' element i as Acc, whatever their dtype: the KL is a small
// part of the work, so one kernel per accumulation type serves every dtype.
template <typename Acc>
__device__ __forceinline__ Acc load_latent(const void* ptr, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(ptr)[i]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(ptr)[i]);
    case DType::kFloat64:
      return static_cast<Acc>(static_cast<const double*>(ptr)[i]);
    default:
      return static_cast<Acc>(static_cast<const float*>(ptr)[i]);
  }
}

template <typename Acc>
__device__ __forceinline__ void store_latent(void* ptr, DType dtype, int64_t i, Acc v) {
  switch (dtype) {
    case DType::kFloat16:
      static_cast<__half*>(ptr)[i] = __float2half_rn(static_cast<float>(v));
      return;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(ptr)[i] = __float2bfloat16_rn(static_cast<float>(v));
      return;
    case DType::kFloat64:
      static_cast<double*>(ptr)[i] = static_cast<double>(v);
      return;
    default:
      static_cast<float*>(ptr)[i] = static_cast<float>(v);
      return;
  }
}

template <typename Acc>
__device__ __forceinline__ Acc kl_element(const KlProblem& p, int64_t i) {
  using O = math::ScalarOps<Acc>;
  const Acc mu = load_latent<Acc>(p.mu, p.dtype, i);
  const Acc lv = load_latent<Acc>(p.logvar, p.dtype, i);
  if (!p.has_prior()) return math::kl_per_dim<O>(mu, lv);
  return math::kl_per_dim_prior<O>(mu, lv, load_latent<Acc>(p.prior_mu, p.dtype, i),
                                   load_latent<Acc>(p.prior_logvar, p.dtype, i));
}

template <typename T>
struct KlPerDim {
  using Acc = acc_t<T>;
  const T* mu;
  const T* lv;
  Acc* out;
  template <int VEC>
  __device__ __forceinline__ void apply(int64_t, int64_t i) const {
    Acc m[VEC], l[VEC], kl[VEC];
    load<VEC>(mu, i, m);
    load<VEC>(lv, i, l);
#pragma unroll
    for (int k = 0; k < VEC; ++k) kl[k] = math::kl_per_dim<math::ScalarOps<Acc>>(m[k], l[k]);
    store<VEC>(out, i, kl);
  }
};

template <typename T>
struct CbValue {
  using Acc = acc_t<T>;
  const T* eta;
  T* out;
  template <int VEC>
  __device__ __forceinline__ void apply(int64_t, int64_t i) const {
    Acc e[VEC];
    load<VEC>(eta, i, e);
#pragma unroll
    for (int k = 0; k < VEC; ++k) e[k] = math::cb_log_normalizer<math::ScalarOps<Acc>>(e[k]);
    store<VEC>(out, i, e);
  }
};

template <typename T>
struct CbGrad {
  using Acc = acc_t<T>;
  const T* eta;
  const T* grad;
  T* out;
  template <int VEC>
  __device__ __forceinline__ void apply(int64_t, int64_t i) const {
    Acc e[VEC], g[VEC];
    load<VEC>(eta, i, e);
    load<VEC>(grad, i, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      e[k] = g[k] * math::cb_log_normalizer_grad<math::ScalarOps<Acc>>(e[k]);
    }
    store<VEC>(out, i, e);
  }
};

// ---------------------------------------------------------------- drivers ---

struct Grid {
  int64_t chunk;   // elements per block, a multiple of the vector width
  int64_t chunks;  // blocks per sample
};

// Devices whose multiprocessor count is cached; a larger index is queried on
// every call.
constexpr int kMaxCachedDevices = 64;
// An A100's multiprocessor count, used only where the query fails. It sets how
// many blocks run, so the partial sums, and with them the last bits of a
// result, depend on it (results are reproducible per device, not across
// devices).
constexpr int kFallbackSmCount = 108;

inline int query_sm_count(int device) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      count <= 0) {
    return kFallbackSmCount;
  }
  return count;
}

// Multiprocessors of `device`, queried once per device. Any thread may call
// this (each CUDA stream of a process can run the ops): every thread that
// finds the cache empty queries and stores the same value.
inline int sm_count(int device) {
  static std::atomic<int> cached[kMaxCachedDevices] = {};
  if (device < 0 || device >= kMaxCachedDevices) return query_sm_count(device);
  int count = cached[device].load(std::memory_order_relaxed);
  if (count == 0) {
    count = query_sm_count(device);
    cached[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

inline int current_device() {
  int device = 0;
  cudaGetDevice(&device);
  return device;
}

// Blocks per multiprocessor that fill it: 8 blocks of kThreads = 256 are the
// 2048 threads an sm_80/sm_90 multiprocessor holds at once.
constexpr int64_t kBlocksPerSm = 2048 / kThreads;
// Every chunk starts on a pack boundary of an aligned sample: chunks are a
// multiple of this, a multiple of every vector width (vec_width() <= 8).
constexpr int64_t kChunkMultiple = 16;

// Enough blocks to fill the device (kBlocksPerSm per multiprocessor), none
// smaller than kMinChunk, chunks rounded up to kChunkMultiple.
inline Grid make_grid(int64_t batch, int64_t numel_per_sample, int device) {
  const int64_t target_blocks = int64_t(sm_count(device)) * kBlocksPerSm;
  int64_t chunks = batch > 0 ? (target_blocks + batch - 1) / batch : 1;
  const int64_t max_chunks = (numel_per_sample + kMinChunk - 1) / kMinChunk;
  chunks = chunks < max_chunks ? chunks : max_chunks;
  if (chunks < 1) chunks = 1;
  int64_t chunk = (numel_per_sample + chunks - 1) / chunks;
  chunk = (chunk + kChunkMultiple - 1) / kChunkMultiple * kChunkMultiple;
  chunks = chunk > 0 ? (numel_per_sample + chunk - 1) / chunk : 1;
  return Grid{chunk > 0 ? chunk : kChunkMultiple, chunks > 0 ? chunks : 1};
}

template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v) {
  __shared__ Acc warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : Acc(0);
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Visits chunk `item` (a block's index in its part of the grid): f(b, i, width) for element i of
// sample b, with width an integral_constant: VEC for the aligned runs, then 1 for the tail.
template <int VEC, class F>
__device__ __forceinline__ void for_each_in_chunk(int64_t item, int64_t numel_per_sample, Grid grid,
                                                  F&& f) {
  const int64_t b = item / grid.chunks;
  const int64_t first = (item - b * grid.chunks) * grid.chunk;
  const int64_t last = min(first + grid.chunk, numel_per_sample);
  const int64_t base = b * numel_per_sample;
  const int64_t vec_last = first + (last - first) / VEC * VEC;
  for (int64_t i = first + int64_t(threadIdx.x) * VEC; i < vec_last; i += int64_t(kThreads) * VEC) {
    f(b, base + i, std::integral_constant<int, VEC>{});
  }
  for (int64_t i = vec_last + threadIdx.x; i < last; i += kThreads) {
    f(b, base + i, std::integral_constant<int, 1>{});
  }
}

// partial[item] = Σ over the item's chunk of term; VEC-wide where aligned.
template <int VEC, class Term, typename Acc>
__global__ void __launch_bounds__(kThreads)
    sum_chunks_kernel(Term term, int64_t numel_per_sample, Grid grid, Acc* partial) {
  Acc acc = 0;
  for_each_in_chunk<VEC>(blockIdx.x, numel_per_sample, grid, [&](int64_t, int64_t i, auto width) {
    acc += term.template sum<decltype(width)::value>(i);
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// v summed over the block in a fixed order (block_sum), returned to every
// thread. Every thread of the block must call it.
template <typename Acc>
__device__ __forceinline__ Acc block_sum_all(Acc v) {
  __shared__ Acc total;
  v = block_sum(v);
  if (threadIdx.x == 0) total = v;
  __syncthreads();
  const Acc result = total;
  __syncthreads();
  return result;
}

template <int VEC, class Body>
__global__ void __launch_bounds__(kThreads)
    map_chunks_kernel(Body body, int64_t numel_per_sample, Grid grid) {
  for_each_in_chunk<VEC>(blockIdx.x, numel_per_sample, grid, [&](int64_t b, int64_t i, auto width) {
    body.template apply<decltype(width)::value>(b, i);
  });
}

// ------------------------------------------------------------ objective -----
// Forward: three kernels. (1) sum_chunks_kernel: the reconstruction's partial
// sums, one per (sample, chunk) block; (2) kl_forward_kernel: kl_b, one block
// per sample, and with free bits m_j = mean_b kl_bj, one thread per latent
// dimension; (3) finalize_kernel, one block: each sample's partials in chunk
// order, the shared scale, free bits, β and the reduction (objective.h).
// Backward: one kernel, the reconstruction's and the KL's gradients in one
// grid, each block first forming the batch-wide sums it needs itself.

template <typename Acc>
Acc* as_acc(void* p) {
  return static_cast<Acc*>(p);
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    kl_forward_kernel(KlProblem p, bool free_bits, Acc* kl, Acc* aux_kl, Acc* aux_dim_mean) {
  const int64_t block = blockIdx.x;
  if (block < p.batch) {
    const int64_t base = block * p.latent_dim;
    Acc acc = 0;
    for (int64_t j = threadIdx.x; j < p.latent_dim; j += kThreads)
      acc += kl_element<Acc>(p, base + j);
    acc = block_sum(acc);
    if (threadIdx.x == 0) {
      kl[block] = acc;
      aux_kl[block] = acc;
    }
  } else if (free_bits) {
    const int64_t j = (block - p.batch) * kThreads + threadIdx.x;
    if (j >= p.latent_dim) return;
    Acc total = 0;
    for (int64_t b = 0; b < p.batch; ++b) total += kl_element<Acc>(p, b * p.latent_dim + j);
    aux_dim_mean[j] = total / Acc(p.batch);
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(ObjectiveProblem p, const Acc* partial, int64_t chunks, Acc* loss, Acc* rec,
                    const Acc* kl, Acc* aux) {
  using namespace objective;
  const Objective& o = p.objective;
  const AuxLayout layout{o.batch, o.j};
  const int64_t batch = o.batch;
  const bool free_bits = o.free_bits > 0;
  const bool shared = uses_shared_scale(o);
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    double total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += static_cast<double>(partial[b * chunks + c]);
    rec[b] = static_cast<Acc>(total);
    if (!shared) aux[layout.residual() + b] = Acc(0);
  }
  if (!free_bits) {
    for (int64_t j = threadIdx.x; j < o.j; j += kThreads) aux[layout.kl_dim_mean() + j] = Acc(0);
  }
  Acc free_bits_term = 0;
  if (free_bits) {
    Acc part = 0;
    for (int64_t j = threadIdx.x; j < o.j; j += kThreads) {
      part += free_bits_clamp(aux[layout.kl_dim_mean() + j], Acc(o.free_bits));
    }
    free_bits_term = block_sum_all(part);
  }
  Acc s = 0;
  if (shared) {
    if (o.scale == ScaleKind::kValue) {
      s = Acc(o.log_scale_value);
    } else if (o.scale == ScaleKind::kTensor) {
      s = *static_cast<const Acc*>(p.log_scale_scalar);
    } else {
      // The batch's (weighted) mean residual.
      Acc part = 0, count = 0;
      for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
        part += rec[b];
        count += element_count<Acc>(p.weight_sums, p.weight_sums_stride, o.n, b);
      }
      const Acc total = block_sum_all(part);
      s = optimal_log_scale(p.recon.likelihood, total / block_sum_all(count));
    }
    for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
      aux[layout.residual() + b] = rec[b];
      const Acc n = element_count<Acc>(p.weight_sums, p.weight_sums_stride, o.n, b);
      rec[b] = shared_scale_terms(p.recon.likelihood, rec[b], s, n).rec;
    }
  }
  if (threadIdx.x == 0) {
    aux[AuxLayout::kLogScale] = s;
    aux[AuxLayout::kFreeBitsTerm] = free_bits_term;
  }
  const Acc beta = p.beta != nullptr ? *static_cast<const Acc*>(p.beta) : Acc(o.beta_value);
  Acc part = 0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    const Acc value = sample_loss(o, rec[b], free_bits ? free_bits_term : kl[b], beta);
    if (o.reduction == Reduction::kNone) {
      loss[b] = value;
    } else {
      part += value;
    }
  }
  if (o.reduction != Reduction::kNone) {
    const Acc total = block_sum_all(part);
    if (threadIdx.x == 0) loss[0] = o.reduction == Reduction::kSum ? total : total / Acc(batch);
  }
}

// The batch-wide sums of the backward (objective.h), formed by each block that
// needs them, in the same order in every block.
template <typename Acc>
struct BatchSums {
  Acc weight = 0;    // Σ_b d loss / d loss_b
  Acc grad_s = 0;    // Σ_b c_b·∂rec_b/∂s, c_b the coefficient of rec_b
  Acc residual = 0;  // Σ_b R_b
  Acc count = 0;     // Σ_b N_b (elements, or weight sums)
  Acc grad_beta = 0;
};

template <typename Acc>
__device__ BatchSums<Acc> batch_sums(const ObjectiveProblem& p, const OutputGrads& g,
                                     const Acc* aux, bool want_weight, bool want_scale,
                                     bool want_beta) {
  using namespace objective;
  const Objective& o = p.objective;
  const AuxLayout layout{o.batch, o.j};
  const Acc s = aux[AuxLayout::kLogScale];
  Acc weight = 0, grad_s = 0, residual = 0, count = 0, grad_beta = 0;
  for (int64_t b = threadIdx.x; b < o.batch; b += kThreads) {
    const Acc w = sample_weight(o, static_cast<const Acc*>(g.loss), g.loss_stride, b);
    weight += w;
    if (want_scale) {
      const Acc r = aux[layout.residual() + b];
      const Acc n = element_count<Acc>(p.weight_sums, p.weight_sums_stride, o.n, b);
      grad_s += rec_coefficient<Acc>(p.objective, g, b) *
                shared_scale_terms(p.recon.likelihood, r, s, n).d_scale;
      residual += r;
      count += n;
    }
    const Acc kl_term = o.free_bits > 0 ? aux[AuxLayout::kFreeBitsTerm] : aux[layout.kl() + b];
    grad_beta += w * kl_weight<Acc>(o) * kl_term;
  }
  BatchSums<Acc> sums;
  if (want_weight) sums.weight = block_sum_all(weight);
  if (want_scale) {
    sums.grad_s = block_sum_all(grad_s);
    sums.residual = block_sum_all(residual);
    sums.count = block_sum_all(count);
  }
  if (want_beta) sums.grad_beta = block_sum_all(grad_beta);
  return sums;
}

template <int VEC, class L, typename T, typename TargetT, typename ScaleT, class O>
__global__ void __launch_bounds__(kThreads)
    objective_backward_kernel(ObjectiveProblem p, OutputGrads g, const acc_t<T>* aux,
                              ObjectiveGrads out, Grid recon_grid, int64_t recon_blocks,
                              Grid kl_grid) {
  using Acc = acc_t<T>;
  using namespace objective;
  const Objective& o = p.objective;
  const AuxLayout layout{o.batch, o.j};
  const bool shared = uses_shared_scale(o);
  const bool free_bits = o.free_bits > 0;
  const bool recon_part = blockIdx.x < recon_blocks;
  const bool first = blockIdx.x == 0;
  const BatchSums<Acc> sums =
      batch_sums<Acc>(p, g, aux, /*want_weight=*/free_bits && !recon_part,
                      /*want_scale=*/shared && ((recon_part && o.scale == ScaleKind::kOptimal) ||
                                                (first && out.log_scale != nullptr)),
                      /*want_beta=*/first && out.beta != nullptr);
  if (first && threadIdx.x == 0) {
    if (shared && out.log_scale != nullptr) *static_cast<Acc*>(out.log_scale) = sums.grad_s;
    if (out.beta != nullptr) *static_cast<Acc*>(out.beta) = sums.grad_beta;
  }
  const Acc beta = p.beta != nullptr ? *static_cast<const Acc*>(p.beta) : Acc(o.beta_value);

  if (recon_part) {
    const int64_t b = blockIdx.x / recon_grid.chunks;
    Acc c = rec_coefficient<Acc>(p.objective, g, b);
    if (shared) {
      // c_b·∂rec_b/∂R_b, plus for "optimal" the path through s; the kernel
      // multiplies the residual's derivative by it (cpu/objective.cpp).
      const Acc s = aux[AuxLayout::kLogScale];
      Acc through_scale = 0;
      if (o.scale == ScaleKind::kOptimal) {
        through_scale = sums.grad_s *
                        optimal_log_scale_grad(p.recon.likelihood, sums.residual / sums.count) /
                        sums.count;
      }
      c = c * shared_scale_terms(p.recon.likelihood, Acc(0), s, Acc(1)).d_residual + through_scale;
    }
    if (out.recon_coef != nullptr) {
      if (blockIdx.x % recon_grid.chunks == 0 && threadIdx.x == 0) {
        static_cast<Acc*>(out.recon_coef)[b] = c / unit_rec_coefficient<Acc>(o);
      }
      return;
    }
    const ReconGrad<L, T, TargetT, ScaleT, O> body{
        static_cast<const T*>(p.recon.recon),
        static_cast<const TargetT*>(p.recon.target),
        static_cast<const ScaleT*>(p.recon.log_scale),
        static_cast<T*>(out.recon),
        shared ? nullptr : static_cast<ScaleT*>(out.log_scale),
        p.recon.weight,
        o.n};
    for_each_in_chunk<VEC>(blockIdx.x, o.n, recon_grid, [&](int64_t, int64_t i, auto width) {
      body.template apply<decltype(width)::value>(c, i);
    });
    return;
  }
  if (out.mu == nullptr) return;
  const int64_t item = blockIdx.x - recon_blocks;
  const int64_t b = item / kl_grid.chunks;
  if (b >= o.batch) return;
  const Acc w = sample_weight(o, static_cast<const Acc*>(g.loss), g.loss_stride, b);
  const Acc row = (free_bits ? Acc(0) : w * beta * kl_weight<Acc>(o)) +
                  per_sample_grad(static_cast<const Acc*>(g.kl), g.kl_stride, b);
  const Acc col_scale = sums.weight * beta * kl_weight<Acc>(o) / Acc(o.batch);
  for_each_in_chunk<1>(item, o.j, kl_grid, [&](int64_t, int64_t i, auto) {
    Acc c = row;
    if (free_bits) {
      c += col_scale * free_bits_pass(aux[layout.kl_dim_mean() + (i - b * o.j)], Acc(o.free_bits));
    }
    const Acc mu = load_latent<Acc>(p.kl.mu, p.kl.dtype, i);
    const Acc lv = load_latent<Acc>(p.kl.logvar, p.kl.dtype, i);
    store_latent<Acc>(out.mu, p.kl.dtype, i, c * mu);
    store_latent<Acc>(out.logvar, p.kl.dtype, i,
                      c * math::kl_grad_logvar<math::ScalarOps<Acc>>(lv));
  });
}

// Each gradient of `grads` = c·∂kl/∂(its input) with c from KlCoefficients,
// one thread per element.
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    kl_backward_kernel(KlProblem p, KlCoefficients coef, KlGrads grads) {
  using O = math::ScalarOps<Acc>;
  const int64_t numel = p.batch * p.latent_dim;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t b = i / p.latent_dim;
    Acc c;
    if (coef.per_element != nullptr) {
      c = static_cast<const Acc*>(coef.per_element)[i];
    } else {
      c = coef.per_sample != nullptr ? static_cast<const Acc*>(coef.per_sample)[b] : Acc(0);
      if (coef.per_dim != nullptr) c += static_cast<const Acc*>(coef.per_dim)[i - b * p.latent_dim];
    }
    const Acc mu = load_latent<Acc>(p.mu, p.dtype, i);
    const Acc lv = load_latent<Acc>(p.logvar, p.dtype, i);
    if (!p.has_prior()) {
      store_latent<Acc>(grads.mu, p.dtype, i, c * mu);
      store_latent<Acc>(grads.logvar, p.dtype, i, c * math::kl_grad_logvar<O>(lv));
      continue;
    }
    const auto d = math::kl_prior_grad<O>(mu, lv, load_latent<Acc>(p.prior_mu, p.dtype, i),
                                          load_latent<Acc>(p.prior_logvar, p.dtype, i));
    store_latent<Acc>(grads.mu, p.dtype, i, c * d.mu);
    store_latent<Acc>(grads.logvar, p.dtype, i, c * d.logvar);
    store_latent<Acc>(grads.prior_mu, p.dtype, i, c * d.prior_mu);
    store_latent<Acc>(grads.prior_logvar, p.dtype, i, c * d.prior_logvar);
  }
}

// Elements per vector access: 16 bytes of recon's type T (4 floats, 2 doubles,
// 8 halves), at most 8. The other operands of a kernel load the same number of
// their own elements, so a uint8 target is read VEC bytes at a time.
constexpr int kLoadBytes = 16;   // the widest load one thread issues
constexpr int kMaxVecWidth = 8;  // kChunkMultiple is a multiple of it
static_assert(kChunkMultiple % kMaxVecWidth == 0, "a chunk must start on a pack boundary");
template <typename T>
constexpr int vec_width() {
  return kLoadBytes / sizeof(T) > kMaxVecWidth ? kMaxVecWidth : int(kLoadBytes / sizeof(T));
}

// KernelOptions::cuda_wide_loads: 16 bytes of the narrower of recon (T) and
// target per access, at most 64 bytes of recon (four 16-byte loads), at most
// 16 elements (kChunkMultiple).
constexpr int kMaxWideBytes = 64;
template <typename T, typename TargetT>
constexpr int wide_vec_width() {
  constexpr int narrow = sizeof(T) < sizeof(TargetT) ? int(sizeof(T)) : int(sizeof(TargetT));
  constexpr int width = kLoadBytes / narrow < int(kMaxWideBytes / sizeof(T))
                            ? kLoadBytes / narrow
                            : int(kMaxWideBytes / sizeof(T));
  return width < int(kChunkMultiple) ? width : int(kChunkMultiple);
}
static_assert(
    wide_vec_width<float, uint8_t>() == 16 && wide_vec_width<double, uint8_t>() == 8 &&
        wide_vec_width<float, float>() == vec_width<float>(),
    "wide loads: 16 pixels beside float32, 64 bytes of float64, unchanged for equal dtypes");

// The vector path needs every pointer aligned to its pack and every sample
// start on a pack boundary (automatic for a single sample); otherwise the
// scalar path runs.
template <int VEC>
bool aligned(int64_t batch, int64_t numel_per_sample,
             std::initializer_list<std::pair<const void*, int>> ptrs) {
  if (batch > 1 && numel_per_sample % VEC != 0) return false;
  for (const auto& p : ptrs) {
    if (p.first != nullptr &&
        reinterpret_cast<uintptr_t>(p.first) % (uintptr_t(p.second) * VEC) != 0) {
      return false;
    }
  }
  return true;
}

// Calls launch(width) with the widest vector width whose alignment holds
// (aligned_for(width)): WIDE where KernelOptions::cuda_wide_loads is on and it
// differs from VEC, else VEC, else 1 (scalar).
template <int VEC, int WIDE, class Aligned, class Launch>
void launch_widest(const Aligned& aligned_for, const Launch& launch) {
  if constexpr (WIDE > VEC) {
    if (kernel_options().cuda_wide_loads.load(std::memory_order_relaxed) &&
        aligned_for(std::integral_constant<int, WIDE>{})) {
      launch(std::integral_constant<int, WIDE>{});
      return;
    }
  }
  if (aligned_for(std::integral_constant<int, VEC>{})) {
    launch(std::integral_constant<int, VEC>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <int VEC, class Body>
void launch_map(const Body& body, bool vectorize, int64_t batch, int64_t numel_per_sample,
                cudaStream_t stream) {
  if (batch == 0 || numel_per_sample == 0) return;
  const Grid grid = make_grid(batch, numel_per_sample, current_device());
  const unsigned blocks = static_cast<unsigned>(batch * grid.chunks);
  if (vectorize) {
    map_chunks_kernel<VEC><<<blocks, kThreads, 0, stream>>>(body, numel_per_sample, grid);
  } else {
    map_chunks_kernel<1><<<blocks, kThreads, 0, stream>>>(body, numel_per_sample, grid);
  }
}

// Blocks of a grid-stride elementwise kernel over `numel` elements.
inline unsigned elementwise_blocks(int64_t numel) {
  const int64_t wanted = (numel + kThreads - 1) / kThreads;
  const int64_t most = int64_t(sm_count(current_device())) * kBlocksPerSm;
  return static_cast<unsigned>(wanted < most ? (wanted > 0 ? wanted : 1) : most);
}

inline int64_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

template <typename F>
void dispatch_acc(DType recon_dtype, F&& f) {
  if (recon_dtype == DType::kFloat64) {
    f(TypeTag<double>{});
  } else {
    f(TypeTag<float>{});
  }
}

// The objective's per-element stages for a recon of type T (float, double,
// __half, __nv_bfloat16), defined in objective_recon.cuh and instantiated once
// per type in objective_<type>.cu.
template <typename T>
void objective_forward_recon(const ObjectiveProblem& p, Grid grid, void* workspace,
                             cudaStream_t stream);
template <typename T>
void objective_backward_recon(const ObjectiveProblem& p, const OutputGrads& grads, const void* aux,
                              const ObjectiveGrads& out, cudaStream_t stream);

}  // namespace detail
}  // namespace cuda
}  // namespace fusedvae
