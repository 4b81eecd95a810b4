// The CPU kernels' one parallel loop: work items spread over torch's intra-op
// threads, for every build of the kernels (kernels_impl.h).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fusedvae {
namespace cpu {
namespace CPU_CAPABILITY {

// Calls body(item) for item in [0, count), spread over torch's intra-op
// threads (at::get_num_threads()) in contiguous static blocks.
//
// Not at::parallel_for: its OpenMP path is inline in torch's headers and asks
// omp_get_num_threads()/omp_get_thread_num() by name, which in a clang build
// (LLVM's libomp) resolve to torch's libgomp already loaded in the process and
// give every thread the whole range. A worksharing loop keeps the thread ids
// inside whichever runtime the compiler targets; with g++ that is torch's own
// libgomp, the same pool torch's operators use.
template <typename Body>
void parallel_items(int64_t count, const Body& body) {
#ifdef _OPENMP
  const int threads =
      at::in_parallel_region()
          ? 1
          : static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count)));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t item = 0; item < count; ++item) body(item);
#else
  for (int64_t item = 0; item < count; ++item) body(item);
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedvae
