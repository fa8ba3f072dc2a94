// y = x · wᵀ for a few rows of x (a decode step's batch) against a weight stored
// (out, in), as our linear layers store it: the weight is streamed from memory once,
// in address order, split by rows over the cores (parallel.h).
//
// Why: at batch 1-8 a decode step is a read of every weight. XLA:CPU's own kernels
// stream a weight at 14-20 GB/s on the 2-core benchmark machine, where a plain read
// reaches 24-28 GB/s; these loops read the LM head at 21-28 GB/s at batch 1, and the
// step's products alone take 1.2-1.3x less time at batch 1, 1.6-2x less at batch 2-8
// (see README, Benchmarks).
//
// From two rows of x up the products, not only the reads, set the pace; the ``loop``
// attribute picks how they run: in 256-bit registers (AVX2, row_times), in 512-bit ones
// (AVX-512, row_times_512), or, for bfloat16, by AVX512_BF16's dot-product instruction
// (rows_times_bf16, from one row up); a loop the CPU lacks falls back to the one below.
//
// Weights are float32 or bfloat16 (RyzenSkinnyMatmulBf16: half the bytes to stream),
// widened to float32 as they are read; x is float32 (a bfloat16 x widened first, but
// for the AVX512_BF16 loop), the sums are float32, and a bfloat16 result is rounded to
// nearest even, as XLA's bfloat16 dot does.
//
// Built at first use by ryzen_jax.kernels (g++ -O3 -mavx2 -mfma; the AVX-512 loops by
// their own target attributes, run only where the CPU reports them) and registered as
// an XLA FFI target for the CPU platform.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ryzen_jax::hsum;
using ryzen_jax::load8;
using ryzen_jax::widen;

// An output in float32, or rounded to bfloat16 (to nearest, ties to even, as XLA
// rounds; a NaN stays a NaN).
inline void put(float* y, float v) { *y = v; }
inline void put(uint16_t* y, float v) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *y = uint16_t((bits >> 16) | 0x40u);
    return;
  }
  *y = uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// One row of x: each weight row once, front to back.
template <typename W, typename Y>
void rows_of_one(const float* x, const W* w, Y* y, int64_t in, int64_t r0, int64_t r1) {
  for (int64_t o = r0; o < r1; ++o) put(y + o, ryzen_jax::dot(w + o * in, x, in));
}

// One weight row's span wo[0, n) against the same span of T rows of x (T <= 8), row
// t at x + t * stride: T sums in registers, added into s; the row is read once, front
// to back, and x's span of T rows stays in L1 (rows_of_many blocks the inputs where
// it would not).
template <int T, typename W>
void row_times(const float* x, const W* wo, float* s, int64_t stride, int64_t n, int64_t ahead) {
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    // With two or more rows of x the products take longer than the reads, and the
    // hardware prefetcher alone let the memory idle meanwhile: ask ``ahead`` bytes on
    // (4 KiB within a row: rows are contiguous, so past this row's end is the next
    // one's start). -5 to -10% at batch 4 and 8 on the small shape.
    if (T >= 2 && (k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(wo + k) + ahead, _MM_HINT_T0);
    __m256 wv = load8(wo + k);
    for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * stride + k), acc[t]);
  }
  for (int t = 0; t < T; ++t) {
    float sum = hsum(acc[t]);
    for (int64_t kk = k; kk < n; ++kk) sum += widen(wo[kk]) * x[t * stride + kk];
    s[t] += sum;
  }
}

