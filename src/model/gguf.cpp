// GGUF reader: a bounds-checked parser over a read-only mapping, and dequantizers
// for the ggml tensor types that follow ggml's reference definitions bit for bit.
#include "micromix/model/gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <sstream>
#include <unordered_map>

#include "mapped_file.h"

namespace micromix::model {

namespace {

constexpr uint32_t kMaxDims = 4;        // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 16;      // nested metadata arrays
constexpr uint64_t kDefaultAlignment = 32;
// Bound on metadata array elements in one file (all arrays together), which bounds
// the memory the parsed metadata takes; real tokenizer vocabularies are far smaller.
constexpr uint64_t kMaxArrayElements = uint64_t{1} << 24;

bool mul_overflow(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }
bool add_overflow(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_add_overflow(a, b, out); }

const char* value_type_name(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8: return "uint8";
    case GgufValueType::INT8: return "int8";
    case GgufValueType::UINT16: return "uint16";
    case GgufValueType::INT16: return "int16";
    case GgufValueType::UINT32: return "uint32";
    case GgufValueType::INT32: return "int32";
    case GgufValueType::FLOAT32: return "float32";
    case GgufValueType::BOOL: return "bool";
    case GgufValueType::STRING: return "string";
    case GgufValueType::ARRAY: return "array";
    case GgufValueType::UINT64: return "uint64";
    case GgufValueType::INT64: return "int64";
    case GgufValueType::FLOAT64: return "float64";
  }
  return "unknown";
}

bool valid_value_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::FLOAT64); }

// Smallest encoding of one value of a type, used to bound counts before allocating.
uint64_t min_value_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8: case GgufValueType::INT8: case GgufValueType::BOOL: return 1;
    case GgufValueType::UINT16: case GgufValueType::INT16: return 2;
    case GgufValueType::UINT32: case GgufValueType::INT32: case GgufValueType::FLOAT32: return 4;
    case GgufValueType::UINT64: case GgufValueType::INT64: case GgufValueType::FLOAT64: return 8;
    case GgufValueType::STRING: return 8;
    case GgufValueType::ARRAY: return 12;
  }
  return 1;
}

// Sequential little-endian reader that never leaves [data, data + size).
class Reader {
 public:
  Reader(const uint8_t* data, size_t size, const std::string& name) : data_(data), size_(size), name_(name) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw FormatError(name_ + ": " + what + " (at byte " + std::to_string(pos_) + ")");
  }
  size_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }
  uint64_t array_elements = 0;  // running total over the file

  void need(uint64_t n, const char* what) const {
    if (n > remaining())
      fail(std::string("file ends inside ") + what + " (needs " + std::to_string(n) + " bytes, " +
           std::to_string(remaining()) + " left)");
  }
  template <class T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const char* what) {
    const uint64_t len = read<uint64_t>(what);
    if (len > remaining())
      fail(std::string(what) + " has length " + std::to_string(len) + " but only " + std::to_string(remaining()) +
           " bytes remain");
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return s;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& name_;
};

