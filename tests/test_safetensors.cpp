// safetensors: writer/reader round trip, crafted malformed headers, a bounded
// mutation fuzz run and `micromix inspect` on a safetensors checkpoint.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "gguf_test_util.h"
#include "micromix/model/gguf.h"
#include "micromix/model/safetensors.h"

using namespace micromix;
using namespace micromix::model;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "micromix_st_XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

uint16_t f32_to_bf16_trunc(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

// Builds a file image from a header string and a data section.
std::vector<uint8_t> image(const std::string& header, size_t data_bytes, uint64_t length_override = 0) {
  std::vector<uint8_t> b(8);
  const uint64_t len = length_override ? length_override : header.size();
  std::memcpy(b.data(), &len, 8);
  b.insert(b.end(), header.begin(), header.end());
  b.resize(b.size() + data_bytes, 0);
  return b;
}

void expect_error(const std::vector<uint8_t>& b, const std::string& fragment) {
  try {
    SafetensorsFile::parse(b.data(), b.size(), "crafted.safetensors");
    ADD_FAILURE() << "parsed without error; expected '" << fragment << "'";
  } catch (const FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("crafted.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find(fragment), std::string::npos) << "message: " << msg;
  }
}

std::vector<uint8_t> small_checkpoint(const TempDir& dir) {
  std::vector<float> w(6 * 8);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(i) * 0.25f - 3.0f;
  std::vector<uint16_t> h(16);
  for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<uint16_t>(0x3C00 + i * 64);
  std::vector<int8_t> q(32);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<int8_t>(i * 7 - 100);
  const std::string path = dir.file("fuzz_seed.safetensors");
  write_safetensors(path,
                    {{"a.weight", "F32", {6, 8}, w.data(), w.size() * 4},
                     {"b.weight", "F16", {4, 4}, h.data(), h.size() * 2},
                     {"c.codes", "I8", {32}, q.data(), q.size()}},
                    {{"format", "pt"}});
  return micromix::test::read_bytes(path);
}

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

TEST(Safetensors, RoundTrip) {
  TempDir dir;
  std::vector<float> f32(3 * 5);
  for (size_t i = 0; i < f32.size(); ++i) f32[i] = std::sin(static_cast<float>(i)) * 100.0f;
  std::vector<uint16_t> bf16(f32.size()), f16 = {0x3C00, 0xC000, 0x0001, 0x7BFF, 0x8000, 0x3555};
  for (size_t i = 0; i < f32.size(); ++i) bf16[i] = f32_to_bf16_trunc(f32[i]);
  std::vector<uint8_t> u8 = {0, 1, 2, 255, 128, 7, 9};
  std::vector<int32_t> i32 = {-5, 0, 2147483647};
  std::vector<int64_t> i64 = {-9000000000000, 42};
  std::vector<int8_t> i8 = {-128, 127};
  const std::string path = dir.file("model.safetensors");
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"micromix.scheme", "mxfp4/mxfp6/mxfp8"}};
  write_safetensors(path,
                    {{"w.f32", "F32", {3, 5}, f32.data(), f32.size() * 4},
                     {"w.bf16", "BF16", {3, 5}, bf16.data(), bf16.size() * 2},
                     {"w.f16", "F16", {6}, f16.data(), f16.size() * 2},
                     {"codes.u8", "U8", {7}, u8.data(), u8.size()},
                     {"idx.i32", "I32", {3}, i32.data(), i32.size() * 4},
                     {"idx.i64", "I64", {2}, i64.data(), i64.size() * 8},
                     {"s.i8", "I8", {1, 2}, i8.data(), i8.size()},
                     {"empty", "F32", {0, 4}, nullptr, 0},
                     {"scalar", "F32", {}, f32.data(), 4}},
                    meta);
  // Only the target is left in the directory (no temporary file).
  size_t entries = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) {
    ++entries;
    EXPECT_EQ(e.path().filename(), "model.safetensors");
  }
  EXPECT_EQ(entries, 1u);

  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.data_offset() % 8, 0u);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.tensors().size(), 9u);
  EXPECT_EQ(f.tensors()[0].name, "w.f32");  // header order kept
  const auto& tf = f.tensor("w.f32");
  EXPECT_EQ(tf.dtype, StDtype::F32);
  EXPECT_EQ(tf.shape, (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(tf.elements, 15);
  EXPECT_EQ(f.to_float(tf), f32);
  EXPECT_EQ(std::memcmp(tf.data, f32.data(), 60), 0);
  const auto bf = f.to_float(f.tensor("w.bf16"));
  for (size_t i = 0; i < f32.size(); ++i) EXPECT_EQ(bf[i], bf16_to_fp32(bf16[i]));
  const auto hf = f.to_float(f.tensor("w.f16"));
  EXPECT_EQ(hf, (std::vector<float>{1.0f, -2.0f, std::ldexp(1.0f, -24), 65504.0f, -0.0f, fp16_to_fp32(0x3555)}));
  EXPECT_EQ(f.to_float(f.tensor("codes.u8")), (std::vector<float>{0, 1, 2, 255, 128, 7, 9}));
  EXPECT_EQ(f.to_float(f.tensor("idx.i32")), (std::vector<float>{-5, 0, 2147483647.0f}));
  EXPECT_EQ(f.to_float(f.tensor("idx.i64")), (std::vector<float>{-9000000000000.0f, 42}));
  EXPECT_EQ(f.to_float(f.tensor("s.i8")), (std::vector<float>{-128, 127}));
  EXPECT_EQ(f.tensor("empty").elements, 0);
  EXPECT_EQ(f.tensor("scalar").elements, 1);
  EXPECT_EQ(f.find_tensor("nope"), nullptr);
  EXPECT_THROW(f.tensor("nope"), FormatError);

  // Overwriting replaces the file atomically with the new content.
  write_safetensors(path, {{"only", "U8", {2}, u8.data(), 2}});
  const SafetensorsFile g = SafetensorsFile::open(path);
  ASSERT_EQ(g.tensors().size(), 1u);
  EXPECT_TRUE(g.metadata().empty());
  EXPECT_EQ(g.to_float(g.tensor("only")), (std::vector<float>{0, 1}));
}

TEST(Safetensors, WriterRejectsBadInput) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  float x[4] = {};
  EXPECT_THROW(write_safetensors(path, {{"a", "F32", {3}, x, 16}}), std::invalid_argument);  // size mismatch
  EXPECT_THROW(write_safetensors(path, {{"a", "Q4", {4}, x, 16}}), std::invalid_argument);   // dtype
  EXPECT_THROW(write_safetensors(path, {{"a", "F32", {4}, x, 16}, {"a", "F32", {4}, x, 16}}), std::invalid_argument);
  EXPECT_THROW(write_safetensors(path, {{"__metadata__", "F32", {4}, x, 16}}), std::invalid_argument);
  EXPECT_THROW(write_safetensors(path, {{"a", "F32", {-4}, x, 16}}), std::invalid_argument);
  EXPECT_THROW(write_safetensors(path, {{"a", "F32", {1ll << 62, 1ll << 62}, x, 16}}), std::invalid_argument);
  EXPECT_THROW(write_safetensors(dir.file("missing/dir/x.safetensors"), {}), std::runtime_error);
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::is_empty(dir.path));
}