__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// row_times in 512-bit registers, for CPUs with AVX-512: one weight row against T rows
// of x (T <= 8), the row's last few inputs one by one. Twice row_times' width per step
// pays at 8 rows of x (the small shape's products alone: 4.8-5.0 -> 4.0-4.3 ms, the LM
// head 1.8-1.9 -> 1.4-1.5 ms on a 2-core AVX-512 EPYC) and is level below; pairs of
// weight rows (16 sums) were slower from 3 to 6 rows. The prefetch runs 8 KiB ahead:
// 4 KiB left this loop waiting on memory (LM head 1.7 ms), 16 KiB was no better.
template <int T, typename W>
__attribute__((target("avx512f"))) void row_times_512(const float* x, const W* wo, float* s, int64_t stride,
                                                      int64_t n, int64_t ahead) {
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(wo + k) + ahead, _MM_HINT_T0);
    const __m512 wv = load16(wo + k);
    for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * stride + k), acc[t]);
  }
  for (int t = 0; t < T; ++t) {
    float sum = _mm512_reduce_add_ps(acc[t]);
    for (int64_t kk = k; kk < n; ++kk) sum += widen(wo[kk]) * x[t * stride + kk];
    s[t] += sum;
  }
}

// bfloat16 weight and x on CPUs with AVX512_BF16: each instruction multiplies 32
// bfloat16 pairs and adds them into 16 float32 sums (products exact, sums float32), so
// neither the weight nor x is widened. At 8 rows of x a bfloat16 product is arithmetic
// more than reading, and the widening loop above took as long as float32's (the small
// shape's products alone at batch 8: 4.7-6.0 ms, against a 1.9 ms floor); at one row
// the widening loop read the "1B" shape's LM head in 2.8-3.2 ms, this one in 1.8.
//
// R weight rows at a time (w_stride apart, their sums s_stride apart): with R = 2 each
// load of x feeds two products, 10 loads for 16 products at T = 8 where one row took
// 9 for 8, and the loop ran 1.2-1.4x faster at 8 and 16 rows of x (one core, the "7B"
// shape's projections; 360 against 255 GFLOP/s with everything in cache).
template <int R, int T>
__attribute__((target("avx512f,avx512bf16"))) void rows_times_bf16(const uint16_t* x, const uint16_t* wo, float* s,
                                                                  int64_t stride, int64_t w_stride, int64_t s_stride,
                                                                  int64_t n, int64_t ahead) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(wo + r * w_stride + k) + ahead, _MM_HINT_T0);
      wv[r] = (__m512bh)_mm512_loadu_si512(wo + r * w_stride + k);
    }
    for (int t = 0; t < T; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + t * stride + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float sum = _mm512_reduce_add_ps(acc[r][t]);
      for (int64_t kk = k; kk < n; ++kk) sum += widen(wo[r * w_stride + kk]) * widen(x[t * stride + kk]);
      s[r * s_stride + t] += sum;
    }
}

