// CUDA kernels: the per-element math of vae_math.h over raw pointers. No torch
// headers, so nvcc compiles this file in seconds; cuda/register.cpp supplies
// the stream, the device and the workspace.
//
// Work decomposition (shared by every kernel): a sample of N elements is cut
// into `chunks` chunks; block `item` handles chunk (item % chunks) of sample
// (item / chunks). Reductions write one partial per block (a fixed-order block
// tree) and a second kernel adds a sample's partials in chunk order, so results
// are bitwise reproducible run to run on a device, with no float atomics and no
// host synchronisation. Offsets are 64-bit throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../dispatch.h"
#include "../kernels.h"

namespace fusedvae {
namespace cuda {
namespace {

using math::Likelihood;

// Threads per block: 8 warps, a multiple of 32 that block_sum's one-warp
// second stage (kThreads / 32 <= 32 partial sums) relies on.
constexpr int kThreads = 256;
constexpr int64_t kMinChunk = 4096;  // elements a block handles at least

// ---------------------------------------------------------------- loads ------

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same_v<T, uint8_t>) {
    return static_cast<Acc>(v) / Acc(255);  // pixels; same rounding as the CPU path
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

template <int VEC, typename T, typename Acc>
__device__ __forceinline__ void store(T* ptr, int64_t i, const Acc (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pack.v[k] = from_acc<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(ptr + i) = pack;
}

// ------------------------------------------------------------- per element --
// Each functor maps element i (and, for maps, its sample b) to its result.

template <Likelihood L, typename T, typename TargetT, typename ScaleT>
struct ReconTerm {
  using Acc = acc_t<T>;
  const T* x;
  const TargetT* t;
  const ScaleT* s;
  template <int VEC>
  __device__ __forceinline__ Acc sum(int64_t i) const {
    using O = math::ScalarOps<Acc>;
    Acc xv[VEC], tv[VEC], sv[VEC];
    load<VEC>(x, i, xv);
    load<VEC>(t, i, tv);
    if constexpr (L == Likelihood::kGaussian) load<VEC>(s, i, sv);
    Acc total = 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if constexpr (L == Likelihood::kGaussian) {
        total += math::gaussian_loss<O>(xv[k], tv[k], sv[k]);
      } else {
        total += math::recon_loss<L, O>(xv[k], tv[k]);
      }
    }
    return total;
  }
};

template <Likelihood L, typename T, typename TargetT, typename ScaleT>
struct ReconGrad {
  using Acc = acc_t<T>;
  const T* x;
  const TargetT* t;
  const ScaleT* s;
  const Acc* grad_rec;  // [batch]
  T* grad_x;
  ScaleT* grad_s;
  template <int VEC>
  __device__ __forceinline__ void apply(int64_t b, int64_t i) const {
    using O = math::ScalarOps<Acc>;
    const Acc g = grad_rec[b];
    Acc xv[VEC], tv[VEC], gx[VEC];
    load<VEC>(x, i, xv);
    load<VEC>(t, i, tv);
    if constexpr (L == Likelihood::kGaussian) {
      Acc sv[VEC], gs[VEC];
      load<VEC>(s, i, sv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        math::gaussian_grad<O>(xv[k], tv[k], sv[k], &gx[k], &gs[k]);
        gx[k] *= g;
        gs[k] *= g;
      }
      store<VEC>(grad_s, i, gs);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) gx[k] = g * math::recon_loss_grad<L, O>(xv[k], tv[k]);
    }
    store<VEC>(grad_x, i, gx);
  }
};

template <typename T>
struct KlTerm {
  using Acc = acc_t<T>;
  const T* mu;
  const T* lv;
  template <int VEC>
  __device__ __forceinline__ Acc sum(int64_t i) const {
    Acc m[VEC], l[VEC];
    load<VEC>(mu, i, m);
    load<VEC>(lv, i, l);
    Acc total = 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) total += math::kl_per_dim<math::ScalarOps<Acc>>(m[k], l[k]);
    return total;
  }
};

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
struct KlGrad {
  using Acc = acc_t<T>;
  const T* mu;
  const T* lv;
  const Acc* grad;  // [batch] or per element
  bool per_dim;
  T* grad_mu;
  T* grad_lv;
  template <int VEC>
  __device__ __forceinline__ void apply(int64_t b, int64_t i) const {
    Acc m[VEC], l[VEC], g[VEC];
    load<VEC>(mu, i, m);
    load<VEC>(lv, i, l);
    if (per_dim) {
      load<VEC>(grad, i, g);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[k] = grad[b];
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      m[k] = g[k] * m[k];
      l[k] = g[k] * math::kl_grad_logvar<math::ScalarOps<Acc>>(l[k]);
    }
    store<VEC>(grad_mu, i, m);
    store<VEC>(grad_lv, i, l);
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

int query_sm_count(int device) {
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
int sm_count(int device) {
  static std::atomic<int> cached[kMaxCachedDevices] = {};
  if (device < 0 || device >= kMaxCachedDevices) return query_sm_count(device);
  int count = cached[device].load(std::memory_order_relaxed);
  if (count == 0) {
    count = query_sm_count(device);
    cached[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

int current_device() {
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
Grid make_grid(int64_t batch, int64_t numel_per_sample, int device) {
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

// Visits this block's chunk: f(b, i, width) for element i of sample b, with
// width an integral_constant: VEC for the aligned runs, then 1 for the tail.
template <int VEC, class F>
__device__ __forceinline__ void for_each_in_chunk(int64_t numel_per_sample, Grid grid, F&& f) {
  const int64_t item = blockIdx.x;
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
  for_each_in_chunk<VEC>(numel_per_sample, grid, [&](int64_t, int64_t i, auto width) {
    acc += term.template sum<decltype(width)::value>(i);
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[b] = Σ_c partial[b, c] in chunk order (double, then rounded).
template <typename Acc>
__global__ void sum_partials_kernel(const Acc* partial, int64_t batch, int64_t chunks, Acc* out) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += static_cast<double>(partial[b * chunks + c]);
  out[b] = static_cast<Acc>(total);
}

template <int VEC, class Body>
__global__ void __launch_bounds__(kThreads)
    map_chunks_kernel(Body body, int64_t numel_per_sample, Grid grid) {
  for_each_in_chunk<VEC>(numel_per_sample, grid, [&](int64_t b, int64_t i, auto width) {
    body.template apply<decltype(width)::value>(b, i);
  });
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

template <int VEC, class Term, typename Acc>
void launch_sum(const Term& term, bool vectorize, int64_t batch, int64_t numel_per_sample, Acc* out,
                void* workspace, cudaStream_t stream) {
  if (batch == 0) return;
  const Grid grid = make_grid(batch, numel_per_sample, current_device());
  Acc* partial = static_cast<Acc*>(workspace);
  const unsigned blocks = static_cast<unsigned>(batch * grid.chunks);
  if (vectorize) {
    sum_chunks_kernel<VEC><<<blocks, kThreads, 0, stream>>>(term, numel_per_sample, grid, partial);
  } else {
    sum_chunks_kernel<1><<<blocks, kThreads, 0, stream>>>(term, numel_per_sample, grid, partial);
  }
  // One thread per sample, kThreads to a block.
  sum_partials_kernel<<<static_cast<unsigned>((batch + kThreads - 1) / kThreads), kThreads, 0,
                        stream>>>(partial, batch, grid.chunks, out);
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

int64_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

}  // namespace

int64_t recon_loss_workspace_bytes(const ReconProblem& p, int device) {
  const Grid grid = make_grid(p.batch, p.numel_per_sample, device);
  return p.batch * grid.chunks * acc_size(p.dtype);
}

int64_t gaussian_kl_workspace_bytes(const KlProblem& p, int device) {
  const Grid grid = make_grid(p.batch, p.latent_dim, device);
  return p.batch * grid.chunks * acc_size(p.dtype);
}

void recon_loss_forward(const ReconProblem& p, void* rec, void* workspace, void* stream) {
  dispatch_recon<__half, __nv_bfloat16>(p, [&](auto l, auto x_tag, auto t_tag, auto s_tag) {
    using T = typename decltype(x_tag)::type;
    using TargetT = typename decltype(t_tag)::type;
    using ScaleT = typename decltype(s_tag)::type;
    constexpr int VEC = vec_width<T>();
    const ReconTerm<decltype(l)::value, T, TargetT, ScaleT> term{
        static_cast<const T*>(p.recon), static_cast<const TargetT*>(p.target),
        static_cast<const ScaleT*>(p.log_scale)};
    const bool vectorize = aligned<VEC>(p.batch, p.numel_per_sample,
                                        {{p.recon, int(sizeof(T))},
                                         {p.target, int(sizeof(TargetT))},
                                         {p.log_scale, int(sizeof(ScaleT))}});
    launch_sum<VEC>(term, vectorize, p.batch, p.numel_per_sample, static_cast<acc_t<T>*>(rec),
                    workspace, static_cast<cudaStream_t>(stream));
  });
}

void recon_loss_backward(const ReconProblem& p, const void* grad_rec, void* grad_recon,
                         void* grad_log_scale, void* stream) {
  dispatch_recon<__half, __nv_bfloat16>(p, [&](auto l, auto x_tag, auto t_tag, auto s_tag) {
    using T = typename decltype(x_tag)::type;
    using TargetT = typename decltype(t_tag)::type;
    using ScaleT = typename decltype(s_tag)::type;
    constexpr int VEC = vec_width<T>();
    const ReconGrad<decltype(l)::value, T, TargetT, ScaleT> body{
        static_cast<const T*>(p.recon),
        static_cast<const TargetT*>(p.target),
        static_cast<const ScaleT*>(p.log_scale),
        static_cast<const acc_t<T>*>(grad_rec),
        static_cast<T*>(grad_recon),
        static_cast<ScaleT*>(grad_log_scale)};
    const bool vectorize = aligned<VEC>(p.batch, p.numel_per_sample,
                                        {{p.recon, int(sizeof(T))},
                                         {p.target, int(sizeof(TargetT))},
                                         {p.log_scale, int(sizeof(ScaleT))},
                                         {grad_recon, int(sizeof(T))},
                                         {grad_log_scale, int(sizeof(ScaleT))}});
    launch_map<VEC>(body, vectorize, p.batch, p.numel_per_sample,
                    static_cast<cudaStream_t>(stream));
  });
}

void gaussian_kl_forward(const KlProblem& p, bool per_dim, void* kl, void* workspace,
                         void* stream) {
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    constexpr int VEC = vec_width<T>();
    const T* mu = static_cast<const T*>(p.mu);
    const T* lv = static_cast<const T*>(p.logvar);
    const auto s = static_cast<cudaStream_t>(stream);
    if (per_dim) {
      const bool vectorize =
          aligned<VEC>(p.batch, p.latent_dim,
                       {{mu, int(sizeof(T))}, {lv, int(sizeof(T))}, {kl, int(sizeof(Acc))}});
      launch_map<VEC>(KlPerDim<T>{mu, lv, static_cast<Acc*>(kl)}, vectorize, p.batch, p.latent_dim,
                      s);
    } else {
      const bool vectorize =
          aligned<VEC>(p.batch, p.latent_dim, {{mu, int(sizeof(T))}, {lv, int(sizeof(T))}});
      launch_sum<VEC>(KlTerm<T>{mu, lv}, vectorize, p.batch, p.latent_dim, static_cast<Acc*>(kl),
                      workspace, s);
    }
  });
}

void gaussian_kl_backward(const KlProblem& p, bool per_dim, const void* grad, void* grad_mu,
                          void* grad_logvar, void* stream) {
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    constexpr int VEC = vec_width<T>();
    const KlGrad<T> body{static_cast<const T*>(p.mu),   static_cast<const T*>(p.logvar),
                         static_cast<const Acc*>(grad), per_dim,
                         static_cast<T*>(grad_mu),      static_cast<T*>(grad_logvar)};
    const bool vectorize = aligned<VEC>(p.batch, p.latent_dim,
                                        {{p.mu, int(sizeof(T))},
                                         {p.logvar, int(sizeof(T))},
                                         {per_dim ? grad : nullptr, int(sizeof(Acc))},
                                         {grad_mu, int(sizeof(T))},
                                         {grad_logvar, int(sizeof(T))}});
    launch_map<VEC>(body, vectorize, p.batch, p.latent_dim, static_cast<cudaStream_t>(stream));
  });
}

void cb_log_normalizer_forward(const CbProblem& p, void* out, void* stream) {
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int VEC = vec_width<T>();
    const bool vectorize =
        aligned<VEC>(1, p.numel, {{p.logits, int(sizeof(T))}, {out, int(sizeof(T))}});
    launch_map<VEC>(CbValue<T>{static_cast<const T*>(p.logits), static_cast<T*>(out)}, vectorize, 1,
                    p.numel, static_cast<cudaStream_t>(stream));
  });
}

void cb_log_normalizer_backward(const CbProblem& p, const void* grad, void* grad_logits,
                                void* stream) {
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int VEC = vec_width<T>();
    const bool vectorize = aligned<VEC>(
        1, p.numel,
        {{p.logits, int(sizeof(T))}, {grad, int(sizeof(T))}, {grad_logits, int(sizeof(T))}});
    launch_map<VEC>(CbGrad<T>{static_cast<const T*>(p.logits), static_cast<const T*>(grad),
                              static_cast<T*>(grad_logits)},
                    vectorize, 1, p.numel, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace cuda
}  // namespace fusedvae
