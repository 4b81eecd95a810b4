// CPU kernels: the per-element math of vae_math.h on at::vec::Vectorized
// registers, parallel over (sample, chunk) work items.
//
// Compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp), each copy in namespace fusedvae::cpu::CPU_CAPABILITY
// and exposed as one Kernels table; kernels.cpp picks one at run time.
// Include only from those files.
//
// Determinism: a sample is cut into chunks of a fixed size, each chunk is
// summed lane-wise and then lane by lane in a fixed order, and the chunk sums
// of a sample are added in chunk order in double. Nothing depends on the
// number of threads or on which thread ran which chunk.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "../dispatch.h"
#include "../dmol.h"
#include "../kernels.h"
#include "parallel.h"
#include "vec_ops.h"

namespace fusedvae {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Elements per work item: large enough to amortise scheduling, small enough
// that one image is split over both cores. A multiple of every vector width.
constexpr int64_t kChunk = 16384;

// Copies `count` elements converted to type To. A full vector's worth has a
// compile-time trip count, so the compiler turns it into vector conversions.
template <int64_t kLanes, typename To, typename From>
void convert_run(const From* src, To* dst, int64_t count) {
  if (count == kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) dst[k] = static_cast<To>(src[k]);
  } else {
    for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<To>(src[k]);
  }
}

template <typename T>
constexpr bool is_16bit_float = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// k / 255 for pixel values k = 0..255, correctly rounded as the division is.
// A vector division costs as much as the rest of a uint8 load: with fused
// multiply-adds, math::pixel_quotient. The baseline build has no fused
// multiply-add, and double precision is rare here: both divide.
template <typename Acc>
at::vec::Vectorized<Acc> pixel_value(const at::vec::Vectorized<Acc>& k) {
  using Vec = at::vec::Vectorized<Acc>;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    return math::pixel_quotient(
        k, [](const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); });
  }
#endif
  return k / Vec(Acc(255));
}

// Loads `count` (<= lanes) elements as a vector of the accumulation type.
// Lanes past `count` are zero. uint8 targets are pixels: value / 255; bool
// targets are 0 or 1.
template <typename Acc, typename T>
FUSEDVAE_ALWAYS_INLINE at::vec::Vectorized<Acc> load(const T* ptr, int64_t count) {
  using Vec = at::vec::Vectorized<Acc>;
  if constexpr (std::is_same_v<T, Acc>) {
    return count == Vec::size() ? Vec::loadu(ptr) : Vec::loadu(ptr, count);
  } else {
    if constexpr (std::is_same_v<T, uint8_t> && std::is_same_v<Acc, float>) {
      // A whole vector of pixels: widened in registers. Through the stack buffer
      // below, the wide load waits for the narrow stores, which costs as much
      // as the rest of the loss.
#if defined(CPU_CAPABILITY_AVX512)
      if (count == Vec::size()) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr));
        return pixel_value(Vec(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes))));
      }
#elif defined(CPU_CAPABILITY_AVX2)
      if (count == Vec::size()) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(ptr));
        return pixel_value(Vec(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes))));
      }
#endif
    }
    if constexpr (is_16bit_float<T> && std::is_same_v<Acc, float>) {
      if (count == Vec::size()) {  // widened in registers too
        Vec v;
        at::vec::load_to_float(ptr, v);
        return v;
      }
    }
    alignas(64) Acc buf[Vec::size()] = {};
    convert_run<Vec::size()>(ptr, buf, count);
    if constexpr (std::is_same_v<T, uint8_t>) {
      return pixel_value(Vec::loadu(buf));
    } else {
      return Vec::loadu(buf);
    }
  }
}

template <typename T, typename Acc>
FUSEDVAE_ALWAYS_INLINE void store(T* ptr, const at::vec::Vectorized<Acc>& v, int64_t count) {
  using Vec = at::vec::Vectorized<Acc>;
  if constexpr (std::is_same_v<T, Acc>) {
    v.store(ptr, static_cast<int>(count));
  } else if constexpr (is_16bit_float<T> && std::is_same_v<Acc, float>) {
    // Rounded to nearest even in registers, as c10::Half and c10::BFloat16 round.
    at::vec::convert_from_float<T>(v, v).store(ptr, static_cast<int>(count));
  } else {
    alignas(64) Acc buf[Vec::size()];
    v.store(buf);
    convert_run<Vec::size()>(buf, ptr, count);
  }
}