GgufValue read_value(Reader& r, GgufValueType type, int depth, const std::string& key) {
  GgufValue v;
  v.type = type;
  switch (type) {
    case GgufValueType::UINT8: v.value = uint64_t{r.read<uint8_t>("metadata value")}; break;
    case GgufValueType::INT8: v.value = int64_t{r.read<int8_t>("metadata value")}; break;
    case GgufValueType::UINT16: v.value = uint64_t{r.read<uint16_t>("metadata value")}; break;
    case GgufValueType::INT16: v.value = int64_t{r.read<int16_t>("metadata value")}; break;
    case GgufValueType::UINT32: v.value = uint64_t{r.read<uint32_t>("metadata value")}; break;
    case GgufValueType::INT32: v.value = int64_t{r.read<int32_t>("metadata value")}; break;
    case GgufValueType::UINT64: v.value = uint64_t{r.read<uint64_t>("metadata value")}; break;
    case GgufValueType::INT64: v.value = int64_t{r.read<int64_t>("metadata value")}; break;
    case GgufValueType::FLOAT32: v.value = double{r.read<float>("metadata value")}; break;
    case GgufValueType::FLOAT64: v.value = r.read<double>("metadata value"); break;
    case GgufValueType::BOOL: {
      const uint8_t b = r.read<uint8_t>("metadata value");
      if (b > 1) r.fail("metadata key '" + key + "': bool value " + std::to_string(b) + " is neither 0 nor 1");
      v.value = b != 0;
      break;
    }
    case GgufValueType::STRING: v.value = r.read_string("metadata string"); break;
    case GgufValueType::ARRAY: {
      if (depth >= kMaxArrayDepth)
        r.fail("metadata key '" + key + "': arrays nested deeper than " + std::to_string(kMaxArrayDepth));
      const uint32_t et = r.read<uint32_t>("array element type");
      if (!valid_value_type(et))
        r.fail("metadata key '" + key + "': unknown array element type " + std::to_string(et));
      v.element_type = static_cast<GgufValueType>(et);
      const uint64_t count = r.read<uint64_t>("array length");
      if (count > r.remaining() / min_value_size(v.element_type))
        r.fail("metadata key '" + key + "': array of " + std::to_string(count) + " " +
               value_type_name(v.element_type) + " values cannot fit in the " + std::to_string(r.remaining()) +
               " bytes left");
      r.array_elements += count;
      if (r.array_elements > kMaxArrayElements)
        r.fail("metadata key '" + key + "': more than " + std::to_string(kMaxArrayElements) +
               " metadata array elements in total");
      GgufArray items;
      items.reserve(static_cast<size_t>(count));
      for (uint64_t i = 0; i < count; ++i) items.push_back(read_value(r, v.element_type, depth + 1, key));
      v.value = std::move(items);
      break;
    }
    default: r.fail("metadata key '" + key + "': unknown value type");
  }
  return v;
}

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------
// Type table and conversions

