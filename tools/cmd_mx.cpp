// `micromix mx quantize|dequantize` (the byte-level contract of the formats
// library) and `micromix formats` (constants and measured round-trip error).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cli.h"
#include "micromix/mx/tensor.h"

namespace mx = micromix::mx;
using namespace micromix::cli;

namespace {

mx::ElemFormat format_arg(const ParsedArgs& args) {
  auto f = mx::parse_elem_format(args.str("format"));
  if (!f) throw UsageError("unknown --format '" + args.str("format") + "' (e2m1, e3m2, e2m3, e4m3, e5m2, int8)");
  return *f;
}

int mx_quantize(const ParsedArgs& args) {
  const mx::ElemFormat format = format_arg(args);
  const auto rule = mx::parse_scale_rule(args.str("rule"));
  if (!rule) throw UsageError("unknown --rule '" + args.str("rule") + "' (floor or ceil)");
  std::vector<float> values;
  std::string token;
  while (std::cin >> token) {
    char* end = nullptr;
    const float v = std::strtof(token.c_str(), &end);
    if (*end != '\0') throw std::runtime_error("not a number on stdin: '" + token + "'");
    values.push_back(v);
  }
  if (values.size() % mx::kBlockSize != 0)
    throw std::runtime_error("read " + std::to_string(values.size()) + " numbers; the count must be a multiple of 32");
  uint8_t codes[mx::kBlockSize];
  std::string line;
  for (size_t base = 0; base < values.size(); base += mx::kBlockSize) {
    const uint8_t scale = mx::quantize_block(format, *rule, values.data() + base, mx::kBlockSize, codes);
    char buf[4];
    std::snprintf(buf, sizeof buf, "%02x", scale);
    line = buf;
    for (uint8_t c : codes) {
      std::snprintf(buf, sizeof buf, "%02x", c);
      line += ' ';
      line += buf;
    }
    std::puts(line.c_str());
  }
  return 0;
}

int mx_dequantize(const ParsedArgs& args) {
  const mx::ElemFormat format = format_arg(args);
  const unsigned code_limit = 1u << mx::elem_traits(format).bits;
  std::string line;
  size_t line_no = 0;
  while (std::getline(std::cin, line)) {
    ++line_no;
    std::istringstream in(line);
    std::vector<unsigned> bytes;
    std::string tok;
    while (in >> tok) {
      char* end = nullptr;
      const unsigned long v = std::strtoul(tok.c_str(), &end, 16);
      if (tok.size() > 2 || *end != '\0' || v > 0xFF)
        throw std::runtime_error("line " + std::to_string(line_no) + ": '" + tok + "' is not a hex byte");
      bytes.push_back(static_cast<unsigned>(v));
    }
    if (bytes.empty()) continue;
    if (bytes.size() != mx::kBlockSize + 1)
      throw std::runtime_error("line " + std::to_string(line_no) + ": expected a scale and 32 codes, got " +
                               std::to_string(bytes.size()) + " bytes");
    for (size_t i = 1; i < bytes.size(); ++i) {
      if (bytes[i] >= code_limit)
        throw std::runtime_error("line " + std::to_string(line_no) + ": code " + std::to_string(bytes[i]) +
                                 " does not fit " + mx::elem_traits(format).name);
      const float v = mx::decode_scaled(format, static_cast<uint8_t>(bytes[i]), static_cast<uint8_t>(bytes[0]));
      std::printf("%.9g\n", v);
    }
  }
  return 0;
}

int run_mx(const ParsedArgs& args) {
  if (args.positional.size() != 1) throw UsageError("expected 'quantize' or 'dequantize'");
  if (args.positional[0] == "quantize") return mx_quantize(args);
  if (args.positional[0] == "dequantize") return mx_dequantize(args);
  throw UsageError("unknown mx action '" + args.positional[0] + "' (quantize or dequantize)");
}

const RegisterCommand register_mx({
    "mx",
    "quantize numbers from stdin into MX blocks, or decode such blocks",
    "{quantize|dequantize} --format F [--rule R]",
    "quantize reads whitespace-separated numbers (a multiple of 32) and prints one line per\n"
    "block: the E8M0 scale byte then 32 element codes, two lowercase hex digits each.\n"
    "dequantize reads such lines and prints the decoded values, one per line.",
    {{"format", "F", "", "element format: e2m1, e3m2, e2m3, e4m3, e5m2, int8"},
     {"rule", "R", "ceil", "scale rule: floor (OCP) or ceil (MicroMix)"}},
    run_mx,
});

// Relative RMS error ||x - q(x)|| / ||x|| of a round trip through one format and rule.
double round_trip_error(const std::vector<float>& x, mx::ElemFormat f, mx::ScaleRule r) {
  std::vector<float> q = x;
  mx::fake_quantize(q, f, r);
  double err = 0, ref = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    err += (double(x[i]) - q[i]) * (double(x[i]) - q[i]);
    ref += double(x[i]) * x[i];
  }
  return std::sqrt(err / ref);
}

