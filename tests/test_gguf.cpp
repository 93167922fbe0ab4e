// GGUF reader: metadata and dequantization against vectors produced by gguf-py
// (scripts/gen_gguf_vectors.py), the SmolLM2 model when present, crafted malformed
// files and a bounded mutation fuzz run.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <set>
#include <nlohmann/json.hpp>

#include "gguf_test_util.h"
#include "micromix/common/error.h"
#include "micromix/model/gguf.h"
#include "micromix/model/loader.h"

using namespace micromix;
using namespace micromix::model;
using micromix::test::data_dir;
using micromix::test::read_bytes;
using nlohmann::json;

namespace {

std::vector<float> load_blob(const std::string& path) {
  auto bytes = read_bytes(path);
  std::vector<float> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), v.size() * 4);
  return v;
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Same checksum as scripts/gen_gguf_vectors.py.
uint64_t checksum(const std::vector<float>& v) {
  uint64_t h = 0;
  for (size_t i = 0; i < v.size(); ++i) h += uint64_t{bits(v[i])} * (uint64_t{i} * 0x9E3779B97F4A7C15ull + 1);
  return h;
}

// Index of the first value whose bits differ, or -1.
int64_t first_mismatch(const float* a, const float* b, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (bits(a[i]) != bits(b[i])) return static_cast<int64_t>(i);
  return -1;
}

std::string type_upper(GgufValueType t) {
  std::string s = gguf_value_type_name(t);
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

// Compares a value read by micromix with the expectation written by the script.
void expect_value(const GgufValue& v, const json& want, const std::string& key) {
  SCOPED_TRACE(key);
  if (want.is_array()) {
    const auto* arr = std::get_if<GgufArray>(&v.value);
    ASSERT_NE(arr, nullptr);
    ASSERT_EQ(arr->size(), want.size());
    for (size_t i = 0; i < arr->size(); ++i) expect_value((*arr)[i], want[i], key + "[" + std::to_string(i) + "]");
  } else if (want.is_string()) {
    ASSERT_TRUE(std::holds_alternative<std::string>(v.value));
    EXPECT_EQ(std::get<std::string>(v.value), want.get<std::string>());
  } else if (want.is_boolean()) {
    ASSERT_TRUE(std::holds_alternative<bool>(v.value));
    EXPECT_EQ(std::get<bool>(v.value), want.get<bool>());
  } else if (want.is_number_float()) {
    ASSERT_TRUE(std::holds_alternative<double>(v.value));
    EXPECT_EQ(std::get<double>(v.value), want.get<double>());
  } else if (want.is_number_unsigned() && std::holds_alternative<uint64_t>(v.value)) {
    EXPECT_EQ(std::get<uint64_t>(v.value), want.get<uint64_t>());
  } else if (want.is_number_integer()) {
    if (const auto* u = std::get_if<uint64_t>(&v.value)) {
      ASSERT_GE(want.get<int64_t>(), 0);
      EXPECT_EQ(*u, static_cast<uint64_t>(want.get<int64_t>()));
    } else {
      ASSERT_TRUE(std::holds_alternative<int64_t>(v.value));
      EXPECT_EQ(std::get<int64_t>(v.value), want.get<int64_t>());
    }
  } else {
    FAIL() << "unexpected expectation " << want.dump();
  }
}

std::string small_path() { return data_dir() + "/small.gguf"; }

std::string model_path() {
  if (const char* m = std::getenv("MICROMIX_MODEL"); m && *m) return m;
  std::string cache;
  if (const char* c = std::getenv("MICROMIX_CACHE"); c && *c) cache = c;
  else if (const char* h = std::getenv("HOME"); h && *h) cache = std::string(h) + "/.cache/micromix";
  return cache + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// ------------------------------------------------------------------------------
// A byte-level GGUF writer for crafted files.
struct Builder {
  std::vector<uint8_t> b;
  template <class T>
  Builder& put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
    return *this;
  }
  Builder& str(const std::string& s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Builder& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    b.insert(b.end(), {'G', 'G', 'U', 'F'});
    return put<uint32_t>(version).put<uint64_t>(n_tensors).put<uint64_t>(n_kv);
  }
  Builder& kv_u32(const std::string& k, uint32_t v) { return str(k).put<uint32_t>(4).put<uint32_t>(v); }
  Builder& tensor(const std::string& name, std::vector<int64_t> dims, uint32_t type, uint64_t offset) {
    str(name).put<uint32_t>(static_cast<uint32_t>(dims.size()));
    for (auto d : dims) put<int64_t>(d);
    return put<uint32_t>(type).put<uint64_t>(offset);
  }
  Builder& pad(size_t alignment = 32) {
    while (b.size() % alignment) b.push_back(0);
    return *this;
  }
  Builder& zeros(size_t n) {
    b.insert(b.end(), n, 0);
    return *this;
  }
};

GgufFile parse(const std::vector<uint8_t>& b) { return GgufFile::parse(b.data(), b.size(), "crafted.gguf"); }

void expect_format_error(const std::vector<uint8_t>& b, const std::string& fragment) {
  try {
    parse(b);
    ADD_FAILURE() << "parsed without error; expected '" << fragment << "'";
  } catch (const FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("crafted.gguf"), std::string::npos) << msg;
    EXPECT_NE(msg.find(fragment), std::string::npos) << "message: " << msg;
  }
}

}  // namespace