std::optional<GgmlTypeInfo> ggml_type_info(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::F32: return GgmlTypeInfo{"F32", 1, 4, true};
    case GgmlType::F16: return GgmlTypeInfo{"F16", 1, 2, true};
    case GgmlType::BF16: return GgmlTypeInfo{"BF16", 1, 2, true};
    case GgmlType::Q4_0: return GgmlTypeInfo{"Q4_0", 32, 18, true};
    case GgmlType::Q4_1: return GgmlTypeInfo{"Q4_1", 32, 20, true};
    case GgmlType::Q5_0: return GgmlTypeInfo{"Q5_0", 32, 22, true};
    case GgmlType::Q5_1: return GgmlTypeInfo{"Q5_1", 32, 24, true};
    case GgmlType::Q8_0: return GgmlTypeInfo{"Q8_0", 32, 34, true};
    case GgmlType::Q8_1: return GgmlTypeInfo{"Q8_1", 32, 36, false};
    case GgmlType::Q2_K: return GgmlTypeInfo{"Q2_K", 256, 84, true};
    case GgmlType::Q3_K: return GgmlTypeInfo{"Q3_K", 256, 110, true};
    case GgmlType::Q4_K: return GgmlTypeInfo{"Q4_K", 256, 144, true};
    case GgmlType::Q5_K: return GgmlTypeInfo{"Q5_K", 256, 176, true};
    case GgmlType::Q6_K: return GgmlTypeInfo{"Q6_K", 256, 210, true};
    case GgmlType::Q8_K: return GgmlTypeInfo{"Q8_K", 256, 292, true};
  }
  return std::nullopt;
}

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / nan (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | static_cast<uint32_t>(112 - e) << 23 | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bf16_to_fp32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

namespace {

float h2f(const uint8_t* p) { return fp16_to_fp32(load_u16(p)); }

// Each function dequantizes one block; the arithmetic (operand order, int-to-float
// conversions, separate multiply and add) mirrors ggml's dequantize_row_* exactly.
void block_q4_0(const uint8_t* b, float* y) {
  const float d = h2f(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    const int x0 = (qs[j] & 0x0F) - 8;
    const int x1 = (qs[j] >> 4) - 8;
    y[j] = x0 * d;
    y[j + 16] = x1 * d;
  }
}

void block_q4_1(const uint8_t* b, float* y) {
  const float d = h2f(b), m = h2f(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    const int x0 = qs[j] & 0x0F;
    const int x1 = qs[j] >> 4;
    const float p0 = x0 * d, p1 = x1 * d;
    y[j] = p0 + m;
    y[j + 16] = p1 + m;
  }
}

void block_q5_0(const uint8_t* b, float* y) {
  const float d = h2f(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const uint8_t xh0 = ((qh >> j) << 4) & 0x10;
    const uint8_t xh1 = (qh >> (j + 12)) & 0x10;
    const int32_t x0 = ((qs[j] & 0x0F) | xh0) - 16;
    const int32_t x1 = ((qs[j] >> 4) | xh1) - 16;
    y[j] = x0 * d;
    y[j + 16] = x1 * d;
  }
}

void block_q5_1(const uint8_t* b, float* y) {
  const float d = h2f(b), m = h2f(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const uint8_t xh0 = ((qh >> j) << 4) & 0x10;
    const uint8_t xh1 = (qh >> (j + 12)) & 0x10;
    const int x0 = (qs[j] & 0x0F) | xh0;
    const int x1 = (qs[j] >> 4) | xh1;
    const float p0 = x0 * d, p1 = x1 * d;
    y[j] = p0 + m;
    y[j + 16] = p1 + m;
  }
}

void block_q8_0(const uint8_t* b, float* y) {
  const float d = h2f(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = qs[j] * d;
}

// Q2_K: scales[16], qs[64], d, dmin.
void block_q2_k(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* q = b + 16;
  const float d = h2f(b + 80), min = h2f(b + 82);
  int is = 0;
  for (int n = 0; n < 256; n += 128) {
    int shift = 0;
    for (int j = 0; j < 4; ++j) {
      uint8_t sc = scales[is++];
      float dl = d * (sc & 0xF), ml = min * (sc >> 4);
      for (int l = 0; l < 16; ++l) {
        const float p = dl * static_cast<int8_t>((q[l] >> shift) & 3);
        *y++ = p - ml;
      }
      sc = scales[is++];
      dl = d * (sc & 0xF);
      ml = min * (sc >> 4);
      for (int l = 0; l < 16; ++l) {
        const float p = dl * static_cast<int8_t>((q[l + 16] >> shift) & 3);
        *y++ = p - ml;
      }
      shift += 2;
    }
    q += 32;
  }
}

// Q3_K: hmask[32], qs[64], scales[12] (sixteen 6-bit scales), d.
void block_q3_k(const uint8_t* b, float* y) {
  const uint8_t* hm = b;
  const uint8_t* q = b + 32;
  const uint8_t* packed = b + 96;
  const float d_all = h2f(b + 108);
  int8_t scales[16];
  for (int j = 0; j < 16; ++j) {
    const int lo = j < 8 ? (packed[j] & 0xF) : (packed[j - 8] >> 4);
    const int hi = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
    scales[j] = static_cast<int8_t>(lo | (hi << 4));
  }
  int is = 0;
  uint8_t m = 1;
  for (int n = 0; n < 256; n += 128) {
    int shift = 0;
    for (int j = 0; j < 4; ++j) {
      float dl = d_all * (scales[is++] - 32);
      for (int l = 0; l < 16; ++l)
        *y++ = dl * (static_cast<int8_t>((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
      dl = d_all * (scales[is++] - 32);
      for (int l = 0; l < 16; ++l)
        *y++ = dl * (static_cast<int8_t>((q[l + 16] >> shift) & 3) - ((hm[l + 16] & m) ? 0 : 4));
      shift += 2;
      m <<= 1;
    }
    q += 32;
  }
}

void scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K: d, dmin, scales[12], qs[128].
void block_q4_k(const uint8_t* b, float* y) {
  const float d = h2f(b), min = h2f(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  int is = 0;
  uint8_t sc, m;
  for (int j = 0; j < 256; j += 64) {
    scale_min_k4(is + 0, scales, &sc, &m);
    const float d1 = d * sc, m1 = min * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = min * m;
    for (int l = 0; l < 32; ++l) {
      const float p = d1 * (q[l] & 0xF);
      *y++ = p - m1;
    }
    for (int l = 0; l < 32; ++l) {
      const float p = d2 * (q[l] >> 4);
      *y++ = p - m2;
    }
    q += 32;
    is += 2;
  }
}

// Q5_K: d, dmin, scales[12], qh[32], qs[128].
void block_q5_k(const uint8_t* b, float* y) {
  const float d = h2f(b), min = h2f(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  int is = 0;
  uint8_t sc, m, u1 = 1, u2 = 2;
  for (int j = 0; j < 256; j += 64) {
    scale_min_k4(is + 0, scales, &sc, &m);
    const float d1 = d * sc, m1 = min * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = min * m;
    for (int l = 0; l < 32; ++l) {
      const float p = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0));
      *y++ = p - m1;
    }
    for (int l = 0; l < 32; ++l) {
      const float p = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0));
      *y++ = p - m2;
    }
    ql += 32;
    is += 2;
    u1 <<= 2;
    u2 <<= 2;
  }
}

// Q6_K: ql[128], qh[64], scales[16] (int8), d.
void block_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = h2f(b + 208);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int8_t q1 = static_cast<int8_t>((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int8_t q2 = static_cast<int8_t>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int8_t q3 = static_cast<int8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int8_t q4 = static_cast<int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l + 0] = d * sc[is + 0] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

// Q8_K: float d, qs[256] (int8), bsums[16] (int16, unused here).
void block_q8_k(const uint8_t* b, float* y) {
  float d;
  std::memcpy(&d, b, 4);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 4);
  for (int j = 0; j < 256; ++j) y[j] = d * qs[j];
}

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn block_fn(GgmlType type) {
  switch (type) {
    case GgmlType::Q4_0: return block_q4_0;
    case GgmlType::Q4_1: return block_q4_1;
    case GgmlType::Q5_0: return block_q5_0;
    case GgmlType::Q5_1: return block_q5_1;
    case GgmlType::Q8_0: return block_q8_0;
    case GgmlType::Q2_K: return block_q2_k;
    case GgmlType::Q3_K: return block_q3_k;
    case GgmlType::Q4_K: return block_q4_k;
    case GgmlType::Q5_K: return block_q5_k;
    case GgmlType::Q6_K: return block_q6_k;
    case GgmlType::Q8_K: return block_q8_k;
    default: return nullptr;
  }
}

constexpr int64_t kParallelThreshold = 1 << 16;  // elements

}  // namespace

void dequantize_ggml(GgmlType type, const uint8_t* data, int64_t n, float* out) {
  const auto info = ggml_type_info(static_cast<uint32_t>(type));
  if (!info) throw FormatError("dequantize: unknown ggml type " + std::to_string(static_cast<uint32_t>(type)));
  if (!info->can_dequantize) throw FormatError(std::string("dequantize: type ") + info->name + " is not supported");
  if (n < 0 || n % info->block_elements != 0)
    throw FormatError("dequantize: " + std::to_string(n) + " elements is not a whole number of " + info->name +
                      " blocks of " + std::to_string(info->block_elements));
  const bool parallel = n >= kParallelThreshold;
  switch (type) {
    case GgmlType::F32:
      std::memcpy(out, data, static_cast<size_t>(n) * 4);
      return;
    case GgmlType::F16:
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_fp32(load_u16(data + 2 * i));
      return;
    case GgmlType::BF16:
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_fp32(load_u16(data + 2 * i));
      return;
    default: break;
  }
  const BlockFn fn = block_fn(type);
  const int64_t blocks = n / info->block_elements;
  const int64_t be = info->block_elements, bb = info->block_bytes;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < blocks; ++i) fn(data + i * bb, out + i * be);
}

// ---------------------------------------------------------------------------------
// GgufFile

struct GgufFile::Impl {
  std::string path;
  MappedFile mapping;  // empty for parse()
  const uint8_t* data = nullptr;
  size_t size = 0;
  uint32_t version = 0;
  uint64_t alignment = kDefaultAlignment;
  uint64_t data_offset = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata;
  std::unordered_map<std::string, size_t> key_index;
  std::vector<GgufTensorInfo> tensors;
  std::unordered_map<std::string, size_t> tensor_index;

  [[noreturn]] void fail(const std::string& what) const { throw FormatError(path + ": " + what); }
  void parse();
};

void GgufFile::Impl::parse() {
  Reader r(data, size, path);
  if (size < 4 || std::memcmp(data, "GGUF", 4) != 0) {
    if (size >= 4 && std::memcmp(data, "FUGG", 4) == 0) fail("big-endian GGUF files are not supported");
    fail("not a GGUF file (bad magic)");
  }
  r.read<uint32_t>("magic");
  version = r.read<uint32_t>("version");
  if (version == 1) fail("GGUF version 1 is not supported (only versions 2 and 3)");
  if (version != 2 && version != 3) {
    if ((version & 0xFFFF) == 0 && version != 0) fail("GGUF version field is byte-swapped (big-endian file?)");
    fail("unsupported GGUF version " + std::to_string(version) + " (only versions 2 and 3)");
  }
  const uint64_t n_tensors = r.read<uint64_t>("tensor count");
  const uint64_t n_kv = r.read<uint64_t>("metadata count");
  // A metadata entry needs at least 8 (key length) + 4 (type) + 1 bytes, a tensor
  // entry 8 (name length) + 4 (dims) + 4 (type) + 8 (offset).
  if (n_kv > r.remaining() / 13)
    fail("metadata count " + std::to_string(n_kv) + " cannot fit in a file of " + std::to_string(size) + " bytes");
  if (n_tensors > r.remaining() / 24)
    fail("tensor count " + std::to_string(n_tensors) + " cannot fit in a file of " + std::to_string(size) + " bytes");

  metadata.reserve(static_cast<size_t>(n_kv));
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = r.read_string("metadata key");
    const uint32_t t = r.read<uint32_t>("metadata value type");
    if (!valid_value_type(t)) r.fail("metadata key '" + key + "' has unknown value type " + std::to_string(t));
    GgufValue v = read_value(r, static_cast<GgufValueType>(t), 0, key);
    if (!key_index.emplace(key, metadata.size()).second) r.fail("duplicate metadata key '" + key + "'");
    metadata.emplace_back(std::move(key), std::move(v));
  }

  if (auto it = key_index.find("general.alignment"); it != key_index.end()) {
    const GgufValue& v = metadata[it->second].second;
    uint64_t a = 0;
    if (const auto* u = std::get_if<uint64_t>(&v.value); u && v.type != GgufValueType::BOOL) {
      a = *u;
    } else if (const auto* s = std::get_if<int64_t>(&v.value)) {
      a = *s > 0 ? static_cast<uint64_t>(*s) : 0;
    } else {
      fail(std::string("general.alignment must be an integer, not ") + value_type_name(v.type));
    }
    if (a == 0 || (a & (a - 1)) != 0 || a > (uint64_t{1} << 30))
      fail("general.alignment " + std::to_string(a) + " is not a power of two up to 2^30");
    alignment = a;
  }

  tensors.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = r.read_string("tensor name");
    const std::string what = "tensor '" + t.name + "'";
    const uint32_t n_dims = r.read<uint32_t>("tensor dimension count");
    if (n_dims > kMaxDims)
      r.fail(what + " has " + std::to_string(n_dims) + " dimensions (at most " + std::to_string(kMaxDims) + ")");
    uint64_t elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const int64_t dim = r.read<int64_t>("tensor dimensions");
      if (dim < 0) r.fail(what + " has negative dimension " + std::to_string(dim));
      if (mul_overflow(elements, static_cast<uint64_t>(dim), &elements) ||
          elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        r.fail(what + ": element count overflows");
      t.dims.push_back(dim);
    }
    const uint32_t type = r.read<uint32_t>("tensor type");
    const auto info = ggml_type_info(type);
    if (!info) r.fail(what + " has unknown ggml type " + std::to_string(type));
    t.type = static_cast<GgmlType>(type);
    const int64_t row = t.dims.empty() ? 1 : t.dims[0];
    if (row % info->block_elements != 0)
      r.fail(what + ": row length " + std::to_string(row) + " is not a multiple of the " + info->name +
             " block size " + std::to_string(info->block_elements));
    t.elements = static_cast<int64_t>(elements);
    if (mul_overflow(elements / static_cast<uint64_t>(info->block_elements),
                     static_cast<uint64_t>(info->block_bytes), &t.nbytes))
      r.fail(what + ": byte size overflows");
    t.offset = r.read<uint64_t>("tensor offset");
    if (t.offset % alignment != 0)
      r.fail(what + " offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
             std::to_string(alignment));
    if (!tensor_index.emplace(t.name, tensors.size()).second) r.fail("duplicate tensor name '" + t.name + "'");
    tensors.push_back(std::move(t));
  }

  // The data section starts at the next multiple of the alignment.
  const uint64_t header_end = r.pos();
  data_offset = (header_end + alignment - 1) / alignment * alignment;
  if (tensors.empty()) return;
  if (data_offset > size)
    fail("data section would start at byte " + std::to_string(data_offset) + ", past the end of the file (" +
         std::to_string(size) + " bytes)");
  const uint64_t data_size = size - data_offset;
  for (auto& t : tensors) {
    uint64_t end;
    if (add_overflow(t.offset, t.nbytes, &end) || end > data_size)
      fail("tensor '" + t.name + "' (offset " + std::to_string(t.offset) + ", " + std::to_string(t.nbytes) +
           " bytes) extends past the end of the data section (" + std::to_string(data_size) + " bytes)");
    t.data = data + data_offset + t.offset;
  }
  std::vector<NamedRange> ranges;
  ranges.reserve(tensors.size());
  for (const auto& t : tensors) ranges.push_back({t.offset, t.offset + t.nbytes, &t.name});
  if (std::string overlap = overlap_message(std::move(ranges)); !overlap.empty()) fail(overlap);
}

