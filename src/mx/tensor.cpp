#include "micromix/mx/tensor.h"

#include <stdexcept>

namespace micromix::mx {

namespace {

void check_shape(size_t size, int64_t rows, int64_t cols) {
  if (rows < 0 || cols <= 0 || cols % kBlockSize != 0)
    throw std::invalid_argument("MX quantization needs K (columns) to be a positive multiple of 32, got " +
                                std::to_string(cols));
  if (size != static_cast<size_t>(rows) * static_cast<size_t>(cols))
    throw std::invalid_argument("MX quantization: data has " + std::to_string(size) + " values, shape is " +
                                std::to_string(rows) + " x " + std::to_string(cols));
}

template <typename Load>
MxMatrix quantize_with(int64_t rows, int64_t cols, ElemFormat format, ScaleRule rule, Load load) {
  MxMatrix m;
  m.format = format;
  m.rule = rule;
  m.rows = rows;
  m.cols = cols;
  m.codes.assign(static_cast<size_t>(rows) * m.row_bytes(), 0);
  m.scales.assign(static_cast<size_t>(rows) * m.blocks_per_row(), 0);
  const size_t block_bytes = packed_bytes(format, kBlockSize);
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    float block[kBlockSize];
    uint8_t codes[kBlockSize];
    for (size_t blk = 0; blk < m.blocks_per_row(); ++blk) {
      const size_t base = static_cast<size_t>(r) * static_cast<size_t>(cols) + blk * kBlockSize;
      for (int i = 0; i < kBlockSize; ++i) block[i] = load(base + i);
      m.scales[r * m.blocks_per_row() + blk] = quantize_block(format, rule, block, kBlockSize, codes);
      pack_codes(format, codes, kBlockSize, m.codes.data() + r * m.row_bytes() + blk * block_bytes);
    }
  }
  return m;
}

}  // namespace

MxMatrix quantize(std::span<const float> x, int64_t rows, int64_t cols, ElemFormat format, ScaleRule rule) {
  check_shape(x.size(), rows, cols);
  return quantize_with(rows, cols, format, rule, [&](size_t i) { return x[i]; });
}

MxMatrix quantize_bf16(std::span<const uint16_t> x, int64_t rows, int64_t cols, ElemFormat format,
                       ScaleRule rule) {
  check_shape(x.size(), rows, cols);
  return quantize_with(rows, cols, format, rule, [&](size_t i) { return bf16_bits_to_float(x[i]); });
}

void dequantize(const MxMatrix& m, std::span<float> out) {
  if (out.size() != static_cast<size_t>(m.rows * m.cols))
    throw std::invalid_argument("MX dequantize: output size does not match the matrix");
#pragma omp parallel for schedule(static) if (m.rows * m.cols > (1 << 16))
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.cols; ++c) out[r * m.cols + c] = m.value(r, c);
}

std::vector<float> dequantize(const MxMatrix& m) {
  std::vector<float> out(static_cast<size_t>(m.rows * m.cols));
  dequantize(m, out);
  return out;
}

void fake_quantize(std::span<float> x, ElemFormat format, ScaleRule rule) {
  if (x.size() % kBlockSize != 0)
    throw std::invalid_argument("MX fake_quantize needs a multiple of 32 values, got " + std::to_string(x.size()));
  uint8_t codes[kBlockSize];
  for (size_t base = 0; base < x.size(); base += kBlockSize) {
    const uint8_t b = quantize_block(format, rule, x.data() + base, kBlockSize, codes);
    for (int i = 0; i < kBlockSize; ++i) x[base + i] = decode_scaled(format, codes[i], b);
  }
}

std::optional<ElemFormat> parse_elem_format(std::string_view name) {
  for (ElemFormat f : kAllElemFormats)
    if (name == elem_traits(f).name) return f;
  return std::nullopt;
}

std::optional<ScaleRule> parse_scale_rule(std::string_view name) {
  if (name == "floor") return ScaleRule::Floor;
  if (name == "ceil") return ScaleRule::Ceil;
  return std::nullopt;
}

const char* scale_rule_name(ScaleRule rule) { return rule == ScaleRule::Floor ? "floor" : "ceil"; }

}  // namespace micromix::mx