// ------------------------------------------------------------------------------

TEST(GgufSmall, HeaderAndEveryMetadataType) {
  const json want = json::parse(micromix::test::read_text(data_dir() + "/small.expected.json"));
  const GgufFile f = GgufFile::open(small_path());
  EXPECT_EQ(f.version(), want["version"].get<uint32_t>());
  EXPECT_EQ(f.alignment(), want["alignment"].get<uint64_t>());
  EXPECT_EQ(f.path(), small_path());
  EXPECT_EQ(f.data_offset() % 64, 0u);
  ASSERT_EQ(f.metadata().size(), want["metadata"].size());
  for (const auto& m : want["metadata"]) {
    const std::string key = m["key"];
    const GgufValue* v = f.find(key);
    ASSERT_NE(v, nullptr) << key;
    EXPECT_EQ(type_upper(v->type), m["type"].get<std::string>()) << key;
    if (!m["element_type"].is_null()) EXPECT_EQ(type_upper(v->element_type), m["element_type"].get<std::string>()) << key;
    if (!m["nested_types"].is_null()) {
      const auto& arr = std::get<GgufArray>(v->value);
      for (size_t i = 0; i < arr.size(); ++i) {
        EXPECT_EQ(arr[i].type, GgufValueType::ARRAY);
        EXPECT_EQ(type_upper(arr[i].element_type), m["nested_types"][i].get<std::string>()) << key;
      }
    }
    expect_value(*v, m["value"], key);
  }
}

