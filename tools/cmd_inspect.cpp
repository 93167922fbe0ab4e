// `micromix inspect FILE`: architecture, hyper-parameters, metadata and the tensor
// table of a GGUF or safetensors model file, as text or JSON.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cli.h"
#include "micromix/model/gguf.h"
#include "micromix/model/safetensors.h"

using namespace micromix::cli;
using namespace micromix::model;
using nlohmann::ordered_json;

namespace {

std::string join_dims(const std::vector<int64_t>& dims) {
  std::string s;
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? " x " : "") + std::to_string(dims[i]);
  return dims.empty() ? "scalar" : s;
}

std::string human_bytes(uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.2f %s" : "%.0f %s", v, units[u]);
  return buf;
}


// ---- GGUF -------------------------------------------------------------------------

ordered_json value_json(const GgufValue& v, bool full_arrays, size_t max_items = 16) {
  if (const auto* u = std::get_if<uint64_t>(&v.value)) return *u;
  if (const auto* i = std::get_if<int64_t>(&v.value)) return *i;
  if (const auto* d = std::get_if<double>(&v.value)) return *d;
  if (const auto* b = std::get_if<bool>(&v.value)) return *b;
  if (const auto* s = std::get_if<std::string>(&v.value)) return *s;
  const auto& arr = std::get<GgufArray>(v.value);
  ordered_json items = ordered_json::array();
  const size_t n = full_arrays ? arr.size() : std::min(arr.size(), max_items);
  for (size_t i = 0; i < n; ++i) items.push_back(value_json(arr[i], full_arrays, max_items));
  if (full_arrays || arr.size() <= max_items) return items;
  return ordered_json{{"length", arr.size()}, {"element_type", gguf_value_type_name(v.element_type)},
                      {"head", std::move(items)}};
}

struct Hyper {
  std::string label;
  std::string key;
};