// The loops for two rows of x or more, as the ``loop`` attribute names them.
enum class Loop : int64_t { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

// Weight rows the loop takes at a time (rows_times_bf16); the float32 loops, one
// (pairs were slower from 3 to 6 rows of x, see row_times_512).
template <Loop L>
constexpr int kRowsAtOnce = L == Loop::kAvx512Bf16 ? 2 : 1;
// From how many rows of x the pairs pay: at 9-16 rows they are arithmetic (the "7B"
// shape's projections at 16 rows, one core, products alone: 4096 x 4096 2.5 -> 2.1 ms,
// 11008 x 4096 7.2 -> 6.3, 4096 x 11008 8.2 -> 7.0); at 2-4 rows, a read of memory,
// two rows at once read slower (4096 x 4096 at 2 rows: 0.85 -> 1.3-1.6 ms); at 8 rows
// they were level on the small shape and in between elsewhere.
constexpr int64_t kPairsFrom = 9;

// Spans of R weight rows (``in`` apart) against T rows of x (``stride`` apart) by the
// chosen loop, added into their sums (``m`` apart); x is float32 but for kAvx512Bf16,
// which reads the bfloat16 x as it is.
template <Loop L, int R, int T, typename X, typename W>
void rows_by(const X* x, const W* wo, float* s, int64_t stride, int64_t in, int64_t m, int64_t n, int64_t ahead) {
  if constexpr (L == Loop::kAvx512Bf16) {
    rows_times_bf16<R, T>(x, wo, s, stride, in, m, n, ahead);
  } else {
    static_assert(R == 1, "the float32 loops take one weight row at a time");
    if constexpr (L == Loop::kAvx512) row_times_512<T>(x, wo, s, stride, n, ahead);
    else row_times<T>(x, wo, s, stride, n, ahead);
  }
}

// R weight rows against all m rows of x, in tiles of up to eight rows of x.
template <Loop L, int R, typename X, typename W>
void rows_against_x(const X* x, const W* wo, float* s, int64_t m, int64_t stride, int64_t in, int64_t n,
                    int64_t ahead) {
  for (int64_t t = 0; t < m; t += 8) {
    const X* xt = x + t * stride;
    float* st = s + t;
    switch (std::min<int64_t>(8, m - t)) {
      case 8: rows_by<L, R, 8>(xt, wo, st, stride, in, m, n, ahead); break;
      case 7: rows_by<L, R, 7>(xt, wo, st, stride, in, m, n, ahead); break;
      case 6: rows_by<L, R, 6>(xt, wo, st, stride, in, m, n, ahead); break;
      case 5: rows_by<L, R, 5>(xt, wo, st, stride, in, m, n, ahead); break;
      case 4: rows_by<L, R, 4>(xt, wo, st, stride, in, m, n, ahead); break;
      case 3: rows_by<L, R, 3>(xt, wo, st, stride, in, m, n, ahead); break;
      case 2: rows_by<L, R, 2>(xt, wo, st, stride, in, m, n, ahead); break;
      default: rows_by<L, R, 1>(xt, wo, st, stride, in, m, n, ahead); break;
    }
  }
}

// How many inputs at a time the rows of x are walked: all of them where the m rows of
// x fit in kL1Budget, else as few blocks as do, of even size (a multiple of 32), each
// swept over every weight row of the chunk before the next, the sums kept between
// blocks. Unblocked, the "7B" shape's MLP at 8 rows of x read 64 KiB (bfloat16) of x
// from L2 for every weight row. Measured (a 2-core Zen 5, 48 KiB L1; products alone):
// at 8 rows the 90 MB bfloat16 up and down projections 5.0 and 5.2 -> 2.0 and 2.4 ms
// (their read takes 1.7-1.9), in float32 10.0 and 9.3 -> 5.4 and 7.1 ms, the "1B"
// ones in float32 2.3 and 2.4 -> 1.1 and 1.3 ms; at 16 rows the bfloat16 down
// projection 7.2 -> 3.7-4.7 ms; the small shape level. A 48 KiB budget was slower at
// 16 rows, 24 KiB at the small shape's LM head; the prefetch two rows on beat one
// block on (down projection 2.4 against 2.8-3.0 ms).
constexpr int64_t kL1Budget = 32 * 1024;

template <typename X>
int64_t input_block(int64_t m, int64_t in) {
  const int64_t fit = std::max<int64_t>(32, kL1Budget / (m * int64_t(sizeof(X))));
  if (in <= fit) return in;
  const int64_t blocks = (in + fit - 1) / fit;  // as few as fit, of even size
  return ((in + blocks - 1) / blocks + 31) & ~int64_t{31};
}

// x as the loops read it: the span of row t in the block of inputs from k0 (a
// multiple of ``block``) at block_at(k0) + t * stride, blocks ``step`` apart.
template <typename X>
struct Inputs {
  const X* x;
  int64_t m, block, stride, step;
  const X* block_at(int64_t k0) const { return x + k0 / block * step; }
};

// x laid out block by block for blocked inputs from kPackFrom rows of x up: each
// block's span of every row together, the rows a cache line more than the block
// apart. In place, a block's rows sit a row of x apart, and where that is a multiple
// of 4 KiB (the "7B" shape's hidden 4096) they all fall in the same L1 sets: past its
// 12 ways they evict each other (4096 x 4096 in bfloat16 at 16 rows of x, one core:
// 4.3-5.9 ms, against 2.5 ms copied; 11008 x 4096 14.9 against 6.3 with pairs); the
// extra line staggers them. The copy is 64-byte aligned (a buffer of __m512i), so no
// load of it straddles two cache lines. Up to 8 rows fit L1's ways in place, and the
// copy measured level to 1.4x slower there; those, and unblocked x, stay as they are.
constexpr int64_t kPackFrom = 9;

template <typename X>
Inputs<X> by_blocks(const X* x, int64_t m, int64_t in, int64_t block, std::vector<__m512i>& buf) {
  if (block >= in || m < kPackFrom) return {x, m, block, in, block};  // in place
  const int64_t stride = block + int64_t(sizeof(__m512i) / sizeof(X));
  const int64_t blocks = (in + block - 1) / block;
  buf.resize((size_t(blocks * m * stride) * sizeof(X) + sizeof(__m512i) - 1) / sizeof(__m512i));
  const Inputs<X> laid{reinterpret_cast<const X*>(buf.data()), m, block, stride, m * stride};
  for (int64_t k0 = 0; k0 < in; k0 += block)
    for (int64_t t = 0; t < m; ++t)
      std::memcpy(const_cast<X*>(laid.block_at(k0)) + t * stride, x + t * in + k0,
                  size_t(std::min(block, in - k0)) * sizeof(X));
  return laid;
}

// Several rows of x (laid out by by_blocks): each weight row once per block of inputs,
// against tiles of up to eight rows of x (rows_against_x); the sums rounded to Y at the
// end.
template <Loop L, typename X, typename W, typename Y>
void rows_of_many(const Inputs<X>& x, const W* w, Y* y, int64_t in, int64_t out, int64_t r0, int64_t r1) {
  const int64_t m = x.m, block = x.block;
  // the prefetch: unblocked, on along this row (4 KiB for AVX2, 8 KiB for the 512-bit
  // loops, see row_times_512); blocked, this block of the row two rows on
  const int64_t ahead = block < in ? 2 * in * int64_t(sizeof(W)) : (L == Loop::kAvx2 ? 4096 : 8192);
  constexpr int R = kRowsAtOnce<L>;
  const int64_t step = m >= kPairsFrom ? R : 1;
  thread_local std::vector<float> sums;
  sums.assign(size_t((r1 - r0) * m), 0.0f);
  for (int64_t k0 = 0; k0 < in; k0 += block) {
    const int64_t n = std::min(block, in - k0);
    const X* xb = x.block_at(k0);
    for (int64_t o = r0; o < r1; o += step) {
      const W* wo = w + o * in + k0;
      float* so = sums.data() + (o - r0) * m;
      if (step == R && o + R <= r1) rows_against_x<L, R>(xb, wo, so, m, x.stride, in, n, ahead);
      else rows_against_x<L, 1>(xb, wo, so, m, x.stride, in, n, ahead);  // (an odd row at the end)
    }
  }
  for (int64_t o = r0; o < r1; ++o)
    for (int64_t t = 0; t < m; ++t) put(y + t * out + o, sums[size_t((o - r0) * m + t)]);
}

// The chunk of weight rows each task reads: 64-256 KiB, an even number of rows, at
// least two chunks per core. Each chunk starts with no prefetch under way, so fewer,
// longer chunks stream faster: a 2.8 MB weight at 8 rows of x took 80 us in 64 KiB
// chunks, 64 us in 256 KiB ones; 512 KiB left a 0.5 MB weight to one core.
inline int64_t chunk_rows(int64_t in, int64_t out, int64_t element_bytes) {
  const int64_t row_bytes = std::max<int64_t>(1, in * element_bytes);
  const int64_t bytes = std::clamp<int64_t>(out * row_bytes / (2 * ryzen_jax::cores()), 65536, 262144);
  return std::max<int64_t>(2, (bytes / row_bytes) & ~int64_t{1});
}

// y (m, out) = x (m, in) · w (out, in)ᵀ by ``loop`` (one the CPU has), split over the
// cores by chunks of weight rows. x is float32 (a bfloat16 x widened first: it is at
// most a few rows) but for kAvx512Bf16, which reads the bfloat16 x as it is, from one
// row up; the other loops read one row of x by rows_of_one.
template <typename X, typename W, typename Y>
void matmul(ffi::ThreadPool& pool, const X* xp, const W* wp, Y* yp, int64_t m, int64_t in, int64_t out, Loop loop) {
  const int64_t chunk = chunk_rows(in, out, sizeof(W)), block = input_block<X>(m, in);
  thread_local std::vector<__m512i> packed;  // (the caller's thread: parallel_for returns when every task has)
  const Inputs<X> x = by_blocks(xp, m, in, block, packed);
  ryzen_jax::parallel_for(pool, (out + chunk - 1) / chunk, [=](int64_t c) {
    const int64_t r0 = c * chunk, r1 = std::min(out, r0 + chunk);
    if constexpr (std::is_same_v<X, uint16_t>) rows_of_many<Loop::kAvx512Bf16>(x, wp, yp, in, out, r0, r1);
    else if (m == 1) rows_of_one(xp, wp, yp, in, r0, r1);
    else if (loop == Loop::kAvx512) rows_of_many<Loop::kAvx512>(x, wp, yp, in, out, r0, r1);
    else rows_of_many<Loop::kAvx2>(x, wp, yp, in, out, r0, r1);
  });
}

// The loop asked for, or the one below it where the CPU (or the dtype) lacks it.
inline Loop runnable(Loop asked, bool bf16) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx512_bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  if (asked == Loop::kAvx512Bf16 && !(bf16 && avx512_bf16)) asked = Loop::kAvx512;
  return asked == Loop::kAvx512 && !avx512 ? Loop::kAvx2 : asked;
}

