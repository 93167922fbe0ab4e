// safetensors reader (validated, memory-mapped) and atomic writer.
#include "micromix/model/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <unordered_map>

#include "mapped_file.h"
#include "micromix/model/gguf.h"

namespace micromix::model {

namespace {

constexpr uint64_t kMaxHeaderBytes = 100u << 20;  // the format's own limit is 100 MB

struct DtypeRow {
  StDtype dtype;
  const char* name;
  size_t size;
  bool to_float;
};

constexpr DtypeRow kDtypes[] = {
    {StDtype::BOOL, "BOOL", 1, false}, {StDtype::U8, "U8", 1, true},
    {StDtype::I8, "I8", 1, true},      {StDtype::U16, "U16", 2, true},
    {StDtype::I16, "I16", 2, true},    {StDtype::U32, "U32", 4, true},
    {StDtype::I32, "I32", 4, true},    {StDtype::U64, "U64", 8, true},
    {StDtype::I64, "I64", 8, true},    {StDtype::F16, "F16", 2, true},
    {StDtype::BF16, "BF16", 2, true},  {StDtype::F32, "F32", 4, true},
    {StDtype::F64, "F64", 8, true},    {StDtype::F8_E4M3, "F8_E4M3", 1, false},
    {StDtype::F8_E5M2, "F8_E5M2", 1, false},
};

const DtypeRow& row(StDtype d) {
  for (const auto& r : kDtypes)
    if (r.dtype == d) return r;
  throw std::logic_error("unknown safetensors dtype");
}

template <class T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Reads a JSON number that must be a non-negative integer.
bool get_uint(const nlohmann::ordered_json& j, uint64_t* out) {
  if (!j.is_number_unsigned()) {
    if (j.is_number_integer() && j.get<int64_t>() >= 0) {
      *out = static_cast<uint64_t>(j.get<int64_t>());
      return true;
    }
    return false;
  }
  *out = j.get<uint64_t>();
  return true;
}

}  // namespace

const char* st_dtype_name(StDtype dtype) { return row(dtype).name; }
size_t st_dtype_size(StDtype dtype) { return row(dtype).size; }
bool st_dtype_converts_to_float(StDtype dtype) { return row(dtype).to_float; }

std::optional<StDtype> parse_st_dtype(std::string_view name) {
  for (const auto& r : kDtypes)
    if (name == r.name) return r.dtype;
  return std::nullopt;
}

struct SafetensorsFile::Impl {
  std::string path;
  MappedFile mapping;
  const uint8_t* data = nullptr;
  size_t size = 0;
  uint64_t header_size = 0;
  std::vector<SafetensorsTensorInfo> tensors;
  std::unordered_map<std::string, size_t> index;
  std::map<std::string, std::string> metadata;

