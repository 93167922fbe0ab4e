#include "micromix/quant/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "micromix/common/error.h"
#include "micromix/common/io.h"
#include "micromix/common/json_text.h"

namespace micromix::quant {

double LinearPlan::average_bits() const {
  if (k == 0) return 0;
  double bits = 0;
  for (int i = 0; i < 3; ++i) bits += double(segment(i)) * mx::bits_per_element(mx::kSegmentFormat[i]);
  return bits / double(k);
}

void LinearPlan::validate() const {
  const std::string where = "plan for layer " + std::to_string(layer) + " " + model::linear_slot_name(slot) + ": ";
  if (k <= 0 || k % mx::kBlockSize) throw FormatError(where + "K must be a positive multiple of 32");
  for (int i = 0; i < 3; ++i)
    if (segment(i) < 0 || segment(i) % mx::kBlockSize)
      throw FormatError(where + "segment widths must be non-negative multiples of 32");
  if (p4 + p6 + p8 != k) throw FormatError(where + "p4 + p6 + p8 != K");
  if (static_cast<int64_t>(order.size()) != k) throw FormatError(where + "reorder indices must have K entries");
  std::vector<char> seen(static_cast<size_t>(k), 0);
  for (int32_t c : order) {
    if (c < 0 || c >= k || seen[c]) throw FormatError(where + "reorder indices are not a permutation of 0..K-1");
    seen[c] = 1;
  }
}

void assign_counts(LinearPlan& plan, double r4, double r6, double r8, bool reference_compat) {
  const int64_t k = plan.k;
  auto round_up = [&](double r) { return std::min<int64_t>(k, int64_t(std::ceil(double(k) * r / 128.0 - 1e-9)) * 128); };
  int64_t p8 = round_up(r8), p6 = round_up(r6);
  // The published code writes the FP6 count into the FP8 file and vice versa.
  if (reference_compat) std::swap(p6, p8);
  p8 = std::min(p8, k);
  p6 = std::min(p6, k - p8);
  plan.p8 = p8;
  plan.p6 = p6;
  plan.p4 = k - p6 - p8;
  plan.r4 = r4;
  plan.r6 = r6;
  plan.r8 = r8;
}

const LinearPlan& QuantPlan::at(int layer, model::LinearSlot slot) const {
  const size_t i = static_cast<size_t>(layer) * model::kNumLinearSlots + static_cast<size_t>(slot);
  if (i >= linears.size()) throw std::out_of_range("plan has no entry for layer " + std::to_string(layer));
  return linears[i];
}

double QuantPlan::average_bits(const model::ModelWeights& w) const {
  double bits = 0, count = 0;
  for (const auto& p : linears) {
    const double n = double(w.layers.at(p.layer).slot(p.slot).out) * double(p.k);
    bits += p.average_bits() * n;
    count += n;
  }
  return count ? bits / count : 0;
}

void QuantPlan::validate(const model::ModelConfig& c) const {
  if (linears.size() != static_cast<size_t>(c.n_layers) * model::kNumLinearSlots)
    throw FormatError("plan has " + std::to_string(linears.size()) + " linear groups, the model has " +
                      std::to_string(c.n_layers * model::kNumLinearSlots));
  for (size_t i = 0; i < linears.size(); ++i) {
    const LinearPlan& p = linears[i];
    if (p.layer != int(i / model::kNumLinearSlots) || int(p.slot) != int(i % model::kNumLinearSlots))
      throw FormatError("plan entries are out of order at index " + std::to_string(i));
    const int64_t expect_k = p.slot == model::LinearSlot::O ? c.q_dim() : p.slot == model::LinearSlot::Down ? c.ffn : c.hidden;
    if (p.k != expect_k)
      throw FormatError("plan for layer " + std::to_string(p.layer) + " " + model::linear_slot_name(p.slot) +
                        " has K = " + std::to_string(p.k) + ", the model has " + std::to_string(expect_k));
    p.validate();
  }
}

void QuantPlan::save(const std::string& path) const {
  nlohmann::json j;
  j["format"] = "micromix-plan";
  j["version"] = 1;
  j["model"] = model;
  j["calibration"] = calibration;
  j["samples"] = samples;
  j["seqlen"] = seqlen;
  j["seed"] = seed;
  j["reference_compat"] = reference_compat;
  auto& arr = j["linears"] = nlohmann::json::array();
  for (const auto& p : linears) {
    arr.push_back({{"layer", p.layer}, {"slot", model::linear_slot_name(p.slot)}, {"k", p.k}, {"p4", p.p4},
                   {"p6", p.p6}, {"p8", p.p8}, {"r4", p.r4}, {"r6", p.r6}, {"r8", p.r8},
                   {"average_bits", p.average_bits()}, {"order", p.order}, {"channel_stat", p.channel_stat}});
  }
  // the model and text paths are descriptive: bytes that are not UTF-8 become U+FFFD
  write_file_atomic(path, json_text(j, -1) + "\n");
}

QuantPlan QuantPlan::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open plan " + path);
  QuantPlan plan;
  try {
    const nlohmann::json j = nlohmann::json::parse(in);
    if (j.value("format", "") != "micromix-plan") throw FormatError("not a micromix plan");  // the catch names the file
    if (!j.contains("version") || j.at("version") != 1)
      throw FormatError("unsupported plan version " + (j.contains("version") ? j.at("version").dump() : "(none)") +
                        " (this micromix reads version 1)");
    plan.model = j.value("model", "");
    plan.calibration = j.value("calibration", "");
    plan.samples = j.value("samples", 0);
    plan.seqlen = j.value("seqlen", 0);
    plan.seed = j.value("seed", uint64_t{0});
    plan.reference_compat = j.value("reference_compat", false);
    for (const auto& e : j.at("linears")) {
      LinearPlan p;
      p.layer = e.at("layer").get<int>();
      const std::string slot = e.at("slot").get<std::string>();
      bool found = false;
      for (int s = 0; s < model::kNumLinearSlots; ++s)
        if (slot == model::linear_slot_name(model::LinearSlot(s))) p.slot = model::LinearSlot(s), found = true;
      if (!found) throw FormatError("unknown linear slot '" + slot + "'");
      p.k = e.at("k").get<int64_t>();
      p.p4 = e.at("p4").get<int64_t>();
      p.p6 = e.at("p6").get<int64_t>();
      p.p8 = e.at("p8").get<int64_t>();
      p.r4 = e.value("r4", 0.0);
      p.r6 = e.value("r6", 0.0);
      p.r8 = e.value("r8", 0.0);
      p.order = e.at("order").get<std::vector<int32_t>>();
      p.channel_stat = e.value("channel_stat", std::vector<float>{});
      p.validate();
      plan.linears.push_back(std::move(p));
    }
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(path + ": malformed plan: " + e.what());
  } catch (const FormatError& e) {
    throw FormatError(path + ": " + e.what());
  }
  return plan;
}

}  // namespace micromix::quant