// A sample is cut into chunks of `chunk` elements (kChunk unless an element
// costs far more than the loss's); work item `item` is chunk (item % chunks)
// of sample (item / chunks). Calls chunk_body(item, b, first, last) with
// [first, last) the chunk's element range within sample b, all items in
// parallel.
template <typename ChunkBody>
int64_t for_each_chunk(int64_t batch, int64_t numel_per_sample, const ChunkBody& chunk_body,
                       int64_t chunk = kChunk) {
  const int64_t chunks = (numel_per_sample + chunk - 1) / chunk;
  parallel_items(batch * chunks, [&](int64_t item) {
    const int64_t b = item / chunks;
    const int64_t first = (item % chunks) * chunk;
    chunk_body(item, b, first, std::min(first + chunk, numel_per_sample));
  });
  return chunks;
}

// out[b] = Σ over sample b of term(offset, count), where term returns the
// per-element values of elements [offset, offset + count) as one vector.
template <typename Acc, typename Term>
void sum_per_sample(int64_t batch, int64_t numel_per_sample, Acc* out, const Term& term,
                    int64_t chunk = kChunk) {
  using Vec = at::vec::Vectorized<Acc>;
  std::vector<Acc> partial(static_cast<size_t>(batch * ((numel_per_sample + chunk - 1) / chunk)));
  const int64_t chunks = for_each_chunk(
      batch, numel_per_sample,
      [&](int64_t item, int64_t b, int64_t first, int64_t last) {
        const int64_t base = b * numel_per_sample;
        // A copy private to this call: the vector stores (at::vec's, through
        // may-alias pointers) cannot write to it, so what term captured by value
        // stays in registers across the loop instead of being reloaded after
        // every store.
        const Term local_term = term;
        Vec acc(Acc(0));
        int64_t i = first;
        for (; i + Vec::size() <= last; i += Vec::size()) {
          acc = acc + local_term(base + i, Vec::size());
        }
        if (i < last) acc = acc + Vec::set(Vec(Acc(0)), local_term(base + i, last - i), last - i);
        alignas(64) Acc lanes[Vec::size()];
        acc.store(lanes);
        Acc sum = 0;
        for (int64_t k = 0; k < Vec::size(); ++k) sum += lanes[k];
        partial[item] = sum;
      },
      chunk);
  for (int64_t b = 0; b < batch; ++b) {
    double sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += static_cast<double>(partial[b * chunks + c]);
    out[b] = static_cast<Acc>(sum);
  }
}

// Calls body(b, offset, count) over every vector-sized run of every sample.
template <typename Acc, typename Body>
void for_each_vector(int64_t batch, int64_t numel_per_sample, const Body& body,
                     int64_t chunk = kChunk) {
  constexpr int64_t lanes = at::vec::Vectorized<Acc>::size();
  for_each_chunk(
      batch, numel_per_sample,
      [&](int64_t, int64_t b, int64_t first, int64_t last) {
        const int64_t base = b * numel_per_sample;
        const Body local_body = body;  // in registers, as in sum_per_sample
        for (int64_t i = first; i < last; i += lanes) {
          local_body(b, base + i, std::min(lanes, last - i));
        }
      },
      chunk);
}

// The weights of elements [i, i + count) (count <= lanes, all in one sample;
// i counted from the first sample) as a vector; lanes past `count` are zero.
template <typename Acc>
at::vec::Vectorized<Acc> load_weights(const WeightView& w, int64_t numel_per_sample, int64_t i,
                                      int64_t count) {
  using Vec = at::vec::Vectorized<Acc>;
  const Acc* data = static_cast<const Acc*>(w.data);
  const int64_t b = i / numel_per_sample;
  int64_t k = i - b * numel_per_sample;
  int64_t offset = b * w.batch_stride;
  if (w.dims == 1) {  // one run: the weight dense in recon's order, or one per sample
    if (w.strides[0] == 0) return Vec::set(Vec(Acc(0)), Vec(data[offset]), count);
    if (w.strides[0] == 1) return load<Acc>(data + offset + k, count);
  }
  // The digits of k, then an odometer over the next `count` elements.
  int64_t digit[kMaxWeightDims];
  for (int d = w.dims - 1; d >= 0; --d) {
    digit[d] = k % w.sizes[d];
    k /= w.sizes[d];
    offset += digit[d] * w.strides[d];
  }
  alignas(64) Acc buf[Vec::size()] = {};
  for (int64_t e = 0; e < count; ++e) {
    buf[e] = data[offset];
    for (int d = w.dims - 1; d >= 0; --d) {
      offset += w.strides[d];
      if (++digit[d] < w.sizes[d]) break;
      offset -= digit[d] * w.strides[d];
      digit[d] = 0;
    }
  }
  return Vec::loadu(buf);
}

