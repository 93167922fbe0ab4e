// Quantized checkpoints: the model loaded from a checkpoint equals the same MicroMix
// quantization applied in memory, bit for bit; corrupt files give clear errors.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "micromix/common/error.h"
#include "micromix/common/io.h"
#include "micromix/model/loader.h"
#include "micromix/model/safetensors.h"
#include "micromix/quant/calibrate.h"
#include "micromix/quant/checkpoint.h"
#include "micromix/quant/scheme.h"
#include "model_test_util.h"

using namespace micromix;
using namespace micromix::quant;

namespace {

model::TokenizerSpec toy_tokenizer() {
  model::TokenizerSpec s;
  for (int i = 0; i < 50; ++i) s.tokens.push_back("t" + std::to_string(i));
  s.merges = {"t 1"};
  s.eos_id = 0;
  s.chat_template = "<|im_start|>";
  return s;
}

struct Fixture {
  model::ModelWeights w;
  QuantPlan plan;
  Fixture() {
    model::ModelConfig c = model::small_config();
    c.qkv_bias = true;
    c.n_kv_heads = 4;
    c.tied_embeddings = false;
    w = model::random_model(c, 5);
    std::vector<int32_t> text;
    for (int i = 0; i < 400; ++i) text.push_back((i * 7 + i / 3) % c.vocab);
    CalibrationOptions opt;
    plan = calibrate(w, calibration_windows(text, 3, 32, 1), opt);
  }
};

}  // namespace

TEST(Checkpoint, LoadedModelEqualsInMemoryQuantization) {
  Fixture f;
  // Force every segment to be non-empty somewhere, and one layer all-FP4.
  for (auto& p : f.plan.linears) {
    if (p.k == 64) p.p4 = 32, p.p6 = 0, p.p8 = 32;
    if (p.k == 96) p.p4 = 32, p.p6 = 32, p.p8 = 32;
  }
  f.plan.linears[0].p4 = 64, f.plan.linears[0].p8 = 0;
  const std::string path = testing::TempDir() + "/ck.safetensors";
  for (mx::ScaleRule rule : {mx::ScaleRule::Ceil, mx::ScaleRule::Floor}) {
    save_checkpoint(path, f.w, f.plan, rule, toy_tokenizer());
    ASSERT_TRUE(is_checkpoint(path));
    const Checkpoint ck = load_checkpoint(path);

    QuantSpec spec{QuantMode::MicroMix, rule, std::make_shared<QuantPlan>(f.plan)};
    model::ModelWeights mem = f.w;
    quantize_weights(mem, spec);
    EXPECT_EQ(ck.weights.token_embedding, mem.token_embedding);
    EXPECT_EQ(ck.weights.lm_head, mem.lm_head);
    for (size_t l = 0; l < mem.layers.size(); ++l) {
      EXPECT_EQ(ck.weights.layers[l].attn_norm, mem.layers[l].attn_norm);
      for (int s = 0; s < 4; ++s) {
        EXPECT_EQ(ck.weights.layers[l].linear[s].weight, mem.layers[l].linear[s].weight) << l << " " << s;
        EXPECT_EQ(ck.weights.layers[l].linear[s].bias, mem.layers[l].linear[s].bias) << l << " " << s;
        EXPECT_NE(mem.layers[l].linear[s].weight, f.w.layers[l].linear[s].weight);  // it did quantize
        EXPECT_EQ(ck.plan.linears[l * 4 + s].order, f.plan.linears[l * 4 + s].order);
      }
    }
    EXPECT_EQ(ck.rule, rule);
    EXPECT_EQ(ck.tokenizer.tokens, toy_tokenizer().tokens);
    EXPECT_EQ(ck.tokenizer.chat_template, "<|im_start|>");
    // Packed bytes: bits per segment plus one scale byte per 32 weights.
    uint64_t expect_bytes = 0;
    for (const auto& p : f.plan.linears) {
      const int64_t out = f.w.layers[p.layer].slot(p.slot).out;
      expect_bytes += out * (p.p4 * 4 + p.p6 * 6 + p.p8 * 8) / 8 + out * p.k / 32;
    }
    EXPECT_EQ(ck.linear_weight_bytes, expect_bytes);

    // Same logits with activations quantized on the fly.
    const std::vector<int32_t> tokens = {3, 14, 15, 9, 26, 5, 35};
    std::vector<float> a(50), b(50);
    model::CpuRuntime r1(mem, 16), r2(ck.weights, 16);
    r1.set_linear_input_hook(activation_quantizer(spec));
    r2.set_linear_input_hook(activation_quantizer({QuantMode::MicroMix, ck.rule, std::make_shared<QuantPlan>(ck.plan)}));
    r1.forward(tokens, a.data(), false);
    r2.forward(tokens, b.data(), false);
    EXPECT_EQ(a, b);
  }
}