GgufFile::GgufFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GgufFile::GgufFile(GgufFile&&) noexcept = default;
GgufFile& GgufFile::operator=(GgufFile&&) noexcept = default;
GgufFile::~GgufFile() = default;

GgufFile GgufFile::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->mapping = MappedFile(path);
  impl->data = impl->mapping.data();
  impl->size = impl->mapping.size();
  impl->parse();
  return GgufFile(std::move(impl));
}

GgufFile GgufFile::parse(const uint8_t* data, size_t size, std::string name) {
  auto impl = std::make_unique<Impl>();
  impl->path = std::move(name);
  impl->data = data;
  impl->size = size;
  impl->parse();
  return GgufFile(std::move(impl));
}

uint32_t GgufFile::version() const { return impl_->version; }
uint64_t GgufFile::alignment() const { return impl_->alignment; }
const std::string& GgufFile::path() const { return impl_->path; }
uint64_t GgufFile::data_offset() const { return impl_->data_offset; }
uint64_t GgufFile::file_size() const { return impl_->size; }

const std::vector<std::pair<std::string, GgufValue>>& GgufFile::metadata() const { return impl_->metadata; }

const GgufValue* GgufFile::find(std::string_view key) const {
  auto it = impl_->key_index.find(std::string(key));
  return it == impl_->key_index.end() ? nullptr : &impl_->metadata[it->second].second;
}