TEST(GgufSmall, TypedGetters) {
  const GgufFile f = GgufFile::open(small_path());
  EXPECT_EQ(f.get_string("general.architecture"), "micromix-test");
  EXPECT_EQ(f.get_int("test.uint8"), 200);
  EXPECT_EQ(f.get_int("test.int8"), -100);
  EXPECT_EQ(f.get_int("test.uint32"), 4000000000);
  EXPECT_EQ(f.get_int("test.int64"), -9000000000000000000);
  EXPECT_THROW(f.get_int("test.uint64"), FormatError);  // does not fit int64
  EXPECT_EQ(f.get_float("test.float32"), static_cast<double>(0.1f));
  EXPECT_EQ(f.get_float("test.float64"), 3.141592653589793);
  EXPECT_TRUE(f.get_bool("test.bool_true"));
  EXPECT_FALSE(f.get_bool("test.bool_false"));
  EXPECT_EQ(f.get_string_array("test.array.string"), (std::vector<std::string>{"a", "", "tokens"}));
  EXPECT_EQ(f.get_int_array("test.array.int32"), (std::vector<int64_t>{-5, 6, 7}));
  EXPECT_EQ(f.get_int_array("test.array.uint8"), (std::vector<int64_t>{0, 1, 255}));
  EXPECT_EQ(f.get_float_array("test.array.float64"), (std::vector<double>{1e300, -0.5}));
  EXPECT_THROW(f.get_int_array("test.array.uint64"), FormatError);
  EXPECT_THROW(f.get_string("test.uint8"), FormatError);
  EXPECT_THROW(f.get_int("test.string"), FormatError);
  EXPECT_THROW(f.get_int("test.bool_true"), FormatError);
  EXPECT_THROW(f.get_float("test.uint8"), FormatError);
  EXPECT_THROW(f.get_bool("no.such.key"), FormatError);
  EXPECT_THROW(f.get_string_array("test.array.int32"), FormatError);
  EXPECT_FALSE(f.find_int("no.such.key").has_value());
  EXPECT_FALSE(f.find_string("no.such.key").has_value());
  EXPECT_EQ(f.find_int("general.alignment"), 64);
  EXPECT_TRUE(f.has("test.array.nested"));
  EXPECT_THROW(f.tensor("missing"), FormatError);
  EXPECT_EQ(f.find_tensor("missing"), nullptr);
  try {
    f.get_int("test.string");
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("test.string"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("small.gguf"), std::string::npos);
  }
}

TEST(GgufSmall, DescribeValue) {
  const GgufFile f = GgufFile::open(small_path());
  EXPECT_EQ(describe_value(*f.find("test.uint8")), "200");
  EXPECT_EQ(describe_value(*f.find("test.bool_true")), "true");
  EXPECT_EQ(describe_value(*f.find("test.array.int32")), "[-5, 6, 7] (3 x int32)");
  EXPECT_EQ(describe_value(*f.find("test.array.int32"), 2), "[-5, 6, ...] (3 x int32)");
  EXPECT_EQ(describe_value(*f.find("test.string")).substr(0, 3), "\"h\xc3");
  EXPECT_NE(describe_value(*f.find("test.array.nested")).find("[[1, 2] (2 x int32)"), std::string::npos);
}

TEST(GgufSmall, DequantizeBitExactWithGgufPy) {
  const json want = json::parse(micromix::test::read_text(data_dir() + "/small.expected.json"));
  const std::vector<float> blob = load_blob(data_dir() + "/small.expected.f32");
  const GgufFile f = GgufFile::open(small_path());
  ASSERT_EQ(f.tensors().size(), want["tensors"].size());
  std::set<std::string> types;
  for (const auto& t : want["tensors"]) {
    const std::string name = t["name"];
    SCOPED_TRACE(name);
    const GgufTensorInfo& info = f.tensor(name);
    EXPECT_EQ(ggml_type_name(info.type), t["type"].get<std::string>());
    EXPECT_EQ(info.dims, t["dims"].get<std::vector<int64_t>>());
    const size_t count = t["count"], offset = t["offset"];
    ASSERT_EQ(static_cast<size_t>(info.elements), count);
    ASSERT_LE(offset + count, blob.size());
    EXPECT_EQ(info.offset % 64, 0u);
    const std::vector<float> got = f.dequantize(info);
    const int64_t bad = first_mismatch(got.data(), blob.data() + offset, count);
    EXPECT_EQ(bad, -1) << "value " << bad << ": micromix " << (bad >= 0 ? got[bad] : 0) << ", gguf-py "
                       << (bad >= 0 ? blob[offset + bad] : 0);
    types.insert(ggml_type_name(info.type));
    // The free function agrees with the member.
    std::vector<float> direct(count);
    dequantize_ggml(info.type, info.data, info.elements, direct.data());
    EXPECT_EQ(first_mismatch(direct.data(), got.data(), count), -1);
  }
  for (const char* t : {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                        "Q5_K", "Q6_K"})
    EXPECT_TRUE(types.count(t)) << t << " not covered by the vectors";
}