TEST(Checkpoint, CorruptOrMismatchedFilesGiveClearErrors) {
  Fixture f;
  const std::string path = testing::TempDir() + "/ck2.safetensors";
  save_checkpoint(path, f.w, f.plan, mx::ScaleRule::Ceil, toy_tokenizer());
  const std::string bytes = read_file(path);
  // Truncated.
  write_file_atomic(path, bytes.substr(0, bytes.size() / 2));
  EXPECT_THROW(load_checkpoint(path), FormatError);
  EXPECT_FALSE(is_checkpoint(path));
  // A plan for another model shape.
  QuantPlan bad = f.plan;
  bad.linears.pop_back();
  EXPECT_THROW(save_checkpoint(path, f.w, bad, mx::ScaleRule::Ceil, toy_tokenizer()), FormatError);
  // A safetensors file whose format tag is not micromix's.
  std::string crafted = bytes;
  const std::string probe = "\"format\":\"micromix-checkpoint\"";
  ASSERT_NE(crafted.find(probe), std::string::npos);
  crafted.replace(crafted.find(probe), probe.size(), "\"format\":\"micromix-checkpoinX\"");
  write_file_atomic(path, crafted);
  EXPECT_THROW(load_checkpoint(path), FormatError);
  EXPECT_THROW(load_checkpoint(testing::TempDir() + "/absent.safetensors"), std::runtime_error);
  // A tensor entry whose shape no longer matches its bytes: the file is not taken for a
  // checkpoint any more, and the model loader (the command line's next try) names the fault
  // rather than asking for a config.json that a checkpoint never has.
  crafted = bytes;
  const std::string shape = "\"shape\":[";
  const size_t at = crafted.find(shape, crafted.find("\"output_norm\""));
  ASSERT_NE(at, std::string::npos);
  crafted.insert(at + shape.size(), "2,");
  uint64_t header_size = 0;
  std::memcpy(&header_size, crafted.data(), 8);
  header_size += 2;
  std::memcpy(crafted.data(), &header_size, 8);
  write_file_atomic(path, crafted);
  EXPECT_FALSE(is_checkpoint(path));
  try {
    model::load_model(path);
    ADD_FAILURE() << "a damaged checkpoint loaded";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("output_norm"), std::string::npos) << e.what();
  }
  // A block scale of 0xFF (NaN, which quantizing finite weights never writes) in one
  // layer's scales: refused when loading, naming the layer, not NaN logits later.
  crafted = bytes;
  {
    const auto st = model::SafetensorsFile::parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
    const auto& scales = st.tensor("blk.1.down.scales");
    crafted[st.data_offset() + scales.begin + 3] = static_cast<char>(0xFF);
  }
  write_file_atomic(path, crafted);
  try {
    load_checkpoint(path);
    ADD_FAILURE() << "a checkpoint with a NaN block scale loaded";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("layer 1 down weight"), std::string::npos) << e.what();
  }
}
