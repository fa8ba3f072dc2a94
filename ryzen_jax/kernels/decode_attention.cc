// One decode step's attention for one layer, read straight from the KV cache: each
// (row, KV head) pair streams the keys its query may see (positions below the row's
// own, within the sliding window if there is one) once for all of its query heads,
// then the values once, and adds the step's own key and value, which the cache does
// not hold yet. Softmax in float32, as in ryzen_jax.layers.attention, whose result
// this equals up to the order of the sums.
//
// Why: XLA:CPU runs a decode step's attention as batched dots of a few rows each,
// which read the cache at 4-5 GB/s and always read the whole attend bucket; this
// reads only the positions each row holds (README, Benchmarks). Scores eight keys at a
// time and values two positions at a time (scores_of, weighted_sum): one layer at
// batch 8 of the small shape, 192 positions, took 127 us on one core, now 82 us. The
// cache is float32 or bfloat16 (a bfloat16 model's, half the bytes to read), widened
// to float32 as it is loaded.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ryzen_jax::dot;
using ryzen_jax::hsum;
using ryzen_jax::load8;

// e^x for x <= 0 (scores minus their maximum): 2^n · p(r), |r| <= ln2/2, p of degree
// 6; relative error about 2e-7, float32's own rounding.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // max returns its second operand for a NaN: keep it NaN
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// p ← e^(p - max) / Σ, in place, over n scores.
void softmax(float* p, int64_t n) {
  float m = p[0];
  for (int64_t j = 1; j < n; ++j) m = std::max(m, p[j]);
  __m256 mv = _mm256_set1_ps(m), sv = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
    _mm256_storeu_ps(p + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float s = hsum(sv);
  for (; j < n; ++j) s += (p[j] = std::exp(p[j] - m));
  const float inv = 1.0f / s;
  for (j = 0; j < n; ++j) p[j] *= inv;
}

// The 8 sums of a[0..7] in one vector: [Σa0, Σa1, ..., Σa7] (a transpose by pairwise
// adds: 9 shuffles and adds where eight separate horizontal sums take 40).
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// s[j] = scale · q·keys[j] for j < n: eight keys at a time, their sums in eight
// registers reduced together (hsum8), the rest one by one. C: the cache's element,
// float or uint16_t (bfloat16's bits).
template <typename C>
inline void scores_of(const float* q, const C* keys, int64_t n, int64_t dim, float scale, float* s) {
  const __m256 sv = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 acc[8];
    for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
    const C* kj = keys + j * dim;
    for (int64_t c = 0; c < dim; c += 8) {
      const __m256 qc = _mm256_loadu_ps(q + c);
      for (int t = 0; t < 8; ++t) acc[t] = _mm256_fmadd_ps(qc, load8(kj + t * dim + c), acc[t]);
    }
    _mm256_storeu_ps(s + j, _mm256_mul_ps(sv, hsum8(acc)));
  }
  for (; j < n; ++j) s[j] = scale * dot(keys + j * dim, q, dim);
}

// o = Σ_j p[j] · values[j] over j < n, plus p[n] · own: 32 output lanes in registers
// at a time, two positions per step into two sets of sums, so consecutive FMAs do not
// wait on each other (one set made this loop 3x slower than the scores).
template <typename C>
inline void weighted_sum(const float* p, const C* values, int64_t n, const float* own, int64_t dim, float* o) {
  for (int64_t d0 = 0; d0 < dim; d0 += 32) {
    const int lanes = int(std::min<int64_t>(32, dim - d0) / 8);
    __m256 a[4], b[4];
    for (int c = 0; c < 4; ++c) a[c] = b[c] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      const __m256 p0 = _mm256_set1_ps(p[j]), p1 = _mm256_set1_ps(p[j + 1]);
      const C* v0 = values + j * dim + d0;
      for (int c = 0; c < lanes; ++c) {
        a[c] = _mm256_fmadd_ps(p0, load8(v0 + 8 * c), a[c]);
        b[c] = _mm256_fmadd_ps(p1, load8(v0 + dim + 8 * c), b[c]);
      }
    }
    if (j < n) {  // an odd position left
      const __m256 pj = _mm256_set1_ps(p[j]);
      for (int c = 0; c < lanes; ++c) a[c] = _mm256_fmadd_ps(pj, load8(values + j * dim + d0 + 8 * c), a[c]);
    }
    const __m256 pn = _mm256_set1_ps(p[n]);  // then the own value
    for (int c = 0; c < lanes; ++c) a[c] = _mm256_fmadd_ps(pn, _mm256_loadu_ps(own + d0 + 8 * c), a[c]);
    for (int c = 0; c < lanes; ++c) _mm256_storeu_ps(o + d0 + 8 * c, _mm256_add_ps(a[c], b[c]));
  }
}

