// GGUF (v2/v3) model files: header, metadata of every value type, tensor table,
// memory-mapped tensor data and dequantization of ggml tensor types to fp32.
// Every malformed file is reported as micromix::FormatError.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "micromix/common/error.h"

namespace micromix::model {

enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};

struct GgmlTypeInfo {
  const char* name;
  int64_t block_elements;  // elements per block (1 for plain floats)
  int64_t block_bytes;     // bytes per block
  bool can_dequantize;     // supported by GgufFile::dequantize
};

// nullopt for a type id micromix does not know.
std::optional<GgmlTypeInfo> ggml_type_info(uint32_t type);

enum class GgufValueType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};

struct GgufValue;
using GgufArray = std::vector<GgufValue>;

struct GgufValue {
  GgufValueType type = GgufValueType::UINT8;
  GgufValueType element_type = GgufValueType::UINT8;  // for arrays
  std::variant<uint64_t, int64_t, double, bool, std::string, GgufArray> value;
};

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the contiguous (fastest) dimension
  int64_t elements = 0;
  uint64_t offset = 0;        // relative to the start of the data section
  uint64_t nbytes = 0;
  const uint8_t* data = nullptr;  // into the mapping, valid while the GgufFile lives
};

class GgufFile {
 public:
  // Maps the file read-only and parses it; throws FormatError (with the file name and
  // what is wrong) for any malformed content, std::runtime_error if it cannot be opened.
  static GgufFile open(const std::string& path);
  // Parses an in-memory image (for tests and fuzzing); the buffer must outlive the object.
  static GgufFile parse(const uint8_t* data, size_t size, std::string name = "<memory>");

  GgufFile(GgufFile&&) noexcept;
  GgufFile& operator=(GgufFile&&) noexcept;
  ~GgufFile();

  uint32_t version() const;
  uint64_t alignment() const;
  const std::string& path() const;
  uint64_t data_offset() const;  // start of the tensor data section in the file
  uint64_t file_size() const;

  const std::vector<std::pair<std::string, GgufValue>>& metadata() const;  // file order
  const GgufValue* find(std::string_view key) const;
  bool has(std::string_view key) const { return find(key) != nullptr; }

  // Typed getters: throw FormatError when the key is missing or has another type
  // (any integer type converts to int64 if it fits; float32/float64 to double).
  std::string get_string(std::string_view key) const;
  int64_t get_int(std::string_view key) const;
  double get_float(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  std::vector<std::string> get_string_array(std::string_view key) const;
  std::vector<int64_t> get_int_array(std::string_view key) const;
  std::vector<double> get_float_array(std::string_view key) const;
  // Optional variants: nullopt when missing; FormatError when present with another type.
  std::optional<std::string> find_string(std::string_view key) const;
  std::optional<int64_t> find_int(std::string_view key) const;
  std::optional<double> find_float(std::string_view key) const;
  std::optional<bool> find_bool(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const;
  const GgufTensorInfo* find_tensor(std::string_view name) const;
  const GgufTensorInfo& tensor(std::string_view name) const;  // throws FormatError if absent

  // Dequantize a whole tensor into fp32 (out has info.elements values), bit-exact
  // with ggml's reference dequantizers.
  void dequantize(const GgufTensorInfo& info, float* out) const;
  std::vector<float> dequantize(const GgufTensorInfo& info) const;

 private:
  struct Impl;
  explicit GgufFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// "Q4_K" etc., or "type<N>" for an id micromix does not know.
std::string ggml_type_name(GgmlType type);
const char* gguf_value_type_name(GgufValueType type);

// Exact IEEE half / bfloat16 to float conversions (NaN payloads kept).
float fp16_to_fp32(uint16_t bits);
float bf16_to_fp32(uint16_t bits);

// Dequantize n elements (a multiple of the type's block size) of raw ggml data.
void dequantize_ggml(GgmlType type, const uint8_t* data, int64_t n, float* out);

// Human-readable rendering of a metadata value (arrays abbreviated), for inspect.
std::string describe_value(const GgufValue& value, size_t max_items = 8);

}  // namespace micromix::model
