// MicroMix calibration math on constructed activations, plan files, and the
// simulated quantization modes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>

#include "micromix/common/error.h"
#include "micromix/common/io.h"
#include "micromix/mx/tensor.h"
#include "micromix/quant/calibrate.h"
#include "micromix/quant/scheme.h"

using namespace micromix;
using namespace micromix::quant;

namespace {
// 512 channels per token: 300 of magnitude 1 (below T4 = 254*2/254*8/6 = 2.67),
// 150 of -5 (between T4 and T6 = 9.14), 61 of 20 and one of 254 (the row max).
std::vector<float> constructed_rows(int tokens, std::vector<int>& channel_kind, uint32_t seed) {
  const int k = 512;
  channel_kind.resize(k);
  for (int c = 0; c < k; ++c) channel_kind[c] = c < 300 ? 0 : c < 450 ? 1 : c < 511 ? 2 : 3;
  std::mt19937 rng(seed);
  std::shuffle(channel_kind.begin(), channel_kind.end(), rng);
  std::vector<float> x(size_t(tokens) * k);
  const float value[4] = {1.0f, -5.0f, 20.0f, 254.0f};
  for (int t = 0; t < tokens; ++t)
    for (int c = 0; c < k; ++c)  // the small channels alternate in sign; the others keep theirs
      x[size_t(t) * k + c] = value[channel_kind[c]] * (channel_kind[c] == 0 && t % 2 ? -1.0f : 1.0f);
  return x;
}
}  // namespace

TEST(Calibration, SharesAndCountsOnConstructedActivations) {
  std::vector<int> kind;
  const auto x = constructed_rows(10, kind, 3);
  const std::vector<float>& xs = x;
  ChannelStats stats(512);
  stats.add_window(xs.data(), 6, false);
  stats.add_window(xs.data() + 6 * 512, 4, false);
  const LinearPlan p = plan_from_stats(0, model::LinearSlot::QKV, stats, false);
  EXPECT_DOUBLE_EQ(p.r4, 300.0 / 512);
  EXPECT_DOUBLE_EQ(p.r6, 150.0 / 512);
  EXPECT_DOUBLE_EQ(p.r8, 62.0 / 512);
  // p8 = ceil(512 * 62/512 / 128) * 128 = 128, p6 = ceil(150 / 128) * 128 = 256, p4 = the rest.
  EXPECT_EQ(p.p8, 128);
  EXPECT_EQ(p.p6, 256);
  EXPECT_EQ(p.p4, 128);
  EXPECT_NEAR(p.average_bits(), (128 * 4.25 + 256 * 6.25 + 128 * 8.25) / 512, 1e-12);
  // Ascending statistic: the 254 channel is last, the 20s just before it, the 1s first.
  EXPECT_EQ(kind[p.order[511]], 3);
  for (int i = 450; i < 511; ++i) EXPECT_EQ(kind[p.order[i]], 2);
  for (int i = 0; i < 300; ++i) EXPECT_EQ(kind[p.order[i]], 0);

  // The published code's behaviour: signed comparison (the -5s count below T4) and
  // p6/p8 swapped.
  ChannelStats compat(512);
  compat.add_window(xs.data(), 10, true);
  const LinearPlan q = plan_from_stats(0, model::LinearSlot::QKV, compat, true);
  EXPECT_DOUBLE_EQ(q.r4, 450.0 / 512);
  EXPECT_DOUBLE_EQ(q.r6, 0.0);
  EXPECT_EQ(q.p6, 128);
  EXPECT_EQ(q.p8, 0);
  EXPECT_EQ(q.p4, 384);
}

TEST(Calibration, ChannelStatisticIsTheMaxOverWindowsOfTheMeanAbs) {
  ChannelStats stats(32);
  std::vector<float> a(2 * 32, 0.0f), b(3 * 32, 0.0f);
  a[0] = 4, a[32] = -2;            // window 1, channel 0: mean |x| = 3
  b[0] = 1, b[32] = 1, b[64] = 1;  // window 2, channel 0: mean 1
  b[5] = 9;                        // window 2, channel 5: mean 3
  stats.add_window(a.data(), 2, false);
  stats.add_window(b.data(), 3, false);
  EXPECT_FLOAT_EQ(stats.max_mean_abs()[0], 3.0f);
  EXPECT_FLOAT_EQ(stats.max_mean_abs()[5], 3.0f);
  EXPECT_FLOAT_EQ(stats.max_mean_abs()[1], 0.0f);
}

TEST(Calibration, CountsRoundUpToMultiplesOf128AndNeverExceedK) {
  LinearPlan p;
  p.k = 576;
  assign_counts(p, 0.0, 0.0, 1.0, false);
  EXPECT_EQ(p.p8, 576);
  EXPECT_EQ(p.p6 + p.p4, 0);
  assign_counts(p, 0.5, 0.3, 0.2, false);  // r8: 115.2 -> 128, r6: 172.8 -> 256
  EXPECT_EQ(p.p8, 128);
  EXPECT_EQ(p.p6, 256);
  EXPECT_EQ(p.p4, 192);
  assign_counts(p, 1.0, 0.0, 0.0, false);
  EXPECT_EQ(p.p4, 576);
}