TEST(GgufDequantize, ParallelMatchesSerialOnLargeInput) {
  // Tile a random Q4_K image big enough to take the OpenMP path and compare per block.
  std::mt19937_64 rng(7);
  const int64_t blocks = 2048, n = blocks * 256;
  std::vector<uint8_t> raw(static_cast<size_t>(blocks) * 144);
  for (auto& c : raw) c = static_cast<uint8_t>(rng());
  for (int64_t i = 0; i < blocks; ++i) {  // finite scales
    raw[i * 144 + 1] &= 0x3B;
    raw[i * 144 + 3] &= 0x3B;
  }
  std::vector<float> all(n), one(256);
  dequantize_ggml(GgmlType::Q4_K, raw.data(), n, all.data());
  for (int64_t i = 0; i < blocks; i += 97) {
    dequantize_ggml(GgmlType::Q4_K, raw.data() + i * 144, 256, one.data());
    ASSERT_EQ(first_mismatch(one.data(), all.data() + i * 256, 256), -1);
  }
}

TEST(GgufDequantize, Errors) {
  std::vector<uint8_t> raw(1024);
  std::vector<float> out(1024);
  EXPECT_THROW(dequantize_ggml(GgmlType::Q4_0, raw.data(), 33, out.data()), FormatError);
  EXPECT_THROW(dequantize_ggml(GgmlType::Q8_1, raw.data(), 32, out.data()), FormatError);
  EXPECT_THROW(dequantize_ggml(static_cast<GgmlType>(99), raw.data(), 32, out.data()), FormatError);
  EXPECT_FALSE(ggml_type_info(99).has_value());
  EXPECT_FALSE(ggml_type_info(4).has_value());  // removed Q4_2
  EXPECT_EQ(ggml_type_info(14)->block_bytes, 210);
}

TEST(GgufDequantize, HalfConversions) {
  EXPECT_EQ(fp16_to_fp32(0x3C00), 1.0f);
  EXPECT_EQ(fp16_to_fp32(0xC000), -2.0f);
  EXPECT_EQ(fp16_to_fp32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(fp16_to_fp32(0x03FF), std::ldexp(1023.0f, -24));
  EXPECT_EQ(fp16_to_fp32(0x7BFF), 65504.0f);
  EXPECT_TRUE(std::isinf(fp16_to_fp32(0x7C00)));
  EXPECT_TRUE(std::isnan(fp16_to_fp32(0x7E00)));
  EXPECT_EQ(bits(fp16_to_fp32(0x8000)), 0x80000000u);
  EXPECT_EQ(bf16_to_fp32(0x3F80), 1.0f);
  // Every finite half converts exactly (check against the float -> half round trip).
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7C00) == 0x7C00) continue;
    const float f = fp16_to_fp32(static_cast<uint16_t>(h));
    const float mag = std::ldexp(static_cast<float>((h & 0x7C00) ? (0x400 | (h & 0x3FF)) : (h & 0x3FF)),
                                 (h & 0x7C00) ? static_cast<int>((h >> 10) & 0x1F) - 25 : -24);
    ASSERT_EQ(bits(f), bits((h & 0x8000) ? -mag : mag)) << h;
  }
}

// ------------------------------------------------------------------------------
// The real model (skipped when it is not on this machine).

