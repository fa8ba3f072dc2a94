// What both CPU kernels share: a horizontal sum and a loop over work items split
// between the calling thread and XLA:CPU's intra-op threads.
#pragma once

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ryzen_jax {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// The cores this process may run on. XLA:CPU's pool has a thread per simulated device
// (8 with --xla_force_host_platform_device_count=8), more than the cores: a kernel that
// used them all would time-slice, its caller spinning while a helper waits for a core.
inline int64_t cores() {
  static const int64_t n = [] {
    cpu_set_t set;
    return sched_getaffinity(0, sizeof(set), &set) == 0 ? std::max(1, CPU_COUNT(&set)) : 1;
  }();
  return n;
}

// body(i) for every i in [0, n): items are handed to whichever thread asks next, the
// caller included, so the loop finishes even if no pool thread is free. A pool thread
// that starts late finds no item left and never calls body; the shared state keeps
// itself alive for it.
template <typename Body>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, Body body) {
  struct Loop {
    Loop(int64_t n, Body body) : n(n), body(std::move(body)) {}
    int64_t n;
    Body body;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void work() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        body(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  if (n <= 0) return;
  auto loop = std::make_shared<Loop>(n, std::move(body));
  for (int64_t h = std::min({pool.num_threads(), cores(), n}) - 1; h > 0; --h) pool.Schedule([loop] { loop->work(); });
  loop->work();
  while (loop->done.load(std::memory_order_acquire) < n) _mm_pause();
}

}  // namespace ryzen_jax