TEST(Plan, SaveLoadRoundTripAndCorruptFiles) {
  QuantPlan plan;
  plan.model = "m.gguf";
  plan.samples = 3;
  plan.seqlen = 64;
  for (int s = 0; s < 4; ++s) {
    LinearPlan p;
    p.layer = 0;
    p.slot = model::LinearSlot(s);
    p.k = s == 3 ? 96 : 64;
    p.order.resize(p.k);
    std::iota(p.order.rbegin(), p.order.rend(), 0);
    p.channel_stat.assign(p.k, 0.5f);
    assign_counts(p, 0.5, 0.25, 0.25, false);
    p.p4 = p.k - 32, p.p6 = 0, p.p8 = 32;
    plan.linears.push_back(p);
  }
  const std::string path = testing::TempDir() + "/plan.json";
  plan.save(path);
  const QuantPlan back = QuantPlan::load(path);
  ASSERT_EQ(back.linears.size(), 4u);
  for (int s = 0; s < 4; ++s) {
    EXPECT_EQ(back.linears[s].order, plan.linears[s].order);
    EXPECT_EQ(back.linears[s].p4, plan.linears[s].p4);
    EXPECT_EQ(back.linears[s].p8, plan.linears[s].p8);
    EXPECT_EQ(back.linears[s].slot, plan.linears[s].slot);
  }
  auto write = [&](const std::string& text) {
    std::ofstream(path) << text;
    return path;
  };
  EXPECT_THROW(QuantPlan::load(write("{not json")), FormatError);
  EXPECT_THROW(QuantPlan::load(write("{\"format\":\"other\"}")), FormatError);
  {  // another version, or none, is refused before its entries are read
    plan.save(path);
    const std::string text = read_file(path);
    const std::string tag = "\"version\":1";
    ASSERT_NE(text.find(tag), std::string::npos) << text.substr(0, 200);
    std::string other = text, none = text;
    other.replace(other.find(tag), tag.size(), "\"version\":2");
    none.replace(none.find(tag), tag.size(), "\"versions\":1");
    EXPECT_THROW(QuantPlan::load(write(other)), FormatError);
    EXPECT_THROW(QuantPlan::load(write(none)), FormatError);
    EXPECT_NO_THROW(QuantPlan::load(write(text)));
  }
  {  // a model path in another encoding than UTF-8 (Latin-1 here) is kept as U+FFFD, not an error
    QuantPlan latin1 = plan;
    latin1.model = "/models/caf\xE9.gguf";
    latin1.save(path);
    EXPECT_EQ(QuantPlan::load(path).model, "/models/caf\xEF\xBF\xBD.gguf");
  }
  QuantPlan bad = plan;
  bad.linears[0].order[0] = bad.linears[0].order[1];  // not a permutation
  bad.save(path);
  EXPECT_THROW(QuantPlan::load(path), FormatError);
  bad = plan;
  bad.linears[1].p4 += 32;  // widths no longer add up to K
  bad.save(path);
  EXPECT_THROW(QuantPlan::load(path), FormatError);
  EXPECT_THROW(QuantPlan::load(testing::TempDir() + "/missing.json"), std::runtime_error);
}

TEST(Scheme, MicroMixRowQuantizesEachSegmentInItsFormat) {
  std::mt19937 rng(4);
  std::normal_distribution<float> n(0.0f, 1.0f);
  LinearPlan p;
  p.k = 128;
  p.p4 = 64, p.p6 = 32, p.p8 = 32;
  p.order.resize(128);
  std::iota(p.order.begin(), p.order.end(), 0);
  std::shuffle(p.order.begin(), p.order.end(), rng);
  std::vector<float> row(128), scratch(128);
  for (auto& v : row) v = n(rng);
  std::vector<float> q = row;
  fake_quantize_micromix_row(q.data(), p, mx::ScaleRule::Ceil, scratch.data());
  // Independent: gather, quantize each segment as an MX matrix, compare per channel.
  std::vector<float> g(128);
  for (int i = 0; i < 128; ++i) g[i] = row[p.order[i]];
  const mx::ElemFormat fmts[3] = {mx::ElemFormat::E2M1, mx::ElemFormat::E3M2, mx::ElemFormat::E4M3};
  int start = 0;
  for (int s = 0; s < 3; ++s) {
    const int w = int(p.segment(s));
    const auto m = mx::quantize(std::span<const float>(g.data() + start, w), 1, w, fmts[s], mx::ScaleRule::Ceil);
    const auto d = mx::dequantize(m);
    for (int i = 0; i < w; ++i) EXPECT_EQ(q[p.order[start + i]], d[i]) << "segment " << s;
    start += w;
  }
}

TEST(Scheme, ModesParseAndReportBits) {
  for (const char* name : {"fp32", "bf16", "fp8", "mxint8", "mxfp8", "mxfp6", "mxfp4", "micromix"})
    EXPECT_STREQ(quant_mode_name(*parse_quant_mode(name)), name);
  EXPECT_FALSE(parse_quant_mode("int4"));
}