template <class L, typename T, typename TargetT, typename ScaleT>
void recon_forward_typed(const ReconProblem& p, acc_t<T>* rec) {
  using Acc = acc_t<T>;
  using O = VecOps<Acc>;
  const T* x = static_cast<const T*>(p.recon);
  const TargetT* t = static_cast<const TargetT*>(p.target);
  const bool weighted = p.weight.data != nullptr;
  const int64_t numel = p.numel_per_sample;
  auto weigh = [=, &p](const at::vec::Vectorized<Acc>& v, int64_t i, int64_t n) {
    return weighted ? v * load_weights<Acc>(p.weight, numel, i, n) : v;
  };
  if constexpr (L::kHasScale) {
    const ScaleT* s = static_cast<const ScaleT*>(p.log_scale);
    sum_per_sample<Acc>(p.batch, numel, rec, [=](int64_t i, int64_t n) {
      return weigh(
          L::template loss<O>(load<Acc>(x + i, n), load<Acc>(t + i, n), load<Acc>(s + i, n)), i, n);
    });
  } else {
    sum_per_sample<Acc>(p.batch, numel, rec, [=](int64_t i, int64_t n) {
      return weigh(L::template loss<O>(load<Acc>(x + i, n), load<Acc>(t + i, n)), i, n);
    });
  }
}

template <class L, typename T, typename TargetT, typename ScaleT>
void recon_backward_typed(const ReconProblem& p, const acc_t<T>* grad_rec, T* grad_x,
                          ScaleT* grad_s) {
  using Acc = acc_t<T>;
  using O = VecOps<Acc>;
  using Vec = at::vec::Vectorized<Acc>;
  const T* x = static_cast<const T*>(p.recon);
  const TargetT* t = static_cast<const TargetT*>(p.target);
  const bool weighted = p.weight.data != nullptr;
  const int64_t numel = p.numel_per_sample;
  // Each element's weight times its derivative, then the sample's coefficient,
  // as recon_forward_with_grad_typed rounds them.
  auto weigh = [=, &p](const Vec& v, int64_t i, int64_t n) {
    return weighted ? load_weights<Acc>(p.weight, numel, i, n) * v : v;
  };
  if constexpr (L::kHasScale) {
    const ScaleT* s = static_cast<const ScaleT*>(p.log_scale);
    for_each_vector<Acc>(p.batch, numel, [=](int64_t b, int64_t i, int64_t n) {
      Vec gx, gs;
      L::template grad<O>(load<Acc>(x + i, n), load<Acc>(t + i, n), load<Acc>(s + i, n), &gx, &gs);
      const Vec g(grad_rec[b]);
      store(grad_x + i, g * weigh(gx, i, n), n);
      if (grad_s != nullptr) store(grad_s + i, g * weigh(gs, i, n), n);
    });
  } else {
    for_each_vector<Acc>(p.batch, numel, [=](int64_t b, int64_t i, int64_t n) {
      const Vec local = L::template grad<O>(load<Acc>(x + i, n), load<Acc>(t + i, n));
      store(grad_x + i, Vec(grad_rec[b]) * weigh(local, i, n), n);
    });
  }
}