template <typename C>
struct Layer {
  const float* q;
  const C *k, *v;
  const float *own_k, *own_v;
  const int32_t* positions;
  float* out;
  int64_t kv, groups, length, dim, window;
  float scale;

  // Pair i = (row, KV head): its query heads against the keys and values it may see.
  void pair(int64_t i, std::vector<float>& scores) const {
    const int64_t b = i / kv;
    const int64_t pos = std::clamp<int64_t>(positions[b], 0, length);
    // the window starts from the position itself, as XLA's mask does, not from the clamped one
    const int64_t lo = window > 0 ? std::clamp<int64_t>(int64_t(positions[b]) - window + 1, 0, pos) : 0;
    const int64_t n = pos - lo + 1;  // visible cache positions, then the own key
    const C* keys = k + (i * length + lo) * dim;
    const C* values = v + (i * length + lo) * dim;
    const float* ok = own_k + i * dim;
    const float* ov = own_v + i * dim;
    scores.resize(groups * n);
    for (int64_t g = 0; g < groups; ++g) {
      // the pair's keys are read from memory once: the next query heads find them in cache
      float* p = scores.data() + g * n;
      scores_of(q + (i * groups + g) * dim, keys, n - 1, dim, scale, p);
      p[n - 1] = scale * dot(ok, q + (i * groups + g) * dim, dim);
      softmax(p, n);
      weighted_sum(p, values, n - 1, ov, dim, out + (i * groups + g) * dim);
    }
  }
};

template <typename C>
void run(ffi::ThreadPool& pool, const Layer<C>& layer, int64_t pairs) {
  ryzen_jax::parallel_for(pool, pairs, [layer](int64_t i) {
    thread_local std::vector<float> scores;
    layer.pair(i, scores);
  });
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::F32> own_k, ffi::Buffer<ffi::F32> own_v, ffi::Buffer<ffi::S32> positions,
                           ffi::ResultBuffer<ffi::F32> out, float scale, int64_t window) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const auto type = k.element_type();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] || qd[3] % 8 != 0 ||
      v.element_type() != type || (type != ffi::DataType::F32 && type != ffi::DataType::BF16) ||
      v.element_count() != k.element_count() || own_k.element_count() != size_t(qd[0] * qd[1] * qd[3]) ||
      own_v.element_count() != own_k.element_count() || positions.element_count() != size_t(qd[0]))
    return ffi::Error::InvalidArgument(
        "decode_attention: expected q (B, KV, G, D), k and v (B, KV, S, D) both float32 or both bfloat16, own k "
        "and v (B, KV, 1, D), positions (B,), D a multiple of 8");
  const int64_t pairs = qd[0] * qd[1];
  if (type == ffi::DataType::F32) {
    run(pool, Layer<float>{q.typed_data(), k.reinterpret_data<float>(), v.reinterpret_data<float>(),
                           own_k.typed_data(), own_v.typed_data(), positions.typed_data(), out->typed_data(), qd[1],
                           qd[2], kd[2], qd[3], window, scale}, pairs);
  } else {
    run(pool, Layer<uint16_t>{q.typed_data(), k.reinterpret_data<uint16_t>(), v.reinterpret_data<uint16_t>(),
                              own_k.typed_data(), own_v.typed_data(), positions.typed_data(), out->typed_data(),
                              qd[1], qd[2], kd[2], qd[3], window, scale}, pairs);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RyzenDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // cache k
                                  .Arg<ffi::AnyBuffer>()         // cache v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // own k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // own v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));
