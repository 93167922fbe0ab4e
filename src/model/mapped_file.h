// A read-only memory mapping of a whole file (internal to the model readers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace micromix::model {

class MappedFile {
 public:
  MappedFile() = default;
  // Maps `path` read-only; throws std::runtime_error if it cannot be opened or mapped.
  // An empty file gives an empty mapping (data() == nullptr, size() == 0).
  explicit MappedFile(const std::string& path);
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void reset();
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// A tensor's bytes [begin, end) in a model file.
struct NamedRange {
  uint64_t begin, end;
  const std::string* name;
};
// "tensors 'a' and 'b' overlap" for the first two of `ranges` in file order that share bytes;
// empty when none do.
std::string overlap_message(std::vector<NamedRange> ranges);

}  // namespace micromix::model