TEST(Safetensors, CraftedHeaders) {
  const std::string ok = R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  EXPECT_NO_THROW(SafetensorsFile::parse(image(ok, 16).data(), image(ok, 16).size()));
  expect_error({}, "too short");
  expect_error({1, 0, 0}, "too short");
  expect_error(image(ok, 16, 1000), "exceeds");
  expect_error(image(ok, 16, ~0ull), "exceeds");
  expect_error(image(ok, 16, ~0ull - 7), "exceeds");  // 8 + length wraps around
  expect_error(image("[1,2]", 0), "not a JSON object");
  expect_error(image("{\"t\": ", 0), "not valid JSON");
  expect_error(image("{\"t\": {]}", 0), "not valid JSON");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", 8), "past the");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[16,0]}})", 16), "reversed");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 16), "do not match");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,18446744073709551615]}})", 16),
               "past the");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,-16]}})", 16), "non-negative");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0]}})", 16), "two integers");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16,32]}})", 32), "two integers");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[2.5,2],"data_offsets":[0,16]}})", 16), "non-negative integers");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[-2,2],"data_offsets":[0,16]}})", 16), "non-negative integers");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,16]}})", 16),
               "overflows");
  expect_error(image(R"({"t":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,16]}})", 16),
               "do not match");  // 2^62 elements * 4 bytes wraps
  expect_error(image(R"({"t":{"dtype":"F33","shape":[2,2],"data_offsets":[0,16]}})", 16), "unknown dtype");
  expect_error(image(R"({"t":{"shape":[2,2],"data_offsets":[0,16]}})", 16), "dtype");
  expect_error(image(R"({"t":{"dtype":"F32","data_offsets":[0,16]}})", 16), "shape");
  expect_error(image(R"({"t":[1,2]})", 16), "not an object");
  expect_error(image(R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                     R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                     16),
               "overlap");
  expect_error(image(R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                     R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})",
                     16),
               "duplicate key 'a'");
  expect_error(image(R"({"__metadata__":{"k":1}})", 0), "not a string");
  expect_error(image(R"({"__metadata__":[1]})", 0), "__metadata__ is not an object");
  // Zero-sized tensors may share an offset; metadata-only files are fine.
  EXPECT_NO_THROW(SafetensorsFile::parse(
      image(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})",
            0)
          .data(),
      image(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})",
            0)
          .size()));
  // Unconvertible dtypes parse but refuse to_float.
  const auto b8 = image(R"({"m":{"dtype":"BOOL","shape":[4],"data_offsets":[0,4]}})", 4);
  const auto f = SafetensorsFile::parse(b8.data(), b8.size(), "crafted.safetensors");
  EXPECT_THROW(f.to_float(f.tensor("m")), FormatError);
  EXPECT_THROW(SafetensorsFile::open("/nonexistent/x.safetensors"), std::runtime_error);
}