  [[noreturn]] void fail(const std::string& what) const { throw FormatError(path + ": " + what); }
  void parse();
};

void SafetensorsFile::Impl::parse() {
  if (size < 8) fail("file of " + std::to_string(size) + " bytes is too short for a safetensors header length");
  header_size = load<uint64_t>(data);
  if (header_size > size - 8)
    fail("header length " + std::to_string(header_size) + " exceeds the " + std::to_string(size - 8) +
         " bytes after it");
  if (header_size > kMaxHeaderBytes)
    fail("header length " + std::to_string(header_size) + " exceeds the 100 MB limit");
  if (header_size < 2 || data[8] != '{') fail("header is not a JSON object");

  // Parse with a callback that rejects duplicate keys inside any object.
  std::vector<std::set<std::string>> keys;
  bool duplicate = false;
  std::string duplicate_key;
  nlohmann::ordered_json::parser_callback_t cb = [&](int, nlohmann::ordered_json::parse_event_t ev, nlohmann::ordered_json& parsed) {
    using E = nlohmann::ordered_json::parse_event_t;
    if (ev == E::object_start) {
      keys.emplace_back();
    } else if (ev == E::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (ev == E::key && !keys.empty() && parsed.is_string()) {
      if (!keys.back().insert(parsed.get<std::string>()).second && !duplicate) {
        duplicate = true;
        duplicate_key = parsed.get<std::string>();
      }
    }
    return true;
  };
  nlohmann::ordered_json header;
  try {
    const char* begin = reinterpret_cast<const char*>(data + 8);
    header = nlohmann::ordered_json::parse(begin, begin + header_size, cb);
  } catch (const nlohmann::ordered_json::exception& e) {
    fail(std::string("header is not valid JSON: ") + e.what());
  }
  if (duplicate) fail("header has duplicate key '" + duplicate_key + "'");
  if (!header.is_object()) fail("header is not a JSON object");

  const uint64_t data_size = size - 8 - header_size;
  const uint8_t* base = data + 8 + header_size;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::ordered_json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) fail("__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) fail("__metadata__ value for '" + m.key() + "' is not a string");
        metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string what = "tensor '" + name + "'";
    if (!entry.is_object()) fail(what + ": entry is not an object");
    const auto dt = entry.find("dtype");
    const auto sh = entry.find("shape");
    const auto off = entry.find("data_offsets");
    if (dt == entry.end() || !dt->is_string()) fail(what + ": missing or non-string \"dtype\"");
    if (sh == entry.end() || !sh->is_array()) fail(what + ": missing or non-array \"shape\"");
    if (off == entry.end() || !off->is_array() || off->size() != 2)
      fail(what + ": \"data_offsets\" must be an array of two integers");
    SafetensorsTensorInfo t;
    t.name = name;
    const auto dtype = parse_st_dtype(dt->get<std::string>());
    if (!dtype) fail(what + ": unknown dtype '" + dt->get<std::string>() + "'");
    t.dtype = *dtype;
    uint64_t elements = 1;
    for (const auto& d : *sh) {
      uint64_t v;
      if (!get_uint(d, &v) || v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail(what + ": shape entries must be non-negative integers");
      if (__builtin_mul_overflow(elements, v, &elements) ||
          elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail(what + ": element count overflows");
      t.shape.push_back(static_cast<int64_t>(v));
    }
    t.elements = static_cast<int64_t>(elements);
    if (!get_uint((*off)[0], &t.begin) || !get_uint((*off)[1], &t.end))
      fail(what + ": data_offsets must be non-negative integers");
    if (t.begin > t.end)
      fail(what + ": data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] are reversed");
    if (t.end > data_size)
      fail(what + ": data_offsets end " + std::to_string(t.end) + " is past the " + std::to_string(data_size) +
           " bytes of data");
    uint64_t expected;
    if (__builtin_mul_overflow(elements, static_cast<uint64_t>(st_dtype_size(t.dtype)), &expected) ||
        expected != t.end - t.begin)
      fail(what + ": " + std::to_string(t.end - t.begin) + " bytes do not match shape and dtype " +
           st_dtype_name(t.dtype) + " (" + std::to_string(elements) + " elements)");
    t.data = base + t.begin;
    index.emplace(t.name, tensors.size());
    tensors.push_back(std::move(t));
  }
  std::vector<NamedRange> ranges;
  ranges.reserve(tensors.size());
  for (const auto& t : tensors) ranges.push_back({t.begin, t.end, &t.name});
  if (std::string overlap = overlap_message(std::move(ranges)); !overlap.empty()) fail(overlap);
}

SafetensorsFile::SafetensorsFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->mapping = MappedFile(path);
  impl->data = impl->mapping.data();
  impl->size = impl->mapping.size();
  impl->parse();
  return SafetensorsFile(std::move(impl));
}

SafetensorsFile SafetensorsFile::parse(const uint8_t* data, size_t size, std::string name) {
  auto impl = std::make_unique<Impl>();
  impl->path = std::move(name);
  impl->data = data;
  impl->size = size;
  impl->parse();
  return SafetensorsFile(std::move(impl));
}

const std::string& SafetensorsFile::path() const { return impl_->path; }
uint64_t SafetensorsFile::header_size() const { return impl_->header_size; }
uint64_t SafetensorsFile::data_offset() const { return 8 + impl_->header_size; }
uint64_t SafetensorsFile::file_size() const { return impl_->size; }
const std::vector<SafetensorsTensorInfo>& SafetensorsFile::tensors() const { return impl_->tensors; }
const std::map<std::string, std::string>& SafetensorsFile::metadata() const { return impl_->metadata; }

const SafetensorsTensorInfo* SafetensorsFile::find_tensor(std::string_view name) const {
  auto it = impl_->index.find(std::string(name));
  return it == impl_->index.end() ? nullptr : &impl_->tensors[it->second];
}

const SafetensorsTensorInfo& SafetensorsFile::tensor(std::string_view name) const {
  const auto* t = find_tensor(name);
  if (!t) impl_->fail("no tensor named '" + std::string(name) + "'");
  return *t;
}

void SafetensorsFile::to_float(const SafetensorsTensorInfo& info, float* out) const {
  if (!info.data) impl_->fail("tensor '" + info.name + "' has no data");
  const uint8_t* p = info.data;
  const int64_t n = info.elements;
  switch (info.dtype) {
    case StDtype::F32: std::memcpy(out, p, static_cast<size_t>(n) * 4); return;
    case StDtype::F16:
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_fp32(load<uint16_t>(p + 2 * i));
      return;
    case StDtype::BF16:
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_fp32(load<uint16_t>(p + 2 * i));
      return;
    case StDtype::F64: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<double>(p + 8 * i)); return;
    case StDtype::U8: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]); return;
    case StDtype::I8: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<int8_t>(p[i])); return;
    case StDtype::U16: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<uint16_t>(p + 2 * i)); return;
    case StDtype::I16: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<int16_t>(p + 2 * i)); return;
    case StDtype::U32: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<uint32_t>(p + 4 * i)); return;
    case StDtype::I32: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<int32_t>(p + 4 * i)); return;
    case StDtype::U64: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<uint64_t>(p + 8 * i)); return;
    case StDtype::I64: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<int64_t>(p + 8 * i)); return;
    default: break;
  }
  impl_->fail("tensor '" + info.name + "': dtype " + st_dtype_name(info.dtype) + " does not convert to float");
}