// recon_forward_typed's sums (same work items, same order) and, in the same
// pass over the data, recon_backward_typed's gradient of x for grad_rec[b] =
// scale, rounded as it rounds.
template <class L, typename T, typename TargetT, typename ScaleT>
void recon_forward_with_grad_typed(const ReconProblem& p, acc_t<T>* rec, T* grad_x,
                                   acc_t<T> scale) {
  using Acc = acc_t<T>;
  using O = VecOps<Acc>;
  using Vec = at::vec::Vectorized<Acc>;
  const T* x = static_cast<const T*>(p.recon);
  const TargetT* t = static_cast<const TargetT*>(p.target);
  const ScaleT* s = static_cast<const ScaleT*>(p.log_scale);
  const bool weighted = p.weight.data != nullptr;
  const int64_t numel = p.numel_per_sample;
  sum_per_sample<Acc>(p.batch, numel, rec, [=, &p](int64_t i, int64_t n) {
    const Vec xv = load<Acc>(x + i, n), tv = load<Acc>(t + i, n);
    Vec loss, gx;
    if constexpr (L::kHasScale) {
      const Vec sv = load<Acc>(s + i, n);
      Vec gs;
      loss = L::template loss<O>(xv, tv, sv);
      L::template grad<O>(xv, tv, sv, &gx, &gs);
    } else {
      loss = L::template loss<O>(xv, tv);
      gx = L::template grad<O>(xv, tv);
    }
    if (weighted) {
      const Vec w = load_weights<Acc>(p.weight, numel, i, n);
      loss = loss * w;
      gx = w * gx;
    }
    store(grad_x + i, Vec(scale) * gx, n);
    return loss;
  });
}

// The entries of this instruction set's kernel table.
void recon_loss_forward(const ReconProblem& p, void* rec) {
  dispatch_recon<c10::Half, c10::BFloat16>(p, [&](auto l, auto x_tag, auto t_tag, auto s_tag) {
    using T = typename decltype(x_tag)::type;
    recon_forward_typed<typename decltype(l)::type, T, typename decltype(t_tag)::type,
                        typename decltype(s_tag)::type>(p, static_cast<acc_t<T>*>(rec));
  });
}

void recon_loss_forward_with_grad(const ReconProblem& p, void* rec, void* grad_recon,
                                  double scale) {
  dispatch_recon<c10::Half, c10::BFloat16>(p, [&](auto l, auto x_tag, auto t_tag, auto s_tag) {
    using T = typename decltype(x_tag)::type;
    recon_forward_with_grad_typed<typename decltype(l)::type, T, typename decltype(t_tag)::type,
                                  typename decltype(s_tag)::type>(
        p, static_cast<acc_t<T>*>(rec), static_cast<T*>(grad_recon), static_cast<acc_t<T>>(scale));
  });
}

void recon_loss_backward(const ReconProblem& p, const void* grad_rec, void* grad_recon,
                         void* grad_log_scale) {
  dispatch_recon<c10::Half, c10::BFloat16>(p, [&](auto l, auto x_tag, auto t_tag, auto s_tag) {
    using T = typename decltype(x_tag)::type;
    using ScaleT = typename decltype(s_tag)::type;
    recon_backward_typed<typename decltype(l)::type, T, typename decltype(t_tag)::type, ScaleT>(
        p, static_cast<const acc_t<T>*>(grad_rec), static_cast<T*>(grad_recon),
        static_cast<ScaleT*>(grad_log_scale));
  });
}

void gaussian_kl_forward(const KlProblem& p, bool per_dim, void* kl) {
  dispatch_dtype<c10::Half, c10::BFloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    using O = VecOps<Acc>;
    const T* mu = static_cast<const T*>(p.mu);
    const T* lv = static_cast<const T*>(p.logvar);
    const T* prior_mu = static_cast<const T*>(p.prior_mu);
    const T* prior_lv = static_cast<const T*>(p.prior_logvar);
    Acc* out = static_cast<Acc*>(kl);
    const auto term = [&](int64_t i, int64_t n) {
      if (prior_mu == nullptr)
        return math::kl_per_dim<O>(load<Acc>(mu + i, n), load<Acc>(lv + i, n));
      return math::kl_per_dim_prior<O>(load<Acc>(mu + i, n), load<Acc>(lv + i, n),
                                       load<Acc>(prior_mu + i, n), load<Acc>(prior_lv + i, n));
    };
    if (per_dim) {
      for_each_vector<Acc>(p.batch, p.latent_dim,
                           [&](int64_t, int64_t i, int64_t n) { store(out + i, term(i, n), n); });
    } else {
      sum_per_sample<Acc>(p.batch, p.latent_dim, out, term);
    }
  });
}