TEST(GgufModel, MatchesGgufPy) {
  const std::string path = model_path();
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "model not found at " << path << " (set MICROMIX_MODEL)";
  const json want = json::parse(micromix::test::read_text(data_dir() + "/smollm2.expected.json"));
  const std::vector<float> blob = load_blob(data_dir() + "/smollm2.expected.f32");
  const GgufFile f = GgufFile::open(path);
  if (f.file_size() != want["file_size"].get<uint64_t>()) GTEST_SKIP() << "a different model file is at " << path;

  EXPECT_EQ(f.version(), want["version"].get<uint32_t>());
  EXPECT_EQ(f.alignment(), 32u);
  ASSERT_EQ(f.metadata().size(), want["kv_count"].get<size_t>());
  ASSERT_EQ(f.tensors().size(), want["tensor_count"].get<size_t>());
  for (const auto& m : want["metadata"]) {
    const std::string key = m["key"];
    const GgufValue* v = f.find(key);
    ASSERT_NE(v, nullptr) << key;
    EXPECT_EQ(type_upper(v->type), m["type"].get<std::string>()) << key;
    if (m["value"].is_object()) {  // array: length, first items, last item
      const auto& arr = std::get<GgufArray>(v->value);
      EXPECT_EQ(type_upper(v->element_type), m["element_type"].get<std::string>()) << key;
      ASSERT_EQ(arr.size(), m["value"]["length"].get<size_t>()) << key;
      const auto& head = m["value"]["head"];
      for (size_t i = 0; i < head.size(); ++i) expect_value(arr[i], head[i], key);
      if (!arr.empty()) expect_value(arr.back(), m["value"]["last"], key);
    } else {
      expect_value(*v, m["value"], key);
    }
  }
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("llama.block_count"), 30);
  EXPECT_EQ(f.get_int("llama.embedding_length"), 576);
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.tokens").size(), 49152u);

  // Every tensor: type, dims, size and position agree, and its full dequantization
  // has gguf-py's checksum.
  std::vector<float> buf;
  for (const auto& t : want["tensors"]) {
    const std::string name = t["name"];
    SCOPED_TRACE(name);
    const GgufTensorInfo& info = f.tensor(name);
    EXPECT_EQ(ggml_type_name(info.type), t["type"].get<std::string>());
    EXPECT_EQ(info.dims, t["dims"].get<std::vector<int64_t>>());
    EXPECT_EQ(info.elements, t["elements"].get<int64_t>());
    EXPECT_EQ(info.nbytes, t["nbytes"].get<uint64_t>());
    EXPECT_EQ(f.data_offset() + info.offset, t["file_offset"].get<uint64_t>());
    buf.resize(static_cast<size_t>(info.elements));
    f.dequantize(info, buf.data());
    EXPECT_EQ(std::to_string(checksum(buf)), t["checksum"].get<std::string>());
  }
  for (const auto& s : want["samples"]) {
    const GgufTensorInfo& info = f.tensor(s["name"].get<std::string>());
    SCOPED_TRACE(info.name);
    const auto got = f.dequantize(info);
    const size_t start = s["start"], count = s["count"], offset = s["offset"];
    ASSERT_LE(start + count, got.size());
    EXPECT_EQ(first_mismatch(got.data() + start, blob.data() + offset, count), -1);
  }
}

