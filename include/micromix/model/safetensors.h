// safetensors model files: an 8-byte little-endian header length, a JSON header that
// names every tensor (dtype, shape, byte range) plus optional "__metadata__" strings,
// then the raw little-endian tensor bytes. The reader memory-maps the file read-only
// and validates every entry; every malformed file is reported as micromix::FormatError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "micromix/common/error.h"

namespace micromix::model {

enum class StDtype {
  BOOL, U8, I8, U16, I16, U32, I32, U64, I64, F16, BF16, F32, F64, F8_E4M3, F8_E5M2,
};

// "F32", "BF16", ... as written in safetensors headers.
const char* st_dtype_name(StDtype dtype);
std::optional<StDtype> parse_st_dtype(std::string_view name);
size_t st_dtype_size(StDtype dtype);
// F64/F32/F16/BF16 and the integer dtypes convert to float; BOOL and FP8 do not.
bool st_dtype_converts_to_float(StDtype dtype);

struct SafetensorsTensorInfo {
  std::string name;
  StDtype dtype = StDtype::F32;
  std::vector<int64_t> shape;  // row-major: the last dimension is contiguous
  int64_t elements = 0;
  uint64_t begin = 0;  // byte range relative to the start of the data section
  uint64_t end = 0;
  const uint8_t* data = nullptr;  // into the mapping, valid while the file object lives
  uint64_t nbytes() const { return end - begin; }
};

class SafetensorsFile {
 public:
  // Maps the file read-only and parses it; FormatError (naming the file and the
  // problem) for malformed content, std::runtime_error if it cannot be opened.
  static SafetensorsFile open(const std::string& path);
  // Parses an in-memory image; the buffer must outlive the object.
  static SafetensorsFile parse(const uint8_t* data, size_t size, std::string name = "<memory>");

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  const std::string& path() const;
  uint64_t header_size() const;  // the JSON header's length in bytes
  uint64_t data_offset() const;  // 8 + header_size()
  uint64_t file_size() const;

  const std::vector<SafetensorsTensorInfo>& tensors() const;  // in header order
  const SafetensorsTensorInfo* find_tensor(std::string_view name) const;
  const SafetensorsTensorInfo& tensor(std::string_view name) const;  // FormatError if absent
  const std::map<std::string, std::string>& metadata() const;  // "__metadata__"

  // Converts a tensor to fp32 (out has info.elements values); FormatError for a
  // dtype that does not convert (BOOL, FP8).
  void to_float(const SafetensorsTensorInfo& info, float* out) const;
  std::vector<float> to_float(const SafetensorsTensorInfo& info) const;

 private:
  struct Impl;
  explicit SafetensorsFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// One tensor to write: raw little-endian bytes of `size` bytes, which must equal
// product(shape) * size of dtype.
struct SafetensorsTensorData {
  std::string name;
  std::string dtype;  // "F32", "BF16", "U8", ...
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t size = 0;
};

// Writes a safetensors file atomically: a temporary file in the same directory is
// written, flushed and renamed over `path`. Tensors are stored in the given order.
// Throws std::invalid_argument for inconsistent input, std::runtime_error for I/O errors.
void write_safetensors(const std::string& path, const std::vector<SafetensorsTensorData>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace micromix::model
