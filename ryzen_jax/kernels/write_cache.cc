// A step's keys or values written into one layer's KV cache in place: for each row b
// of the batch, new[b] (KV, T, D) goes to cache[b, :, start[b] : start[b] + T, :], the
// start clamped so the slots fit (as lax.dynamic_update_slice clamps it). The result
// is the cache's own buffer (the call aliases it), so only the new slots are touched.
//
// Why: XLA:CPU has no bfloat16 scatter or dynamic-update-slice; it converts the whole
// bfloat16 cache to float32 and back for each write (or, moved as bits, copies it to
// uint16): 2.6 ms per write at batch 8 of the small shape, 2048 positions, where the
// float32 cache's write takes 6 us. This copies bytes, so it serves any dtype.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error WriteCache(ffi::AnyBuffer cache, ffi::AnyBuffer fresh, ffi::Buffer<ffi::S32> start,
                      ffi::Result<ffi::AnyBuffer> out) {
  auto c = cache.dimensions(), n = fresh.dimensions();
  if (c.size() != 4 || n.size() != 4 || c[0] != n[0] || c[1] != n[1] || c[3] != n[3] || n[2] > c[2] ||
      cache.element_type() != fresh.element_type() || start.element_count() != size_t(c[0]))
    return ffi::Error::InvalidArgument(
        "write_cache: expected a cache (B, KV, S, D), new slots (B, KV, T <= S, D) of its dtype, starts (B,)");
  const size_t width = ffi::ByteWidth(cache.element_type());
  auto* dst = static_cast<char*>(out->untyped_data());
  if (dst != cache.untyped_data()) std::memcpy(dst, cache.untyped_data(), cache.size_bytes());
  const auto* src = static_cast<const char*>(fresh.untyped_data());
  const int32_t* s = start.typed_data();
  const int64_t heads = c[1], slots = c[2], steps = n[2];
  const size_t row = size_t(c[3]) * width, block = size_t(steps) * row;  // one head's new slots
  for (int64_t b = 0; b < c[0]; ++b) {
    const int64_t at = std::clamp<int64_t>(s[b], 0, slots - steps);
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t i = b * heads + h;
      std::memcpy(dst + (i * slots + at) * row, src + i * block, block);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RyzenWriteCache, WriteCache,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // cache
                                  .Arg<ffi::AnyBuffer>()         // new slots
                                  .Arg<ffi::Buffer<ffi::S32>>()  // starts
                                  .Ret<ffi::AnyBuffer>());       // the cache, aliased