namespace {

std::optional<int64_t> as_int(const GgufValue& v) {
  if (v.type == GgufValueType::BOOL || v.type == GgufValueType::ARRAY) return std::nullopt;
  if (const auto* u = std::get_if<uint64_t>(&v.value)) {
    if (*u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(*u);
  }
  if (const auto* s = std::get_if<int64_t>(&v.value)) return *s;
  return std::nullopt;
}

std::optional<double> as_float(const GgufValue& v) {
  if (const auto* d = std::get_if<double>(&v.value)) return *d;
  return std::nullopt;
}

}  // namespace

#define MICROMIX_WRONG_TYPE(key, v, wanted)                                                                    \
  impl_->fail("metadata key '" + std::string(key) + "' is " + value_type_name((v).type) + ", expected " + \
              (wanted))

std::optional<std::string> GgufFile::find_string(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (const auto* s = std::get_if<std::string>(&v->value)) return *s;
  MICROMIX_WRONG_TYPE(key, *v, "string");
}

std::optional<int64_t> GgufFile::find_int(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (auto i = as_int(*v)) return i;
  MICROMIX_WRONG_TYPE(key, *v, "an integer that fits int64");
}

std::optional<double> GgufFile::find_float(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (auto f = as_float(*v)) return f;
  MICROMIX_WRONG_TYPE(key, *v, "float32 or float64");
}

std::optional<bool> GgufFile::find_bool(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (const auto* b = std::get_if<bool>(&v->value)) return *b;
  MICROMIX_WRONG_TYPE(key, *v, "bool");
}

namespace {
template <class T>
T require(std::optional<T> v, const std::string& path, std::string_view key) {
  if (!v) throw FormatError(path + ": metadata key '" + std::string(key) + "' is missing");
  return std::move(*v);
}
}  // namespace

std::string GgufFile::get_string(std::string_view key) const { return require(find_string(key), path(), key); }
int64_t GgufFile::get_int(std::string_view key) const { return require(find_int(key), path(), key); }
double GgufFile::get_float(std::string_view key) const { return require(find_float(key), path(), key); }
bool GgufFile::get_bool(std::string_view key) const { return require(find_bool(key), path(), key); }

namespace {
const GgufArray& require_array(const GgufFile& f, std::string_view key) {
  const GgufValue* v = f.find(key);
  if (!v) throw FormatError(f.path() + ": metadata key '" + std::string(key) + "' is missing");
  if (const auto* a = std::get_if<GgufArray>(&v->value)) return *a;
  throw FormatError(f.path() + ": metadata key '" + std::string(key) + "' is " + value_type_name(v->type) +
                    ", expected an array");
}
[[noreturn]] void bad_element(const GgufFile& f, std::string_view key, const char* wanted) {
  throw FormatError(f.path() + ": metadata array '" + std::string(key) + "' has an element that is not " + wanted);
}
}  // namespace

std::vector<std::string> GgufFile::get_string_array(std::string_view key) const {
  std::vector<std::string> out;
  for (const auto& e : require_array(*this, key)) {
    const auto* s = std::get_if<std::string>(&e.value);
    if (!s) bad_element(*this, key, "a string");
    out.push_back(*s);
  }
  return out;
}

std::vector<int64_t> GgufFile::get_int_array(std::string_view key) const {
  std::vector<int64_t> out;
  for (const auto& e : require_array(*this, key)) {
    auto i = as_int(e);
    if (!i) bad_element(*this, key, "an integer that fits int64");
    out.push_back(*i);
  }
  return out;
}

std::vector<double> GgufFile::get_float_array(std::string_view key) const {
  std::vector<double> out;
  for (const auto& e : require_array(*this, key)) {
    auto d = as_float(e);
    if (!d) bad_element(*this, key, "a float");
    out.push_back(*d);
  }
  return out;
}

const std::vector<GgufTensorInfo>& GgufFile::tensors() const { return impl_->tensors; }

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
  auto it = impl_->tensor_index.find(std::string(name));
  return it == impl_->tensor_index.end() ? nullptr : &impl_->tensors[it->second];
}