std::vector<float> SafetensorsFile::to_float(const SafetensorsTensorInfo& info) const {
  std::vector<float> out(static_cast<size_t>(info.elements));
  to_float(info, out.data());
  return out;
}

// ---------------------------------------------------------------------------------
// Writer

namespace {

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(path + ": write failed: " + std::strerror(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<SafetensorsTensorData>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__") throw std::invalid_argument("safetensors: tensor name '__metadata__' is reserved");
    if (!names.insert(t.name).second) throw std::invalid_argument("safetensors: duplicate tensor name '" + t.name + "'");
    const auto dtype = parse_st_dtype(t.dtype);
    if (!dtype) throw std::invalid_argument("safetensors: tensor '" + t.name + "' has unknown dtype '" + t.dtype + "'");
    uint64_t bytes = st_dtype_size(*dtype);
    for (int64_t d : t.shape) {
      if (d < 0 || __builtin_mul_overflow(bytes, static_cast<uint64_t>(d), &bytes))
        throw std::invalid_argument("safetensors: tensor '" + t.name + "' has an invalid shape");
    }
    if (bytes != t.size)
      throw std::invalid_argument("safetensors: tensor '" + t.name + "' has " + std::to_string(t.size) +
                                  " bytes, shape and dtype need " + std::to_string(bytes));
    if (t.size && !t.data) throw std::invalid_argument("safetensors: tensor '" + t.name + "' has no data");
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.size}}};
    offset += t.size;
  }
  std::string text = header.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::strict);
  while ((8 + text.size()) % 8 != 0) text += ' ';  // keep the data section 8-byte aligned

  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::string leaf = ".";
  leaf += target.filename().string();
  leaf += ".tmp.XXXXXX";
  std::string tmpl = (dir / leaf).string();
  const int fd = ::mkstemp(tmpl.data());
  if (fd < 0) throw std::runtime_error(path + ": cannot create a temporary file: " + std::strerror(errno));
  bool closed = false;
  try {
    const uint64_t len = text.size();
    write_all(fd, &len, 8, tmpl);
    write_all(fd, text.data(), text.size(), tmpl);
    for (const auto& t : tensors) write_all(fd, t.data, t.size, tmpl);
    if (::fchmod(fd, 0644) != 0) throw std::runtime_error(tmpl + ": chmod failed: " + std::strerror(errno));
    if (::fsync(fd) != 0) throw std::runtime_error(tmpl + ": fsync failed: " + std::strerror(errno));
    closed = true;
    if (::close(fd) != 0) throw std::runtime_error(tmpl + ": close failed: " + std::strerror(errno));
  } catch (...) {
    if (!closed) ::close(fd);
    ::unlink(tmpl.c_str());
    throw;
  }
  if (::rename(tmpl.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmpl.c_str());
    throw std::runtime_error(path + ": rename failed: " + std::strerror(e));
  }
}

}  // namespace micromix::model
