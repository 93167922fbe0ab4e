// Row-major MX matrices: quantize [rows, K] fp32/bf16 data into packed element
// codes plus E8M0 scales (one per 32 consecutive elements of a row), and back.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "micromix/mx/format.h"

namespace micromix::mx {

struct MxMatrix {
  ElemFormat format = ElemFormat::E4M3;
  ScaleRule rule = ScaleRule::Ceil;
  int64_t rows = 0;
  int64_t cols = 0;             // K, a multiple of 32
  std::vector<uint8_t> codes;   // packed element codes, row-major, row_bytes() per row
  std::vector<uint8_t> scales;  // E8M0, row-major [rows, cols / 32]

  size_t row_bytes() const { return packed_bytes(format, static_cast<size_t>(cols)); }
  size_t blocks_per_row() const { return static_cast<size_t>(cols) / kBlockSize; }
  uint8_t code(int64_t r, int64_t c) const { return unpack_code(format, codes.data() + r * row_bytes(), c); }
  uint8_t scale(int64_t r, int64_t c) const { return scales[r * blocks_per_row() + c / kBlockSize]; }
  float value(int64_t r, int64_t c) const { return decode_scaled(format, code(r, c), scale(r, c)); }
};

// Throws std::invalid_argument when cols is not a positive multiple of 32 or the
// data size does not match rows * cols.
MxMatrix quantize(std::span<const float> x, int64_t rows, int64_t cols, ElemFormat format, ScaleRule rule);
MxMatrix quantize_bf16(std::span<const uint16_t> x, int64_t rows, int64_t cols, ElemFormat format,
                       ScaleRule rule);
void dequantize(const MxMatrix& m, std::span<float> out);
std::vector<float> dequantize(const MxMatrix& m);

// Quantize-dequantize n values (n a multiple of 32) in place: the numerics of an
// MX cast without the storage, used to simulate MX inference on fp32 data.
void fake_quantize(std::span<float> x, ElemFormat format, ScaleRule rule);

std::optional<ElemFormat> parse_elem_format(std::string_view name);
std::optional<ScaleRule> parse_scale_rule(std::string_view name);
const char* scale_rule_name(ScaleRule rule);

// Average storage bits per element including the shared scale.
inline double bits_per_element(ElemFormat f) { return elem_traits(f).bits + 8.0 / kBlockSize; }

}  // namespace micromix::mx