void gaussian_kl_backward(const KlProblem& p, const KlCoefficients& coef, const KlGrads& grads) {
  dispatch_dtype<c10::Half, c10::BFloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    using O = VecOps<Acc>;
    using Vec = at::vec::Vectorized<Acc>;
    const T* mu = static_cast<const T*>(p.mu);
    const T* lv = static_cast<const T*>(p.logvar);
    const Acc* per_element = static_cast<const Acc*>(coef.per_element);
    const Acc* per_sample = static_cast<const Acc*>(coef.per_sample);
    const Acc* per_dim = static_cast<const Acc*>(coef.per_dim);
    const T* prior_mu = static_cast<const T*>(p.prior_mu);
    const T* prior_lv = static_cast<const T*>(p.prior_logvar);
    T* gmu = static_cast<T*>(grads.mu);
    T* glv = static_cast<T*>(grads.logvar);
    T* gpmu = static_cast<T*>(grads.prior_mu);
    T* gplv = static_cast<T*>(grads.prior_logvar);
    const int64_t latent = p.latent_dim;
    for_each_vector<Acc>(p.batch, latent, [&](int64_t b, int64_t i, int64_t n) {
      Vec c;
      if (per_element != nullptr) {
        c = load<Acc>(per_element + i, n);
      } else {
        c = Vec(per_sample != nullptr ? per_sample[b] : Acc(0));
        if (per_dim != nullptr) c = c + load<Acc>(per_dim + (i - b * latent), n);
      }
      if (prior_mu == nullptr) {
        store(gmu + i, c * load<Acc>(mu + i, n), n);
        store(glv + i, c * math::kl_grad_logvar<O>(load<Acc>(lv + i, n)), n);
        return;
      }
      const auto d = math::kl_prior_grad<O>(load<Acc>(mu + i, n), load<Acc>(lv + i, n),
                                            load<Acc>(prior_mu + i, n), load<Acc>(prior_lv + i, n));
      store(gmu + i, c * d.mu, n);
      store(glv + i, c * d.logvar, n);
      store(gpmu + i, c * d.prior_mu, n);
      store(gplv + i, c * d.prior_logvar, n);
    });
  });
}

void cb_log_normalizer_forward(const CbProblem& p, void* out) {
  dispatch_dtype<c10::Half, c10::BFloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    const T* eta = static_cast<const T*>(p.logits);
    T* y = static_cast<T*>(out);
    for_each_vector<Acc>(1, p.numel, [&](int64_t, int64_t i, int64_t n) {
      store(y + i, math::cb_log_normalizer<VecOps<Acc>>(load<Acc>(eta + i, n)), n);
    });
  });
}

void cb_log_normalizer_backward(const CbProblem& p, const void* grad, void* grad_logits) {
  dispatch_dtype<c10::Half, c10::BFloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    const T* eta = static_cast<const T*>(p.logits);
    const T* g = static_cast<const T*>(grad);
    T* out = static_cast<T*>(grad_logits);
    for_each_vector<Acc>(1, p.numel, [&](int64_t, int64_t i, int64_t n) {
      store(out + i,
            load<Acc>(g + i, n) * math::cb_log_normalizer_grad<VecOps<Acc>>(load<Acc>(eta + i, n)),
            n);
    });
  });
}

// ------------------------------------------------ discretized mixture ------
// dmol.h on vectors of consecutive pixels of one sample: lane i is pixel
// first + i. Lanes past the last pixel read zeros and are dropped.

// Asks for the cache line holding `address` ahead of its use (x86's prefetch
// into every cache level; nothing elsewhere).
FUSEDVAE_ALWAYS_INLINE void prefetch(const void* address) {
#if defined(__SSE__)
  _mm_prefetch(static_cast<const char*>(address), _MM_HINT_T0);
#else
  (void)address;
#endif
}

// Pixels per work item: with K = 10 a pixel costs a few hundred operations.
constexpr int64_t kPixelChunk = 256;

// Mixtures up to this size (PixelCNN++, VDVAE and NVAE use 10) are evaluated
// once in the backward, their per-channel derivatives kept on the stack, and
// both passes take their log-sum-exps over held values (dmol::pixel_nll).
constexpr int kCachedComponents = 16;

// Plane j of `count` consecutive pixels, as a vector.
template <typename Acc, typename T>
struct PixelLanes {
  using Vec = at::vec::Vectorized<Acc>;
  const T* base;  // element (b, 0, first) of the tensor
  int64_t channel_stride;
  int64_t pixel_stride;
  int64_t count;
  FUSEDVAE_ALWAYS_INLINE Vec operator()(int64_t j) const {
    const T* ptr = base + j * channel_stride;
    if (pixel_stride == 1) return load<Acc>(ptr, count);
    alignas(64) Acc buf[Vec::size()] = {};
    for (int64_t i = 0; i < count; ++i) buf[i] = static_cast<Acc>(ptr[i * pixel_stride]);
    return Vec::loadu(buf);
  }
};