const GgufTensorInfo& GgufFile::tensor(std::string_view name) const {
  const GgufTensorInfo* t = find_tensor(name);
  if (!t) impl_->fail("no tensor named '" + std::string(name) + "'");
  return *t;
}

void GgufFile::dequantize(const GgufTensorInfo& info, float* out) const {
  if (!info.data) impl_->fail("tensor '" + info.name + "' has no data");
  try {
    dequantize_ggml(info.type, info.data, info.elements, out);
  } catch (const FormatError& e) {
    impl_->fail("tensor '" + info.name + "': " + e.what());
  }
}

std::vector<float> GgufFile::dequantize(const GgufTensorInfo& info) const {
  std::vector<float> out(static_cast<size_t>(info.elements));
  dequantize(info, out.data());
  return out;
}

// ---------------------------------------------------------------------------------

std::string ggml_type_name(GgmlType type) {
  const auto info = ggml_type_info(static_cast<uint32_t>(type));
  return info ? info->name : "type" + std::to_string(static_cast<uint32_t>(type));
}

const char* gguf_value_type_name(GgufValueType type) { return value_type_name(type); }

namespace {
std::string quote(const std::string& s, size_t max_chars) {
  std::string out = "\"";
  size_t n = 0;
  for (unsigned char c : s) {
    if (n++ >= max_chars) {
      out += "...";
      break;
    }
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string scalar_text(const GgufValue& v) {
  std::ostringstream s;
  if (const auto* u = std::get_if<uint64_t>(&v.value)) s << *u;
  else if (const auto* i = std::get_if<int64_t>(&v.value)) s << *i;
  else if (const auto* d = std::get_if<double>(&v.value)) {
    s.precision(v.type == GgufValueType::FLOAT32 ? 9 : 17);
    s << *d;
  } else if (const auto* b = std::get_if<bool>(&v.value)) s << (*b ? "true" : "false");
  else if (const auto* str = std::get_if<std::string>(&v.value)) s << quote(*str, 200);
  return s.str();
}
}  // namespace

std::string describe_value(const GgufValue& value, size_t max_items) {
  const auto* arr = std::get_if<GgufArray>(&value.value);
  if (!arr) return scalar_text(value);
  std::string out = "[";
  for (size_t i = 0; i < arr->size() && i < max_items; ++i) {
    if (i) out += ", ";
    out += describe_value((*arr)[i], max_items);
  }
  if (arr->size() > max_items) out += ", ...";
  out += "] (" + std::to_string(arr->size()) + " x " + value_type_name(value.element_type) + ")";
  return out;
}

}  // namespace micromix::model