int run_formats(const ParsedArgs& args) {
  const int64_t n = args.integer("samples");
  if (n <= 0 || n % mx::kBlockSize) throw UsageError("--samples must be a positive multiple of 32");
  std::mt19937_64 rng(static_cast<uint64_t>(args.integer("seed")));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = normal(rng);

  nlohmann::json out = nlohmann::json::array();
  for (mx::ElemFormat f : mx::kAllElemFormats) {
    const auto t = mx::elem_traits(f);
    nlohmann::json row;
    row["format"] = t.name;
    row["mx_name"] = t.mx_name;
    row["bits"] = t.bits;
    row["ebits"] = t.ebits;
    row["mbits"] = t.mbits;
    row["bias"] = t.bias;
    row["emax"] = t.emax;
    row["max"] = t.max;
    row["min_normal"] = t.is_int ? std::ldexp(1.0, -t.mbits) : std::ldexp(1.0, 1 - t.bias);
    row["min_subnormal"] = t.is_int ? std::ldexp(1.0, -t.mbits) : std::ldexp(1.0, 1 - t.bias - t.mbits);
    row["bits_per_element"] = mx::bits_per_element(f);
    row["rel_rms_error_floor"] = round_trip_error(x, f, mx::ScaleRule::Floor);
    row["rel_rms_error_ceil"] = round_trip_error(x, f, mx::ScaleRule::Ceil);
    out.push_back(row);
  }
  if (args.flag("json")) {
    std::cout << micromix::json_text(nlohmann::json{{"samples", n}, {"distribution", "normal(0,1)"}, {"formats", out}})
              << "\n";
    return 0;
  }
  std::printf("%-6s %-11s %4s %2s %2s %4s %9s %10s %13s %6s %14s %14s\n", "format", "MX name", "bits", "E", "M",
              "bias", "max", "min normal", "min subnormal", "bits/el", "rel.err floor", "rel.err ceil");
  for (const auto& r : out)
    std::printf("%-6s %-11s %4d %2d %2d %4d %9g %10g %13g %7.2f %14.5f %14.5f\n",
                r["format"].get<std::string>().c_str(), r["mx_name"].get<std::string>().c_str(), r["bits"].get<int>(),
                r["ebits"].get<int>(), r["mbits"].get<int>(), r["bias"].get<int>(), r["max"].get<double>(),
                r["min_normal"].get<double>(), r["min_subnormal"].get<double>(), r["bits_per_element"].get<double>(),
                r["rel_rms_error_floor"].get<double>(), r["rel_rms_error_ceil"].get<double>());
  std::printf("\nround-trip error: ||x - dequant(quant(x))|| / ||x|| over %lld N(0,1) samples, blocks of 32\n",
              static_cast<long long>(n));
  return 0;
}

const RegisterCommand register_formats({
    "formats",
    "list the MX element formats and their measured round-trip error",
    "[--samples N] [--seed S] [--json]",
    "",
    {{"samples", "N", "1048576", "Gaussian samples per format (a multiple of 32)"},
     {"seed", "S", "0", "random seed"},
     {"json", "", "", "print JSON"}},
    run_formats,
});

}  // namespace