// Writes a vector as plane j of `count` consecutive pixels.
template <typename Acc, typename T>
struct PixelLanesWriter {
  using Vec = at::vec::Vectorized<Acc>;
  T* base;  // element (b, 0, first) of the gradient
  int64_t channel_stride;
  int64_t pixel_stride;
  int64_t count;
  FUSEDVAE_ALWAYS_INLINE void operator()(int64_t j, const Vec& v) const {
    T* ptr = base + j * channel_stride;
    if (pixel_stride == 1) {
      store(ptr, v, count);
      return;
    }
    alignas(64) Acc lanes[Vec::size()];
    v.store(lanes);
    for (int64_t l = 0; l < count; ++l) ptr[l * pixel_stride] = static_cast<T>(lanes[l]);
  }
};

// PixelLanes and PixelLanesWriter where every lane is a pixel and the pixels
// are consecutive (channels-first parameters, a whole vector): plain vector
// loads and stores, without the stride and count tests of every access, a
// fifth of the mixture's instructions. Taken where it measured faster: in
// alternating runs (benchmarks/README.md) the AVX-512 build's step took a fifth
// less time with it, the AVX2 build's a few per cent more.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kWholePixelVectors = true;
#else
constexpr bool kWholePixelVectors = false;
#endif

template <typename Acc, typename T>
struct WholePixelLanes {
  using Vec = at::vec::Vectorized<Acc>;
  const T* base;
  int64_t channel_stride;
  FUSEDVAE_ALWAYS_INLINE Vec operator()(int64_t j) const {
    return load<Acc>(base + j * channel_stride, Vec::size());
  }
};

template <typename Acc, typename T>
struct WholePixelLanesWriter {
  using Vec = at::vec::Vectorized<Acc>;
  T* base;
  int64_t channel_stride;
  FUSEDVAE_ALWAYS_INLINE void operator()(int64_t j, const Vec& v) const {
    store(base + j * channel_stride, v, Vec::size());
  }
};

template <typename Acc, typename T>
bool whole_vector(const PixelLanes<Acc, T>& lanes) {
  return lanes.pixel_stride == 1 && lanes.count == at::vec::Vectorized<Acc>::size();
}

// A channels-first pixel's parameters lie in 10K planes, one cache line each
// per vector of pixels: from a cold cache, more streams than a core's hardware
// prefetcher follows. Reading pixel i's vector, this requests the lines four
// vectors ahead (benchmarks/README.md: the step after the other methods had
// run took about a tenth longer without).
template <typename Acc, typename T>
FUSEDVAE_ALWAYS_INLINE void prefetch_params_ahead(const DmolProblem& p,
                                                  const PixelLanes<Acc, T>& read, int64_t i) {
  constexpr int64_t kAhead = 4 * at::vec::Vectorized<Acc>::size();
  if (read.pixel_stride != 1 || i + kAhead + at::vec::Vectorized<Acc>::size() > p.pixels) return;
  const int64_t planes = dmol_params_per_component(p.channels) * p.k;
  for (int64_t j = 0; j < planes; ++j) prefetch(read.base + j * read.channel_stride + kAhead);
}

template <typename Acc>
dmol::Pixel<VecOps<Acc>> load_pixels(const DmolProblem& p, int64_t b, int64_t first,
                                     int64_t count) {
  using Vec = at::vec::Vectorized<Acc>;
  dmol::Pixel<VecOps<Acc>> px;
  px.channels = p.channels;
  px.k = p.k;
  px.half_width = Vec(static_cast<Acc>(p.half_width));
  px.log_scale_min = Vec(static_cast<Acc>(p.log_scale_min));
  const int64_t offset = b * p.target_strides[0] + first * p.target_strides[2];
  for (int c = 0; c < p.channels; ++c) {
    const int64_t at = offset + c * p.target_strides[1];
    if (p.target_dtype == DType::kUInt8) {
      // v / 127.5 - 1 = 2·(v / 255) - 1, the doubling exact: the quotient load() reads.
      const uint8_t* t = static_cast<const uint8_t*>(p.target) + at;
      Vec v;
      if (p.target_strides[2] == 1) {
        v = load<Acc>(t, count);
      } else {
        alignas(64) Acc buf[Vec::size()] = {};
        for (int64_t i = 0; i < count; ++i) buf[i] = static_cast<Acc>(t[i * p.target_strides[2]]);
        v = pixel_value(Vec::loadu(buf));
      }
      px.x[c] = v * Vec(Acc(2)) - Vec(Acc(1));
    } else {
      px.x[c] = PixelLanes<Acc, Acc>{static_cast<const Acc*>(p.target) + at, 0, p.target_strides[2],
                                     count}(0);
    }
  }
  return px;
}

