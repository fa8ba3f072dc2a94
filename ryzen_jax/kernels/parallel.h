// What both CPU kernels share: a horizontal sum, a dot product, and a loop over work
// items split between the calling thread and helper threads.
#pragma once

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ryzen_jax {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// Weights are float32 or bfloat16 (its 16 bits, the high half of a float32): loads
// that widen either to float32 lanes.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// Σ a[i]·b[i] over n values (a float32 or bfloat16, b float32): four independent sums,
// so the FMAs overlap.
template <typename A>
inline float dot(const A* a, const float* b, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), a0);
    a1 = _mm256_fmadd_ps(load8(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(a + i + 16), _mm256_loadu_ps(b + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(a + i + 24), _mm256_loadu_ps(b + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += widen(a[i]) * b[i];
  return s;
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

struct Task {
  virtual void work() = 0;
  virtual ~Task() = default;
};

// cores() - 1 threads of our own that stay awake between kernel calls: a decode step
// calls the kernels some 65 times, a few microseconds apart, and handing each call's
// helper work to XLA's pool (a sleeping thread to wake, in a VM) cost 7-10% of a
// batch-1 step (best of interleaved runs; level at batch 8). After SPIN of no work
// they sleep until the next call.
class Workers {
 public:
  static Workers& get() {
    static Workers* w = new Workers(cores() - 1);  // never destroyed: its threads live as long as the process
    return *w;
  }

  // Runs task->work() on every worker and returns true, or returns false at once if
  // another call holds the workers (the caller then shares the work some other way).
  bool start(std::shared_ptr<Task> task) {
    if (threads_ == 0 || !busy_.try_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(m_);
      task_ = std::move(task);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    return true;
  }
  void finish() { busy_.unlock(); }

 private:
  static constexpr auto SPIN = std::chrono::microseconds(200);

  explicit Workers(int64_t threads) : threads_(threads) {
    for (int64_t i = 0; i < threads; ++i) std::thread([this] { loop(); }).detach();
  }

  void loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto since = std::chrono::steady_clock::now();
      for (int spins = 1; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        _mm_pause();
        if (spins % 256 == 0 && std::chrono::steady_clock::now() - since > SPIN) {
          std::unique_lock<std::mutex> lock(m_);
          cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      std::shared_ptr<Task> task;
      {
        std::lock_guard<std::mutex> lock(m_);
        seen = generation_.load(std::memory_order_acquire);
        task = task_;
      }
      if (task) task->work();
    }
  }

  int64_t threads_;
  std::mutex busy_, m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Task> task_;
};

// body(i) for every i in [0, n): items are handed to whichever thread asks next, the
// caller included, so the loop finishes even if no other thread is free. A thread
// that starts late finds no item left and never calls body; the shared state keeps
// itself alive for it. Helpers: our Workers, or XLA:CPU's pool while another call
// holds them.
template <typename Body>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, Body body) {
  struct Loop : Task {
    Loop(int64_t n, Body body) : n(n), body(std::move(body)) {}
    int64_t n;
    Body body;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void work() override {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        body(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  if (n <= 0) return;
  auto loop = std::make_shared<Loop>(n, std::move(body));
  Workers& workers = Workers::get();
  const bool ours = n > 1 && workers.start(loop);
  if (!ours)
    for (int64_t h = std::min({pool.num_threads(), cores(), n}) - 1; h > 0; --h) pool.Schedule([loop] { loop->work(); });
  loop->work();
  while (loop->done.load(std::memory_order_acquire) < n) _mm_pause();
  if (ours) workers.finish();
}

}  // namespace ryzen_jax