TEST(Safetensors, FuzzMutatedFile) {
  TempDir dir;
  const std::vector<uint8_t> seed = small_checkpoint(dir);
  uint64_t header_len;
  std::memcpy(&header_len, seed.data(), 8);
  const std::string header(seed.begin() + 8, seed.begin() + 8 + static_cast<std::ptrdiff_t>(header_len));
  const int64_t iterations = micromix::test::env_int("MICROMIX_FUZZ_ITERATIONS", 20000);
  std::mt19937_64 rng(static_cast<uint64_t>(micromix::test::env_int("MICROMIX_FUZZ_SEED", 4242)));
  int64_t ok = 0, rejected = 0;
  const char digits[] = "0123456789";
  for (int64_t it = 0; it < iterations; ++it) {
    std::vector<uint8_t> b;
    if (it % 2 == 0) {
      // Byte-level mutation, concentrated on the length and the JSON header.
      b = micromix::test::mutate(seed, rng, 8 + header_len);
    } else {
      // Structure-aware mutation: rewrite numbers inside the JSON (shapes, offsets)
      // and re-frame the header so that the parser gets past the length check.
      std::string h = header;
      const int edits = 1 + static_cast<int>(rng() % 3);
      for (int e = 0; e < edits; ++e) {
        std::vector<size_t> pos;
        for (size_t i = 0; i < h.size(); ++i)
          if (h[i] >= '0' && h[i] <= '9') pos.push_back(i);
        if (pos.empty()) break;
        const size_t p = pos[rng() % pos.size()];
        switch (rng() % 4) {
          case 0: h[p] = digits[rng() % 10]; break;
          case 1: h.insert(p, 1, digits[rng() % 10]); break;
          case 2: h.insert(p, std::to_string(rng())); break;
          case 3: h.insert(p, "-"); break;
        }
      }
      b = image(h, seed.size() - 8 - header_len);
      std::memcpy(b.data() + 8 + h.size(), seed.data() + 8 + header_len, seed.size() - 8 - header_len);
    }
    try {
      const auto f = SafetensorsFile::parse(b.data(), b.size(), "fuzz.safetensors");
      for (const auto& t : f.tensors())
        if (st_dtype_converts_to_float(t.dtype) && t.elements < (1 << 22)) (void)f.to_float(t);
      ++ok;
    } catch (const FormatError& e) {
      ++rejected;
      ASSERT_NE(std::string(e.what()).find("fuzz.safetensors"), std::string::npos) << e.what();
    }
  }
  std::printf("safetensors fuzz: %lld executions, %lld parsed, %lld rejected with FormatError\n",
              static_cast<long long>(iterations), static_cast<long long>(ok), static_cast<long long>(rejected));
  EXPECT_EQ(ok + rejected, iterations);
  EXPECT_GT(ok, 0);
  EXPECT_GT(rejected, 0);
}

TEST(Inspect, SafetensorsWithConfig) {
  TempDir dir;
  small_checkpoint(dir);
  {
    std::ofstream cfg(dir.file("config.json"));
    cfg << R"({"model_type":"llama","architectures":["LlamaForCausalLM"],"num_hidden_layers":30,)"
           R"("hidden_size":576,"intermediate_size":1536,"num_attention_heads":9,"num_key_value_heads":3,)"
           R"("rope_theta":100000.0,"rms_norm_eps":1e-05,"vocab_size":49152,"unrelated":1})";
  }
  int rc = -1;
  const std::string file = dir.file("fuzz_seed.safetensors");
  const std::string text = run_command(std::string(MICROMIX_BINARY) + " inspect " + file, &rc);
  EXPECT_EQ(rc, 0);
  EXPECT_NE(text.find("safetensors"), std::string::npos) << text;
  EXPECT_NE(text.find("num_hidden_layers"), std::string::npos) << text;
  EXPECT_NE(text.find("a.weight"), std::string::npos) << text;
  EXPECT_NE(text.find("totals: 3 tensors"), std::string::npos) << text;
  const json j = json::parse(run_command(std::string(MICROMIX_BINARY) + " inspect --json " + file, &rc));
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(j["format"], "safetensors");
  EXPECT_EQ(j["hyperparameters"]["hidden_size"], 576);
  EXPECT_FALSE(j["hyperparameters"].contains("unrelated"));
  EXPECT_EQ(j["metadata"]["format"], "pt");
  ASSERT_EQ(j["tensors"].size(), 3u);
  EXPECT_EQ(j["tensors"][1]["name"], "b.weight");
  EXPECT_EQ(j["tensors"][1]["dtype"], "F16");
  EXPECT_EQ(j["tensors"][1]["shape"], json({4, 4}));
  EXPECT_EQ(j["totals"]["bytes"], 6 * 8 * 4 + 16 * 2 + 32);
  // A file in neither format is refused.
  micromix::test::write_bytes(dir.file("junk.bin"), {'n', 'o', 'p', 'e'});
  run_command(std::string(MICROMIX_BINARY) + " inspect " + dir.file("junk.bin") + " 2>/dev/null", &rc);
  EXPECT_EQ(rc, 1);
}