// Work items, per-sample sums and their order are the per-element kernels'
// (sum_per_sample, for_each_vector) with a pixel in place of an element.
// The pixels' NLLs also go to pixel_nll where it is not null.
template <typename T>
void dmol_forward_typed(const DmolProblem& p, acc_t<T>* nll, acc_t<T>* pixel_nll) {
  using Acc = acc_t<T>;
  using Vec = at::vec::Vectorized<Acc>;
  const T* params = static_cast<const T*>(p.params);
  sum_per_sample<Acc>(
      p.batch, p.pixels, nll,
      [&](int64_t offset, int64_t count) {
        const int64_t b = offset / p.pixels;
        const int64_t i = offset - b * p.pixels;
        const PixelLanes<Acc, T> read{params + b * p.param_strides[0] + i * p.param_strides[2],
                                      p.param_strides[1], p.param_strides[2], count};
        prefetch_params_ahead(p, read, i);
        const dmol::Pixel<VecOps<Acc>> px = load_pixels<Acc>(p, b, i, count);
        const Vec v = [&] {
          if constexpr (kWholePixelVectors) {
            if (whole_vector(read)) {
              return dmol::pixel_nll<kCachedComponents>(
                  px, WholePixelLanes<Acc, T>{read.base, read.channel_stride});
            }
          }
          return dmol::pixel_nll<kCachedComponents>(px, read);
        }();
        if (pixel_nll != nullptr) store(pixel_nll + offset, v, count);
        return v;
      },
      kPixelChunk);
}

// pixel_nll_backward over `count` pixels of sample b from pixel i, the
// gradient scaled by g (a vector, or dmol::UnitScale) and written through
// out_strides, given their NLLs where `nll` (pixel i's) is not null; returns
// log p of each.
template <typename T, typename G, typename Acc = acc_t<T>>
at::vec::Vectorized<Acc> dmol_pixels_backward(const DmolProblem& p, int64_t b, int64_t i,
                                              int64_t count, const G& g, T* out,
                                              const int64_t* out_strides,
                                              const Acc* nll = nullptr) {
  const T* params = static_cast<const T*>(p.params);
  const PixelLanes<Acc, T> read{params + b * p.param_strides[0] + i * p.param_strides[2],
                                p.param_strides[1], p.param_strides[2], count};
  const PixelLanesWriter<Acc, T> write{out + b * out_strides[0] + i * out_strides[2],
                                       out_strides[1], out_strides[2], count};
  prefetch_params_ahead(p, read, i);
  const dmol::Pixel<VecOps<Acc>> px = load_pixels<Acc>(p, b, i, count);
  const at::vec::Vectorized<Acc> given =
      nll != nullptr ? load<Acc>(nll, count) : at::vec::Vectorized<Acc>(Acc(0));
  const at::vec::Vectorized<Acc>* given_nll = nll != nullptr ? &given : nullptr;
  if constexpr (kWholePixelVectors) {
    if (whole_vector(read) && write.pixel_stride == 1) {
      return dmol::pixel_nll_backward<kCachedComponents>(
          px, WholePixelLanes<Acc, T>{read.base, read.channel_stride}, g,
          WholePixelLanesWriter<Acc, T>{write.base, write.channel_stride}, given_nll);
    }
  }
  return dmol::pixel_nll_backward<kCachedComponents>(px, read, g, write, given_nll);
}

