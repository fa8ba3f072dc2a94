// A step's keys or values written into one layer's KV cache in place: for each row b
// of the batch, new[b] (KV, T, D) goes to cache[b, :, start[b] : start[b] + T, :], the
// start (a negative one counted from the end) clamped so the slots fit, as
// lax.dynamic_update_slice does. The result
// is the cache's own buffer (the call aliases it), so only the new slots are touched.
//
// Why: XLA:CPU has no bfloat16 scatter or dynamic-update-slice; it converts the whole
// bfloat16 cache to float32 and back for each write (or, moved as bits, copies it to
// uint16): 2.6 ms per write at batch 8 of the small shape, 2048 positions, where the
// float32 cache's write takes 6 us. This copies bytes, so it serves any dtype; so
// does PutRow, the same for a whole row of the batch.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The call's result, which XLA aliases to ``in``: its buffer, written in place (were
// it another, ``in`` is copied into it first).
char* in_place(const ffi::AnyBuffer& in, ffi::Result<ffi::AnyBuffer>& out) {
  auto* dst = static_cast<char*>(out->untyped_data());
  if (dst != in.untyped_data()) std::memcpy(dst, in.untyped_data(), in.size_bytes());
  return dst;
}

ffi::Error WriteCache(ffi::AnyBuffer cache, ffi::AnyBuffer fresh, ffi::Buffer<ffi::S32> start,
                      ffi::Result<ffi::AnyBuffer> out) {
  auto c = cache.dimensions(), n = fresh.dimensions();
  if (c.size() != 4 || n.size() != 4 || c[0] != n[0] || c[1] != n[1] || c[3] != n[3] || n[2] > c[2] ||
      cache.element_type() != fresh.element_type() || start.element_count() != size_t(c[0]))
    return ffi::Error::InvalidArgument(
        "write_cache: expected a cache (B, KV, S, D), new slots (B, KV, T <= S, D) of its dtype, starts (B,)");
  const size_t width = ffi::ByteWidth(cache.element_type());
  char* dst = in_place(cache, out);
  const auto* src = static_cast<const char*>(fresh.untyped_data());
  const int32_t* s = start.typed_data();
  const int64_t heads = c[1], slots = c[2], steps = n[2];
  const size_t row = size_t(c[3]) * width, block = size_t(steps) * row;  // one head's new slots
  for (int64_t b = 0; b < c[0]; ++b) {
    const int64_t at = std::clamp<int64_t>(s[b] < 0 ? int64_t(s[b]) + slots : s[b], 0, slots - steps);
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t i = b * heads + h;
      std::memcpy(dst + (i * slots + at) * row, src + i * block, block);
    }
  }
  return ffi::Error::Success();
}

// Row 0 of ``small`` (N, ...) into row ``row`` of ``big`` (B, ...) (a negative one
// counted from the end, then clamped into [0, B), as lax.dynamic_update_slice does), in place: a prefilled request's
// cache moved into its slot of a server's batch. The same bytes as write_cache moves,
// for a whole row (XLA copied the whole batch's cache for a reshape that would have
// let write_cache do it).
ffi::Error PutRow(ffi::AnyBuffer big, ffi::AnyBuffer small, ffi::Buffer<ffi::S32> row, ffi::Result<ffi::AnyBuffer> out) {
  auto b = big.dimensions(), s = small.dimensions();
  bool same = b.size() == s.size() && b.size() > 0 && s[0] >= 1 && big.element_type() == small.element_type();
  for (size_t i = 1; same && i < b.size(); ++i) same = b[i] == s[i];
  if (!same || row.element_count() != 1)
    return ffi::Error::InvalidArgument("put_row: expected big (B, ...), small (N >= 1, ...) of its dtype and "
                                       "trailing shape, and one row index");
  char* dst = in_place(big, out);
  const size_t bytes = big.size_bytes() / size_t(b[0]);
  const int64_t r = row.typed_data()[0];
  const int64_t at = std::clamp<int64_t>(r < 0 ? r + b[0] : r, 0, b[0] - 1);
  std::memcpy(dst + at * bytes, small.untyped_data(), bytes);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RyzenPutRow, PutRow,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // big
                                  .Arg<ffi::AnyBuffer>()         // small
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row
                                  .Ret<ffi::AnyBuffer>());       // big, aliased

XLA_FFI_DEFINE_HANDLER_SYMBOL(RyzenWriteCache, WriteCache,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // cache
                                  .Arg<ffi::AnyBuffer>()         // new slots
                                  .Arg<ffi::Buffer<ffi::S32>>()  // starts
                                  .Ret<ffi::AnyBuffer>());       // the cache, aliased