int inspect_gguf(const std::string& path, bool json_out, bool full_arrays) {
  const GgufFile f = GgufFile::open(path);
  const std::string arch = f.find_string("general.architecture").value_or("");
  const std::vector<Hyper> hyper = {
      {"block_count", arch + ".block_count"},
      {"embedding_length", arch + ".embedding_length"},
      {"feed_forward_length", arch + ".feed_forward_length"},
      {"head_count", arch + ".attention.head_count"},
      {"head_count_kv", arch + ".attention.head_count_kv"},
      {"context_length", arch + ".context_length"},
      {"rope_freq_base", arch + ".rope.freq_base"},
      {"rms_norm_epsilon", arch + ".attention.layer_norm_rms_epsilon"},
  };
  ordered_json hp = ordered_json::object();
  for (const auto& h : hyper)
    if (const GgufValue* v = f.find(h.key); v && !std::holds_alternative<GgufArray>(v->value))
      hp[h.label] = value_json(*v, false);
  if (const GgufValue* tokens = f.find("tokenizer.ggml.tokens"))
    if (const auto* arr = std::get_if<GgufArray>(&tokens->value)) hp["vocab_size"] = arr->size();

  uint64_t total_bytes = 0;
  int64_t total_elements = 0;
  std::map<std::string, std::pair<int64_t, uint64_t>> by_type;  // count, bytes
  for (const auto& t : f.tensors()) {
    total_bytes += t.nbytes;
    total_elements += t.elements;
    auto& bt = by_type[ggml_type_name(t.type)];
    ++bt.first;
    bt.second += t.nbytes;
  }

  if (json_out) {
    ordered_json j;
    j["format"] = "gguf";
    j["path"] = path;
    j["version"] = f.version();
    j["alignment"] = f.alignment();
    j["data_offset"] = f.data_offset();
    j["file_size"] = f.file_size();
    j["architecture"] = arch;
    j["name"] = f.find_string("general.name").value_or("");
    j["hyperparameters"] = hp;
    ordered_json meta = ordered_json::array();
    for (const auto& [k, v] : f.metadata()) {
      ordered_json m{{"key", k}, {"type", gguf_value_type_name(v.type)}};
      if (v.type == GgufValueType::ARRAY) {
        m["element_type"] = gguf_value_type_name(v.element_type);
        m["length"] = std::get<GgufArray>(v.value).size();
      }
      m["value"] = value_json(v, full_arrays);
      meta.push_back(std::move(m));
    }
    j["metadata"] = std::move(meta);
    ordered_json tensors = ordered_json::array();
    for (const auto& t : f.tensors())
      tensors.push_back({{"name", t.name}, {"type", ggml_type_name(t.type)}, {"dims", t.dims},
                         {"elements", t.elements}, {"bytes", t.nbytes}, {"offset", f.data_offset() + t.offset}});
    j["tensors"] = std::move(tensors);
    ordered_json types = ordered_json::object();
    for (const auto& [name, cb] : by_type) types[name] = {{"tensors", cb.first}, {"bytes", cb.second}};
    j["totals"] = {{"tensors", f.tensors().size()}, {"elements", total_elements}, {"bytes", total_bytes},
                   {"by_type", types}};
    std::puts(micromix::json_text(j).c_str());
    return 0;
  }

  std::printf("file:         %s\n", path.c_str());
  std::printf("format:       GGUF v%u, alignment %llu, data section at byte %llu, %s\n", f.version(),
              static_cast<unsigned long long>(f.alignment()), static_cast<unsigned long long>(f.data_offset()),
              human_bytes(f.file_size()).c_str());
  std::printf("architecture: %s\n", arch.empty() ? "(none)" : arch.c_str());
  if (auto name = f.find_string("general.name")) std::printf("name:         %s\n", name->c_str());
  std::printf("\nhyper-parameters:\n");
  for (const auto& h : hyper)
    if (hp.contains(h.label))
      std::printf("  %-20s %-16s (%s)\n", h.label.c_str(), describe_value(*f.find(h.key)).c_str(), h.key.c_str());
  if (hp.contains("vocab_size"))
    std::printf("  %-20s %-16s (tokenizer.ggml.tokens)\n", "vocab_size", hp["vocab_size"].dump().c_str());
  std::printf("\nmetadata (%zu keys):\n", f.metadata().size());
  for (const auto& [k, v] : f.metadata()) {
    std::string type = gguf_value_type_name(v.type);
    std::printf("  %-44s %-8s %s\n", k.c_str(), type.c_str(), describe_value(v).c_str());
  }
  std::printf("\ntensors (%zu):\n", f.tensors().size());
  std::printf("  %-40s %-6s %-22s %14s\n", "name", "type", "dims", "bytes");
  for (const auto& t : f.tensors())
    std::printf("  %-40s %-6s %-22s %14llu\n", t.name.c_str(), ggml_type_name(t.type).c_str(),
                join_dims(t.dims).c_str(), static_cast<unsigned long long>(t.nbytes));
  std::printf("\ntotals: %zu tensors, %lld elements, %llu bytes (%s)\n", f.tensors().size(),
              static_cast<long long>(total_elements), static_cast<unsigned long long>(total_bytes),
              human_bytes(total_bytes).c_str());
  for (const auto& [name, cb] : by_type)
    std::printf("  %-6s %5lld tensors %14llu bytes\n", name.c_str(), static_cast<long long>(cb.first),
                static_cast<unsigned long long>(cb.second));
  return 0;
}

// ---- safetensors --------------------------------------------------------------------

// Hyper-parameters from a Hugging Face config.json next to the weights.
ordered_json config_hyper(const std::string& weights_path, std::string* config_path) {
  namespace fs = std::filesystem;
  const fs::path cfg = fs::path(weights_path).parent_path() / "config.json";
  ordered_json out = ordered_json::object();
  if (!fs::exists(cfg)) return out;
  *config_path = cfg.string();
  std::ifstream in(cfg);
  ordered_json c;
  try {
    c = ordered_json::parse(in);
  } catch (const ordered_json::exception& e) {
    throw micromix::FormatError(cfg.string() + ": not valid JSON: " + e.what());
  }
  if (!c.is_object()) throw micromix::FormatError(cfg.string() + ": not a JSON object");
  for (const char* k : {"model_type", "architectures", "num_hidden_layers", "hidden_size", "intermediate_size",
                        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                        "rope_theta", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "torch_dtype"})
    if (c.contains(k)) out[k] = c[k];
  return out;
}