template <typename T>
void dmol_backward_typed(const DmolProblem& p, const acc_t<T>* grad, const acc_t<T>* pixel_nll,
                         T* out, const int64_t* out_strides) {
  using Acc = acc_t<T>;
  for_each_vector<Acc>(
      p.batch, p.pixels,
      [&](int64_t b, int64_t offset, int64_t count) {
        dmol_pixels_backward<T>(p, b, offset - b * p.pixels, count,
                                at::vec::Vectorized<Acc>(grad[b]), out, out_strides,
                                pixel_nll != nullptr ? pixel_nll + offset : nullptr);
      },
      kPixelChunk);
}

// dmol_forward_typed's sums (same work items and order) of the log-likelihoods
// dmol_pixels_backward returns while it writes the gradient for grad = 1.
template <typename T>
void dmol_forward_with_grad_typed(const DmolProblem& p, acc_t<T>* nll, T* out,
                                  const int64_t* out_strides) {
  using Acc = acc_t<T>;
  using Vec = at::vec::Vectorized<Acc>;
  sum_per_sample<Acc>(
      p.batch, p.pixels, nll,
      [&](int64_t offset, int64_t count) {
        const int64_t b = offset / p.pixels;
        return Vec(Acc(0)) - dmol_pixels_backward<T>(p, b, offset - b * p.pixels, count,
                                                     dmol::UnitScale{}, out, out_strides);
      },
      kPixelChunk);
}

void dmol_forward(const DmolProblem& p, void* nll, void* pixel_nll) {
  dispatch_dtype<c10::Half, c10::BFloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dmol_forward_typed<T>(p, static_cast<acc_t<T>*>(nll), static_cast<acc_t<T>*>(pixel_nll));
  });
}

void dmol_backward(const DmolProblem& p, const void* grad, const void* pixel_nll, void* grad_params,
                   const int64_t* grad_strides) {
  dispatch_dtype<c10::Half, c10::BFloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dmol_backward_typed<T>(p, static_cast<const acc_t<T>*>(grad),
                           static_cast<const acc_t<T>*>(pixel_nll), static_cast<T*>(grad_params),
                           grad_strides);
  });
}

void dmol_forward_with_grad(const DmolProblem& p, void* nll, void* grad_params,
                            const int64_t* grad_strides) {
  dispatch_dtype<c10::Half, c10::BFloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dmol_forward_with_grad_typed<T>(p, static_cast<acc_t<T>*>(nll), static_cast<T*>(grad_params),
                                    grad_strides);
  });
}

void float_math(FloatMath f, const float* in, float* out, int64_t n) {
  using O = VecOps<float>;
  for_each_vector<float>(1, n, [&](int64_t, int64_t i, int64_t count) {
    const at::vec::Vectorized<float> x = load<float>(in + i, count);
    at::vec::Vectorized<float> y;
    switch (f) {
      case FloatMath::kExpNonpositive:
        y = O::exp_nonpositive(x);
        break;
      case FloatMath::kLog1pUnit:
        y = math::log1p_unit<O>(x);
        break;
      case FloatMath::kExpApprox:
        y = O::exp_approx(x);
        break;
      case FloatMath::kExpm1Nonpositive:
        y = O::expm1_nonpositive(x);
        break;
      case FloatMath::kLogApprox:
        y = O::log_approx(x);
        break;
      case FloatMath::kTanhApprox:
        y = O::tanh_approx(x);
        break;
      case FloatMath::kExpm1Approx:
        y = O::expm1_approx(x);
        break;
      case FloatMath::kSigmoid:
        y = math::sigmoid_from<O>(x, math::exp_neg_abs<O>(x));
        break;
      case FloatMath::kLogProduct3:
        y = O::log_product3(x, x, x);
        break;
    }
    store(out + i, y, count);
  });
}

}  // namespace

#define FUSEDVAE_STRINGIFY(x) #x
#define FUSEDVAE_NAME_OF(x) FUSEDVAE_STRINGIFY(x)
extern const Kernels kKernels;  // external linkage: kernels.cpp or the module reads it
const Kernels kKernels = {
    FUSEDVAE_NAME_OF(CPU_CAPABILITY),
    &recon_loss_forward,
    &recon_loss_backward,
    &recon_loss_forward_with_grad,
    &gaussian_kl_forward,
    &gaussian_kl_backward,
    &cb_log_normalizer_forward,
    &cb_log_normalizer_backward,
    &dmol_forward,
    &dmol_backward,
    &dmol_forward_with_grad,
    &float_math,
};
#undef FUSEDVAE_NAME_OF
#undef FUSEDVAE_STRINGIFY

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedvae
