// A bfloat16 embedding lookup: rows of a (vocab, dim) table, copied as they lie (an id
// outside the table gives a row of NaN, as jnp.take's default mode does).
//
// Why: XLA:CPU has no bfloat16 gather or dynamic slice; it converts the table to
// float32 (or, moved as bits, copies it to uint16) for the lookup, and inside a decode
// loop it hoists that conversion out of the loop: a copy of the whole table at every
// dispatch (131 MB for the benchmark's "1B" shape, 17 ms of a 72 ms step).

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error TakeRows(ffi::Buffer<ffi::BF16> table, ffi::Buffer<ffi::S32> ids, ffi::ResultBuffer<ffi::BF16> out) {
  auto d = table.dimensions();
  if (d.size() != 2 || ids.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("take_rows: expected a table (rows, dim) and ids (n,)");
  const int64_t rows = d[0], dim = d[1], n = ids.dimensions()[0];
  const auto* src = reinterpret_cast<const uint16_t*>(table.untyped_data());
  auto* dst = reinterpret_cast<uint16_t*>(out->untyped_data());
  const int32_t* id = ids.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    uint16_t* row = dst + i * dim;
    const int64_t at = id[i] < 0 ? int64_t(id[i]) + rows : int64_t(id[i]);  // -1 is the last row, as in jnp.take
    if (at >= 0 && at < rows) {
      std::memcpy(row, src + at * dim, size_t(dim) * sizeof(uint16_t));
    } else {
      for (int64_t k = 0; k < dim; ++k) row[k] = 0x7fc0;  // a quiet NaN
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RyzenTakeRows, TakeRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