// A model whose RoPE the loader would not apply is refused, not run as plain RoPE: the real
// file with one metadata key renamed to the scaling type (same length, so the image stays
// well-formed), and with one tensor renamed to the per-frequency factors.
TEST(GgufModel, RopeItCannotApplyIsRefused) {
  const std::string path = model_path();
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "model not found at " << path << " (set MICROMIX_MODEL)";
  const std::vector<uint8_t> image = read_bytes(path);
  auto renamed = [&](const std::string& from, const std::string& to) {
    EXPECT_EQ(from.size(), to.size());
    std::vector<uint8_t> b = image;
    const auto at = std::search(b.begin(), b.end(), from.begin(), from.end());
    EXPECT_NE(at, b.end()) << from;
    if (at != b.end()) std::copy(to.begin(), to.end(), at);
    const std::string out = testing::TempDir() + "/rope_" + to + ".gguf";
    micromix::test::write_bytes(out, b);
    return out;
  };
  auto refused = [](const std::string& file, const std::string& says) {
    try {
      load_model(file);
      ADD_FAILURE() << file << " loaded";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
    std::filesystem::remove(file);
  };
  refused(renamed("tokenizer.chat_template", "llama.rope.scaling.type"), "rope scaling");
  refused(renamed("token_embd.weight", "rope_freqs.weight"), "rope_freqs.weight");
  const std::string unrelated = renamed("tokenizer.chat_template", "tokenizer.chat_templatX");
  EXPECT_NO_THROW(load_model(unrelated));
  std::filesystem::remove(unrelated);
}

// ------------------------------------------------------------------------------
// Malformed input.

TEST(GgufMalformed, EveryTruncation) {
  const auto bytes = read_bytes(small_path());
  const GgufFile full = parse(bytes);
  uint64_t needed = 0;
  for (const auto& t : full.tensors()) needed = std::max(needed, full.data_offset() + t.offset + t.nbytes);
  int errors = 0;
  for (size_t n = 0; n < bytes.size(); ++n) {
    std::vector<uint8_t> prefix(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    if (n < needed) {
      EXPECT_THROW(GgufFile::parse(prefix.data(), prefix.size()), FormatError) << "prefix " << n;
      ++errors;
    } else {
      EXPECT_NO_THROW(GgufFile::parse(prefix.data(), prefix.size())) << "prefix " << n;
    }
  }
  EXPECT_GT(errors, 12000);
}

TEST(GgufMalformed, Crafted) {
  // A valid minimal file to start from.
  {
    Builder ok;
    ok.header(1, 1).kv_u32("general.alignment", 32).tensor("t", {32}, 0, 0).pad().zeros(128);
    const GgufFile f = parse(ok.b);
    EXPECT_EQ(f.tensors().at(0).elements, 32);
  }
  expect_format_error({}, "bad magic");
  expect_format_error({'G', 'G', 'U'}, "bad magic");
  expect_format_error({'G', 'G', 'U', 'X', 3, 0, 0, 0}, "bad magic");
  expect_format_error(Builder().header(0, 0, 1).b, "version 1");
  expect_format_error(Builder().header(0, 0, 4).b, "unsupported GGUF version 4");
  expect_format_error(Builder().header(0, 0, 0x03000000).b, "byte-swapped");
  expect_format_error({'G', 'G', 'U', 'F', 3, 0}, "file ends inside version");
  expect_format_error(Builder().header(~0ull, 0).b, "tensor count");
  expect_format_error(Builder().header(1ull << 40, 0).b, "tensor count");
  expect_format_error(Builder().header(0, 1ull << 62).b, "metadata count");
  // Huge string length in a key and in a value.
  expect_format_error(Builder().header(0, 1).put<uint64_t>(~0ull).zeros(16).b, "metadata key has length");
  expect_format_error(Builder().header(0, 1).str("k").put<uint32_t>(8).put<uint64_t>(1ull << 60).b,
                      "metadata string has length");
  // Unknown value types, arrays too long or too deep, bad bools.
  expect_format_error(Builder().header(0, 1).str("k").put<uint32_t>(13).put<uint32_t>(0).b, "unknown value type 13");
  expect_format_error(Builder().header(0, 1).str("k").put<uint32_t>(9).put<uint32_t>(77).put<uint64_t>(1).b,
                      "unknown array element type 77");
  expect_format_error(
      Builder().header(0, 1).str("k").put<uint32_t>(9).put<uint32_t>(10).put<uint64_t>(1ull << 61).zeros(64).b,
      "cannot fit");
  {
    Builder deep;
    deep.header(0, 1).str("k").put<uint32_t>(9);
    for (int i = 0; i < 40; ++i) deep.put<uint32_t>(9).put<uint64_t>(1);
    deep.zeros(64);
    expect_format_error(deep.b, "nested deeper");
  }
  expect_format_error(Builder().header(0, 1).str("k").put<uint32_t>(7).put<uint8_t>(2).b, "neither 0 nor 1");
  expect_format_error(Builder().header(0, 2).kv_u32("a", 1).kv_u32("a", 2).b, "duplicate metadata key 'a'");
  // Alignment.
  expect_format_error(Builder().header(0, 1).kv_u32("general.alignment", 3).b, "not a power of two");
  expect_format_error(Builder().header(0, 1).kv_u32("general.alignment", 0).b, "not a power of two");
  expect_format_error(Builder().header(0, 1).str("general.alignment").put<uint32_t>(8).str("32").b,
                      "must be an integer");
  // Tensor table.
  expect_format_error(Builder().header(1, 0).tensor("t", {32}, 0, 4096).pad().zeros(128).b,
                      "extends past the end");
  expect_format_error(Builder().header(1, 0).tensor("t", {32}, 0, ~0ull & ~31ull).pad().zeros(128).b,
                      "extends past the end");
  expect_format_error(Builder().header(1, 0).tensor("t", {32}, 0, 4).pad().zeros(256).b, "not a multiple of the alignment");
  expect_format_error(Builder().header(1, 0).tensor("t", {32}, 4, 0).pad().zeros(256).b, "unknown ggml type 4");
  expect_format_error(Builder().header(1, 0).tensor("t", {32}, 1000, 0).pad().zeros(256).b, "unknown ggml type 1000");
  expect_format_error(Builder().header(1, 0).tensor("t", {1ll << 32, 1ll << 32}, 0, 0).pad().zeros(256).b,
                      "element count overflows");
  expect_format_error(Builder().header(1, 0).tensor("t", {1ll << 31, 1ll << 31, 4}, 0, 0).pad().zeros(256).b,
                      "element count overflows");
  expect_format_error(Builder().header(1, 0).tensor("t", {1ll << 61}, 0, 0).pad().zeros(256).b,
                      "extends past the end");  // 2^63 bytes
  expect_format_error(Builder().header(1, 0).tensor("t", {(1ll << 62) + 32}, 8, 0).pad().zeros(256).b,
                      "extends past the end");
  expect_format_error(Builder().header(1, 0).tensor("t", {-1}, 0, 0).pad().zeros(256).b, "negative dimension");
  expect_format_error(Builder().header(1, 0).tensor("t", {1, 1, 1, 1, 1}, 0, 0).pad().zeros(256).b,
                      "5 dimensions");
  expect_format_error(Builder().header(1, 0).tensor("t", {33}, 2, 0).pad().zeros(256).b, "not a multiple of the Q4_0");
  expect_format_error(Builder().header(2, 0).tensor("t", {32}, 0, 0).tensor("t", {32}, 0, 128).pad().zeros(512).b,
                      "duplicate tensor name 't'");
  expect_format_error(Builder().header(2, 0).tensor("a", {64}, 0, 0).tensor("b", {32}, 0, 128).pad().zeros(512).b,
                      "overlap");
  // Data section missing entirely.
  expect_format_error(Builder().header(1, 0).tensor("t", {32}, 0, 0).b, "past the end of the file");
  // A file with no tensors needs no data section.
  EXPECT_NO_THROW(parse(Builder().header(0, 1).kv_u32("x", 1).b));
  // A zero-element tensor is fine.
  EXPECT_NO_THROW(parse(Builder().header(1, 0).tensor("t", {0, 5}, 2, 0).pad().b));
}

TEST(GgufMalformed, OpenErrors) {
  EXPECT_THROW(GgufFile::open("/nonexistent/micromix.gguf"), std::runtime_error);
  const std::string empty = (std::filesystem::temp_directory_path() / "micromix_empty.gguf").string();
  micromix::test::write_bytes(empty, {});
  EXPECT_THROW(GgufFile::open(empty), FormatError);
  std::filesystem::remove(empty);
}

TEST(GgufFuzz, MutatedSmallFile) {
  const auto seed_bytes = read_bytes(small_path());
  const GgufFile seed = parse(seed_bytes);
  const size_t hot = static_cast<size_t>(seed.data_offset());  // metadata and tensor table
  const int64_t iterations = micromix::test::env_int("MICROMIX_FUZZ_ITERATIONS", 20000);
  std::mt19937_64 rng(static_cast<uint64_t>(micromix::test::env_int("MICROMIX_FUZZ_SEED", 12345)));
  int64_t ok = 0, rejected = 0;
  std::vector<float> out;
  for (int64_t it = 0; it < iterations; ++it) {
    const std::vector<uint8_t> b = micromix::test::mutate(seed_bytes, rng, hot);
    try {
      const GgufFile f = GgufFile::parse(b.data(), b.size(), "fuzz.gguf");
      for (const auto& [k, v] : f.metadata()) (void)describe_value(v);
      for (const auto& t : f.tensors()) {
        if (!ggml_type_info(static_cast<uint32_t>(t.type))->can_dequantize || t.elements > (1 << 22)) continue;
        out.resize(static_cast<size_t>(t.elements));
        f.dequantize(t, out.data());
      }
      ++ok;
    } catch (const FormatError& e) {
      ++rejected;
      ASSERT_NE(std::string(e.what()).find("fuzz.gguf"), std::string::npos) << e.what();
    }
  }
  std::printf("gguf fuzz: %lld executions, %lld parsed, %lld rejected with FormatError\n",
              static_cast<long long>(iterations), static_cast<long long>(ok), static_cast<long long>(rejected));
  EXPECT_EQ(ok + rejected, iterations);
  EXPECT_GT(ok, 0);
  EXPECT_GT(rejected, 0);
}

// ------------------------------------------------------------------------------
// `micromix inspect` on GGUF files.

namespace {
std::string run_command(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  *rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}
}  // namespace

TEST(Inspect, SmallGguf) {
  int rc = -1;
  const std::string text = run_command(std::string(MICROMIX_BINARY) + " inspect " + small_path(), &rc);
  EXPECT_EQ(rc, 0);
  EXPECT_NE(text.find("GGUF v3, alignment 64"), std::string::npos) << text;
  EXPECT_NE(text.find("micromix-test"), std::string::npos);
  EXPECT_NE(text.find("[-5, 6, 7] (3 x int32)"), std::string::npos);
  EXPECT_NE(text.find("raw_q6_k"), std::string::npos);
  EXPECT_NE(text.find("totals: 19 tensors"), std::string::npos);
  const json j = json::parse(run_command(std::string(MICROMIX_BINARY) + " inspect --json " + small_path(), &rc));
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(j["format"], "gguf");
  EXPECT_EQ(j["alignment"], 64);
  EXPECT_EQ(j["metadata"].size(), 31u);
  EXPECT_EQ(j["tensors"].size(), 19u);
  EXPECT_EQ(j["totals"]["tensors"], 19);
  bool saw_nested = false;
  for (const auto& m : j["metadata"])
    if (m["key"] == "test.array.nested") {
      saw_nested = true;
      EXPECT_EQ(m["value"], json::parse("[[1,2],[3],[4,5,6]]"));
    }
  EXPECT_TRUE(saw_nested);
}

TEST(Inspect, ModelHyperParameters) {
  const std::string path = model_path();
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "model not found at " << path;
  int rc = -1;
  const json j = json::parse(run_command(std::string(MICROMIX_BINARY) + " inspect --json '" + path + "'", &rc));
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(j["architecture"], "llama");
  const auto& hp = j["hyperparameters"];
  EXPECT_EQ(hp["block_count"], 30);
  EXPECT_EQ(hp["embedding_length"], 576);
  EXPECT_EQ(hp["feed_forward_length"], 1536);
  EXPECT_EQ(hp["head_count"], 9);
  EXPECT_EQ(hp["head_count_kv"], 3);
  EXPECT_EQ(hp["context_length"], 8192);
  EXPECT_EQ(hp["rope_freq_base"], 100000.0);
  EXPECT_EQ(hp["vocab_size"], 49152);
  EXPECT_EQ(j["tensors"].size(), 272u);
}