int inspect_safetensors(const std::string& path, bool json_out) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  std::string config_path;
  const ordered_json hp = config_hyper(path, &config_path);
  uint64_t total_bytes = 0;
  int64_t total_elements = 0;
  std::map<std::string, std::pair<int64_t, uint64_t>> by_dtype;
  for (const auto& t : f.tensors()) {
    total_bytes += t.nbytes();
    total_elements += t.elements;
    auto& bd = by_dtype[st_dtype_name(t.dtype)];
    ++bd.first;
    bd.second += t.nbytes();
  }
  if (json_out) {
    ordered_json j;
    j["format"] = "safetensors";
    j["path"] = path;
    j["header_size"] = f.header_size();
    j["data_offset"] = f.data_offset();
    j["file_size"] = f.file_size();
    if (!config_path.empty()) j["config"] = config_path;
    j["hyperparameters"] = hp;
    j["metadata"] = f.metadata();
    ordered_json tensors = ordered_json::array();
    for (const auto& t : f.tensors())
      tensors.push_back({{"name", t.name}, {"dtype", st_dtype_name(t.dtype)}, {"shape", t.shape},
                         {"elements", t.elements}, {"bytes", t.nbytes()}, {"offset", f.data_offset() + t.begin}});
    j["tensors"] = std::move(tensors);
    ordered_json types = ordered_json::object();
    for (const auto& [name, cb] : by_dtype) types[name] = {{"tensors", cb.first}, {"bytes", cb.second}};
    j["totals"] = {{"tensors", f.tensors().size()}, {"elements", total_elements}, {"bytes", total_bytes},
                   {"by_dtype", types}};
    std::puts(micromix::json_text(j).c_str());
    return 0;
  }
  std::printf("file:         %s\n", path.c_str());
  std::printf("format:       safetensors, header %llu bytes, %s\n", static_cast<unsigned long long>(f.header_size()),
              human_bytes(f.file_size()).c_str());
  if (!config_path.empty()) {
    std::printf("\nhyper-parameters (%s):\n", config_path.c_str());
    for (auto it = hp.begin(); it != hp.end(); ++it)
      std::printf("  %-24s %s\n", it.key().c_str(), micromix::json_text(it.value(), -1).c_str());
  }
  std::printf("\nmetadata (%zu keys):\n", f.metadata().size());
  for (const auto& [k, v] : f.metadata()) std::printf("  %-32s %s\n", k.c_str(), v.c_str());
  std::printf("\ntensors (%zu):\n", f.tensors().size());
  std::printf("  %-48s %-6s %-22s %14s\n", "name", "dtype", "shape", "bytes");
  for (const auto& t : f.tensors())
    std::printf("  %-48s %-6s %-22s %14llu\n", t.name.c_str(), st_dtype_name(t.dtype), join_dims(t.shape).c_str(),
                static_cast<unsigned long long>(t.nbytes()));
  std::printf("\ntotals: %zu tensors, %lld elements, %llu bytes (%s)\n", f.tensors().size(),
              static_cast<long long>(total_elements), static_cast<unsigned long long>(total_bytes),
              human_bytes(total_bytes).c_str());
  for (const auto& [name, cb] : by_dtype)
    std::printf("  %-6s %5lld tensors %14llu bytes\n", name.c_str(), static_cast<long long>(cb.first),
                static_cast<unsigned long long>(cb.second));
  return 0;
}

int run_inspect(const ParsedArgs& args) {
  if (args.positional.size() != 1) throw UsageError("expected one FILE");
  const std::string path = args.positional[0];
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  unsigned char head[9] = {};
  in.read(reinterpret_cast<char*>(head), sizeof head);
  const auto got = static_cast<size_t>(in.gcount());
  if (got >= 4 && std::memcmp(head, "GGUF", 4) == 0) return inspect_gguf(path, args.flag("json"), args.flag("full-arrays"));
  if (got == 9 && head[8] == '{') return inspect_safetensors(path, args.flag("json"));
  throw micromix::FormatError(path + ": not a GGUF or safetensors file (unrecognised magic)");
}

const RegisterCommand register_inspect({
    "inspect",
    "show the architecture, metadata and tensors of a GGUF or safetensors file",
    "[--json] [--full-arrays] FILE",
    "The format is detected from the file's first bytes. For GGUF the hyper-parameters come\n"
    "from the <architecture>.* metadata keys; for safetensors from a config.json in the same\n"
    "directory, when there is one. Metadata arrays are abbreviated unless --full-arrays.",
    {{"json", "", "", "print everything as one JSON object"},
     {"full-arrays", "", "", "print metadata arrays in full (JSON output)"}},
    run_inspect,
});

}  // namespace