// One handler for both dtypes: float32 (E = float), and bfloat16 (E = its 16 bits)
// with float32 sums, as XLA's bfloat16 dot, and half the bytes of a float32 weight.
template <ffi::DataType T>
ffi::Error SkinnyMatmul(ffi::ThreadPool pool, ffi::Buffer<T> x, ffi::Buffer<T> w, ffi::ResultBuffer<T> y,
                        int64_t loop) {
  using E = std::conditional_t<T == ffi::DataType::F32, float, uint16_t>;
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("skinny_matmul: expected x (m, in) and w (out, in)");
  if (xd[0] == 0) return ffi::Error::Success();
  const E* xe = reinterpret_cast<const E*>(x.untyped_data());
  const E* we = reinterpret_cast<const E*>(w.untyped_data());
  E* ye = reinterpret_cast<E*>(y->untyped_data());
  const Loop run = runnable(Loop(loop), !std::is_same_v<E, float>);
  if (std::is_same_v<E, float> || run == Loop::kAvx512Bf16) {
    matmul(pool, xe, we, ye, xd[0], xd[1], wd[0], run);
  } else {  // x is a few rows: widened once, here
    thread_local std::vector<float> widened;
    widened.resize(xd[0] * xd[1]);
    for (size_t i = 0; i < widened.size(); ++i) widened[i] = widen(xe[i]);
    matmul(pool, static_cast<const float*>(widened.data()), we, ye, xd[0], xd[1], wd[0], run);
  }
  return ffi::Error::Success();
}

template <ffi::DataType T>
auto binding() {
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<T>>()
      .template Attr<int64_t>("loop");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RyzenSkinnyMatmul, SkinnyMatmul<ffi::DataType::F32>, binding<ffi::DataType::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RyzenSkinnyMatmulBf16, SkinnyMatmul<ffi::DataType::BF16>,
                              binding<ffi::DataType::BF16>());
