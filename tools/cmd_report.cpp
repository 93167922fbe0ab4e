// `micromix report`: a markdown table and SVG charts from a plan and the results of
// `micromix compare` (and optionally `micromix eval`).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "cli.h"
#include "micromix/common/io.h"
#include "micromix/quant/plan.h"

namespace micromix::cli {
namespace {

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// Stacked bars of the MXFP4/MXFP6/MXFP8 shares of every layer, one panel per linear group.
std::string allocation_svg(const quant::QuantPlan& plan) {
  int layers = 0;
  for (const auto& p : plan.linears) layers = std::max(layers, p.layer + 1);
  const int panel_w = 360, panel_h = 180, margin = 40;
  const int width = 2 * panel_w + 3 * margin, height = 2 * panel_h + 3 * margin + 30;
  std::ostringstream s;
  s << "<svg xmlns='http://www.w3.org/2000/svg' width='" << width << "' height='" << height
    << "' font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n";
  const char* colors[3] = {"#9ecae1", "#4292c6", "#08306b"};
  const char* labels[3] = {"MXFP4", "MXFP6", "MXFP8"};
  for (int slot = 0; slot < model::kNumLinearSlots; ++slot) {
    const int x0 = margin + (slot % 2) * (panel_w + margin), y0 = margin + (slot / 2) * (panel_h + margin);
    s << "<text x='" << x0 << "' y='" << y0 - 8 << "' font-weight='bold'>"
      << model::linear_slot_name(model::LinearSlot(slot)) << " input channels</text>\n";
    const double bw = double(panel_w) / std::max(layers, 1);
    for (const auto& p : plan.linears) {
      if (int(p.slot) != slot) continue;
      double y = y0 + panel_h;
      for (int seg = 0; seg < 3; ++seg) {
        const double h = panel_h * double(p.segment(seg)) / double(p.k);
        y -= h;
        s << "<rect x='" << fmt("%.1f", x0 + p.layer * bw) << "' y='" << fmt("%.1f", y) << "' width='"
          << fmt("%.1f", bw * 0.9) << "' height='" << fmt("%.1f", h) << "' fill='" << colors[seg] << "'/>\n";
      }
    }
    s << "<text x='" << x0 << "' y='" << y0 + panel_h + 14 << "'>layer 0</text><text x='" << x0 + panel_w - 40
      << "' y='" << y0 + panel_h + 14 << "'>layer " << layers - 1 << "</text>\n";
  }
  for (int seg = 0; seg < 3; ++seg)
    s << "<rect x='" << margin + seg * 90 << "' y='" << height - 24 << "' width='12' height='12' fill='" << colors[seg]
      << "'/><text x='" << margin + seg * 90 + 16 << "' y='" << height - 14 << "'>" << labels[seg] << "</text>\n";
  s << "</svg>\n";
  return s.str();
}

// Perplexity against average bits per weight, one labelled point per mode.
std::string ppl_svg(const nlohmann::json& rows) {
  const int width = 640, height = 400, left = 60, right = 110, top = 20, bottom = 50;
  double bmin = 1e9, bmax = 0, pmin = 1e9, pmax = 0;
  for (const auto& r : rows) {
    bmin = std::min(bmin, r["weight_bits"].get<double>());
    bmax = std::max(bmax, r["weight_bits"].get<double>());
    pmin = std::min(pmin, std::log(r["ppl"].get<double>()));
    pmax = std::max(pmax, std::log(r["ppl"].get<double>()));
  }
  bmin = std::floor(bmin) - 1, bmax = std::ceil(bmax) + 1;
  const double pad = std::max(0.05, (pmax - pmin) * 0.1);
  pmin -= pad, pmax += pad;
  auto X = [&](double b) { return left + (b - bmin) / (bmax - bmin) * (width - left - right); };
  auto Y = [&](double lp) { return top + (pmax - lp) / (pmax - pmin) * (height - top - bottom); };
  std::ostringstream s;
  s << "<svg xmlns='http://www.w3.org/2000/svg' width='" << width << "' height='" << height
    << "' font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n";
  s << "<line x1='" << left << "' y1='" << height - bottom << "' x2='" << width - right << "' y2='" << height - bottom
    << "' stroke='black'/><line x1='" << left << "' y1='" << top << "' x2='" << left << "' y2='" << height - bottom
    << "' stroke='black'/>\n";
  for (int b = int(bmin); b <= int(bmax); b += 2)
    s << "<text x='" << X(b) - 4 << "' y='" << height - bottom + 14 << "'>" << b << "</text>\n";
  for (int i = 0; i <= 4; ++i) {
    const double lp = pmin + (pmax - pmin) * i / 4;
    s << "<text x='4' y='" << Y(lp) + 4 << "'>" << fmt("%.2f", std::exp(lp)) << "</text>\n";
  }
  s << "<text x='" << width / 2 - 80 << "' y='" << height - 12 << "'>average bits per weight</text>\n";
  s << "<text x='4' y='12'>perplexity (log scale)</text>\n";
  // Labels of points that crowd each other are stacked downwards, one line each.
  std::vector<std::pair<double, double>> placed;
  for (const auto& r : rows) {
    const double x = X(r["weight_bits"].get<double>()), y = Y(std::log(r["ppl"].get<double>()));
    const bool mm = r["mode"] == "micromix";
    double ly = y + 4;
    for (bool moved = true; moved;) {
      moved = false;
      for (const auto& [px, py] : placed)
        if (std::fabs(px - x) < 70 && std::fabs(py - ly) < 12) ly = py + 12, moved = true;
    }
    placed.push_back({x, ly});
    if (ly != y + 4)  // a leader line to a displaced label
      s << "<line x1='" << fmt("%.1f", x) << "' y1='" << fmt("%.1f", y) << "' x2='" << fmt("%.1f", x + 40) << "' y2='"
        << fmt("%.1f", ly - 4) << "' stroke='#999'/>\n";
    s << "<circle cx='" << fmt("%.1f", x) << "' cy='" << fmt("%.1f", y) << "' r='5' fill='" << (mm ? "#d62728" : "#1f77b4")
      << "'/><text x='" << fmt("%.1f", ly != y + 4 ? x + 42 : x + 8) << "' y='" << fmt("%.1f", ly) << "'>" << r["mode"].get<std::string>()
      << " (" << r["scale_rule"].get<std::string>() << ")</text>\n";
  }
  s << "</svg>\n";
  return s.str();
}

int run_report(const ParsedArgs& args) {
  if (args.positional.empty()) throw UsageError("give one or more results files from 'micromix compare --output'");
  if (!args.given("output")) throw UsageError("-o DIR is required");
  const std::string dir = args.str("output");
  std::filesystem::create_directories(dir);
  nlohmann::json rows = nlohmann::json::array();
  nlohmann::json first;
  for (const auto& f : args.positional) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_file(f));
      const nlohmann::json& results = j.at("results");
      if (!results.is_array()) throw std::runtime_error(f + ": \"results\" is not an array");
      for (size_t i = 0; i < results.size(); ++i) {
        const nlohmann::json& r = results[i];
        const std::string where = f + ": result " + std::to_string(i) + ": ";
        if (!r.is_object() || !r.value("mode", nlohmann::json()).is_string() ||
            !r.value("scale_rule", nlohmann::json()).is_string() || !r.value("tokens", nlohmann::json()).is_number_integer())
          throw std::runtime_error(where + "needs \"mode\", \"scale_rule\" (strings) and \"tokens\" (an integer)");
        const nlohmann::json bits = r.value("weight_bits", nlohmann::json()), ppl = r.value("ppl", nlohmann::json());
        if (!bits.is_number() || !(bits.get<double>() > 0 && bits.get<double>() <= 64))
          throw std::runtime_error(where + "\"weight_bits\" must be a number in (0, 64]");
        if (!ppl.is_number() || !(ppl.get<double>() > 0) || !std::isfinite(ppl.get<double>()))
          throw std::runtime_error(where + "\"ppl\" must be a finite positive number");
        rows.push_back(r);
      }
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error(f + ": not a compare results file (" + e.what() + ")");
    }
    if (first.is_null()) first = j;
  }
  if (rows.empty()) throw std::runtime_error("the results files hold no results to report");
  std::ostringstream md;
  md << "# micromix report\n\nModel: `" << first.value("model", "") << "`. Perplexity on `" << first.value("text", "")
     << "`, windows of " << first.value("seqlen", 0) << " tokens";
  if (first.value("max_windows", 0) > 0) md << " (first " << first.value("max_windows", 0) << " windows)";
  md << ".\n\n| mode | scale rule | bits/weight | perplexity | tokens |\n|---|---|---:|---:|---:|\n";
  for (const auto& r : rows)
    md << "| " << r["mode"].get<std::string>() << " | " << r["scale_rule"].get<std::string>() << " | "
       << fmt("%.3f", r["weight_bits"].get<double>()) << " | " << fmt("%.4f", r["ppl"].get<double>()) << " | "
       << r["tokens"].get<int64_t>() << " |\n";
  write_file_atomic(dir + "/ppl_vs_bits.svg", ppl_svg(rows));
  md << "\n![perplexity against bits](ppl_vs_bits.svg)\n";
  if (args.given("plan")) {
    const quant::QuantPlan plan = quant::QuantPlan::load(args.str("plan"));
    write_file_atomic(dir + "/allocation.svg", allocation_svg(plan));
    md << "\n## MicroMix allocation\n\nPlan `" << args.str("plan") << "` (" << plan.samples << " windows of "
       << plan.seqlen << " tokens from `" << plan.calibration << "`).\n\n"
       << "| group | MXFP4 | MXFP6 | MXFP8 | bits |\n|---|---:|---:|---:|---:|\n";
    for (int s = 0; s < model::kNumLinearSlots; ++s) {
      double p4 = 0, p6 = 0, p8 = 0, k = 0;
      for (const auto& p : plan.linears)
        if (int(p.slot) == s) p4 += p.p4, p6 += p.p6, p8 += p.p8, k += p.k;
      md << "| " << model::linear_slot_name(model::LinearSlot(s)) << " | " << fmt("%.1f%%", 100 * p4 / k) << " | "
         << fmt("%.1f%%", 100 * p6 / k) << " | " << fmt("%.1f%%", 100 * p8 / k) << " | "
         << fmt("%.2f", (4.25 * p4 + 6.25 * p6 + 8.25 * p8) / k) << " |\n";
    }
    md << "\n![per-layer allocation](allocation.svg)\n";
  }
  write_file_atomic(dir + "/report.md", md.str());
  std::printf("%s", md.str().c_str());
  std::fprintf(stderr, "report written to %s/report.md\n", dir.c_str());
  return 0;
}

const RegisterCommand register_report({"report", "markdown table and charts from compare results and a plan",
                                       "RESULTS.json... [--plan PLAN] -o DIR", "",
                                       {{"plan", "PLAN", "", "plan whose per-layer allocation to chart"},
                                        {"output", "DIR", "", "folder for report.md and the SVG charts"}},
                                       run_report});

}  // namespace
}  // namespace micromix::cli
