#include "micromix/model/llama.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "micromix/common/error.h"
#include "micromix/model/swiglu.h"

namespace micromix::model {

const char* linear_slot_name(LinearSlot slot) {
  switch (slot) {
    case LinearSlot::QKV: return "qkv";
    case LinearSlot::O: return "o";
    case LinearSlot::GateUp: return "gate_up";
    case LinearSlot::Down: return "down";
  }
  return "?";
}

void ModelConfig::validate() const {
  auto fail = [](const std::string& what) { throw FormatError("model config: " + what); };
  if (n_layers <= 0 || n_layers > 1024) fail("layer count " + std::to_string(n_layers) + " out of range");
  if (hidden <= 0 || hidden > 65536) fail("hidden size " + std::to_string(hidden) + " out of range");
  if (ffn <= 0 || ffn > 1 << 18) fail("feed-forward size " + std::to_string(ffn) + " out of range");
  if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0)
    fail("head counts " + std::to_string(n_heads) + "/" + std::to_string(n_kv_heads) + " are inconsistent");
  if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > 1024) fail("head dim " + std::to_string(head_dim) + " invalid");
  if (vocab <= 0 || vocab > 1 << 22) fail("vocabulary size " + std::to_string(vocab) + " out of range");
  if (!(rms_eps > 0 && rms_eps < 1)) fail("rms epsilon out of range");
  if (!(rope_theta > 0) || !std::isfinite(rope_theta)) fail("rope theta must be positive and finite");
  if (context <= 0 || context > 1 << 24) fail("context length " + std::to_string(context) + " out of range");
  const RopeScaling& s = rope_scaling;
  if (s.type == "llama3") {
    // rope_inv_frequencies divides by each of these and by high - low.
    if (!(s.factor > 0) || !std::isfinite(s.factor) || !(s.low_freq_factor > 0) ||
        !(s.high_freq_factor > s.low_freq_factor) || !std::isfinite(s.high_freq_factor) || s.original_context <= 0)
      fail("llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and original context > 0");
  } else if (!s.type.empty()) {
    fail("rope scaling '" + s.type + "' is not supported (llama3)");
  }
}

void ModelWeights::check_finite(const std::string& where) const {
  auto check = [&](const std::vector<float>& v, const std::string& name) {
    bool finite = true;
#pragma omp parallel for reduction(&& : finite) schedule(static) if (v.size() >= (1 << 20))
    for (size_t i = 0; i < v.size(); ++i) finite = finite && std::isfinite(v[i]);
    if (!finite) throw FormatError(where + ": " + name + " holds NaN or infinity");
  };
  check(token_embedding, "the token embedding");
  check(output_norm, "the output norm");
  check(lm_head, "the lm_head");
  for (size_t l = 0; l < layers.size(); ++l) {
    const std::string layer = "layer " + std::to_string(l) + " ";
    check(layers[l].attn_norm, layer + "attention norm");
    check(layers[l].ffn_norm, layer + "FFN norm");
    for (int s = 0; s < kNumLinearSlots; ++s) {
      const Linear& lin = layers[l].linear[s];
      check(lin.weight, layer + linear_slot_name(LinearSlot(s)) + " weight");
      check(lin.bias, layer + linear_slot_name(LinearSlot(s)) + " bias");
    }
  }
}

int64_t ModelWeights::parameter_count() const {
  int64_t n = static_cast<int64_t>(token_embedding.size() + output_norm.size() + lm_head.size());
  for (const auto& l : layers) {
    n += static_cast<int64_t>(l.attn_norm.size() + l.ffn_norm.size());
    for (const auto& lin : l.linear) n += static_cast<int64_t>(lin.weight.size() + lin.bias.size());
  }
  return n;
}

namespace {

void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / double(n) + double(eps)));
    float* yr = y + r * n;
    for (int64_t i = 0; i < n; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

// y[rows, out] (+)= x[rows, in] * W[out, in]^T (+ bias)
void linear_forward(const Linear& lin, const float* x, int64_t rows, float* y, bool accumulate) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(lin.out),
              static_cast<int>(lin.in), 1.0f, x, static_cast<int>(lin.in), lin.weight.data(), static_cast<int>(lin.in),
              accumulate ? 1.0f : 0.0f, y, static_cast<int>(lin.out));
  if (!lin.bias.empty())
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < lin.out; ++o) y[r * lin.out + o] += lin.bias[o];
}

}  // namespace

std::vector<float> rope_inv_frequencies(const ModelConfig& c) {
  const int half = c.head_dim / 2;
  std::vector<float> inv(half);
  for (int i = 0; i < half; ++i) {
    double f = std::pow(double(c.rope_theta), -2.0 * i / c.head_dim);
    if (c.rope_scaling.type == "llama3") {
      const auto& s = c.rope_scaling;
      const double low_wavelen = s.original_context / s.low_freq_factor;
      const double high_wavelen = s.original_context / s.high_freq_factor;
      const double wavelen = 2 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = f / s.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1 - smooth) * f / s.factor + smooth * f;
      }
    }
    inv[i] = static_cast<float>(f);
  }
  return inv;
}

namespace {

void apply_rope(float* v, int head_dim, bool neox, const float* inv_freq, int position) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    const double angle = double(position) * inv_freq[i];
    const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
    float& a = neox ? v[i] : v[2 * i];
    float& b = neox ? v[i + half] : v[2 * i + 1];
    const float x0 = a, x1 = b;
    a = x0 * c - x1 * s;
    b = x0 * s + x1 * c;
  }
}

}  // namespace

CpuRuntime::CpuRuntime(const ModelWeights& weights, int max_context) : w_(weights), max_context_(max_context) {
  const auto& c = w_.config;
  c.validate();
  if (max_context <= 0) throw std::invalid_argument("max context must be positive");
  const size_t per_layer = static_cast<size_t>(c.n_kv_heads) * max_context * c.head_dim;
  k_cache_.assign(per_layer * c.n_layers, 0.0f);
  v_cache_.assign(per_layer * c.n_layers, 0.0f);
  rope_inv_freq_ = rope_inv_frequencies(c);
}

CpuRuntime::~CpuRuntime() = default;

void CpuRuntime::attention(int layer, const float* qkv, int64_t n, float* out) {
  const auto& c = w_.config;
  const int hd = c.head_dim, q_dim = c.q_dim(), kv_dim = c.kv_dim();
  const int64_t stride = q_dim + 2 * kv_dim;
  const size_t per_layer = static_cast<size_t>(c.n_kv_heads) * max_context_ * hd;
  const float* kc = k_cache_.data() + layer * per_layer;
  const float* vc = v_cache_.data() + layer * per_layer;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // Queries go in chunks so that each chunk only scores the keys it can see (causal mask).
  const int64_t kChunk = attention_chunk_;
  const int max_ctx = position_ + static_cast<int>(n);
  std::vector<float> scores(static_cast<size_t>(std::min(n, kChunk)) * max_ctx);
  const int group = c.n_heads / c.n_kv_heads;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t rows = std::min(kChunk, n - i0);
    const int ctx = position_ + static_cast<int>(i0 + rows);
    for (int h = 0; h < c.n_heads; ++h) {
      const int kvh = h / group;
      const float* k = kc + static_cast<size_t>(kvh) * max_context_ * hd;
      const float* v = vc + static_cast<size_t>(kvh) * max_context_ * hd;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), ctx, hd, scale,
                  qkv + i0 * stride + h * hd, static_cast<int>(stride), k, hd, 0.0f, scores.data(), ctx);
#pragma omp parallel for schedule(static) if (rows > 1)
      for (int64_t i = 0; i < rows; ++i) {
        float* row = scores.data() + i * ctx;
        const int visible = position_ + static_cast<int>(i0 + i) + 1;  // causal: keys 0 .. own position
        float mx = -INFINITY;
        for (int j = 0; j < visible; ++j) mx = std::max(mx, row[j]);
        double sum = 0;
        for (int j = 0; j < visible; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (int j = 0; j < visible; ++j) row[j] *= inv;
        for (int j = visible; j < ctx; ++j) row[j] = 0.0f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows), hd, ctx, 1.0f, scores.data(), ctx,
                  v, hd, 0.0f, out + i0 * q_dim + h * hd, q_dim);
    }
  }
}

void CpuRuntime::truncate(int position) {
  if (position < 0 || position > position_)
    throw std::out_of_range("cannot truncate the cache to " + std::to_string(position) + " tokens, it holds " +
                            std::to_string(position_));
  position_ = position;
}

void Runtime::forward(std::span<const int32_t> tokens, float* logits, bool all_logits) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  forward_last(tokens, logits, logits ? (all_logits ? n : std::min<int64_t>(n, 1)) : 0);
}

void check_token_ids(std::span<const int32_t> tokens, int vocab) {
  for (const int32_t t : tokens)
    if (t < 0 || t >= vocab) throw std::out_of_range("token id " + std::to_string(t) + " outside the vocabulary");
}

void Runtime::score(std::span<const int32_t> tokens, std::span<const int32_t> targets, double* logprob, bool* greedy) {
  const int vocab = config().vocab;
  const int64_t last = static_cast<int64_t>(targets.size());
  if (last > static_cast<int64_t>(tokens.size()))
    throw std::out_of_range(std::to_string(last) + " targets for " + std::to_string(tokens.size()) + " tokens");
  check_token_ids(targets, vocab);
  std::vector<float> logits(static_cast<size_t>(last) * vocab);
  forward_last(tokens, logits.data(), last);
#pragma omp parallel for schedule(static) if (last > 1)
  for (int64_t t = 0; t < last; ++t) {
    const float* row = logits.data() + t * vocab;
    int arg = 0;
    for (int v = 1; v < vocab; ++v)
      if (row[v] > row[arg]) arg = v;
    const double mx = row[arg];
    double sum = 0.0;
    for (int v = 0; v < vocab; ++v) sum += std::exp(double(row[v]) - mx);
    logprob[t] = double(row[targets[t]]) - mx - std::log(sum);
    greedy[t] = arg == targets[t];
  }
}

void CpuRuntime::forward_last(std::span<const int32_t> tokens, float* logits, int64_t last) {
  const auto& c = w_.config;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (last < 0 || last > n)
    throw std::out_of_range("logits requested for " + std::to_string(last) + " of " + std::to_string(n) + " tokens");
  if (n == 0) return;
  if (position_ + n > max_context_)
    throw std::length_error("context overflow: " + std::to_string(position_ + n) + " tokens > " +
                            std::to_string(max_context_));
  const int64_t H = c.hidden, q_dim = c.q_dim(), kv_dim = c.kv_dim(), F = c.ffn;
  const int64_t qkv_dim = q_dim + 2 * kv_dim;
  std::vector<float> x(n * H), xn(n * H), qkv(n * qkv_dim), attn(n * q_dim), gate_up(n * 2 * F), act(n * F);
  check_token_ids(tokens, c.vocab);
  for (int64_t t = 0; t < n; ++t) {
    std::copy_n(w_.token_embedding.data() + static_cast<int64_t>(tokens[t]) * H, H, x.data() + t * H);
  }
  const size_t per_layer = static_cast<size_t>(c.n_kv_heads) * max_context_ * c.head_dim;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w_.layers[l];
    rms_norm(x.data(), L.attn_norm.data(), xn.data(), n, H, c.rms_eps);
    if (hook_) hook_(l, LinearSlot::QKV, xn.data(), n, H);
    linear_forward(L.slot(LinearSlot::QKV), xn.data(), n, qkv.data(), false);
#pragma omp parallel for schedule(static) if (n > 1)
    for (int64_t t = 0; t < n; ++t) {
      float* row = qkv.data() + t * qkv_dim;
      const int pos = position_ + static_cast<int>(t);
      for (int h = 0; h < c.n_heads; ++h) apply_rope(row + h * c.head_dim, c.head_dim, c.rope_neox, rope_inv_freq_.data(), pos);
      for (int h = 0; h < c.n_kv_heads; ++h) {
        float* k = row + q_dim + h * c.head_dim;
        apply_rope(k, c.head_dim, c.rope_neox, rope_inv_freq_.data(), pos);
        const size_t at = l * per_layer + (static_cast<size_t>(h) * max_context_ + pos) * c.head_dim;
        std::copy_n(k, c.head_dim, k_cache_.data() + at);
        std::copy_n(row + q_dim + kv_dim + h * c.head_dim, c.head_dim, v_cache_.data() + at);
      }
    }
    attention(l, qkv.data(), n, attn.data());
    if (hook_) hook_(l, LinearSlot::O, attn.data(), n, q_dim);
    linear_forward(L.slot(LinearSlot::O), attn.data(), n, x.data(), true);

    rms_norm(x.data(), L.ffn_norm.data(), xn.data(), n, H, c.rms_eps);
    if (hook_) hook_(l, LinearSlot::GateUp, xn.data(), n, H);
    linear_forward(L.slot(LinearSlot::GateUp), xn.data(), n, gate_up.data(), false);
#pragma omp parallel for schedule(static) if (n > 1)
    for (int64_t t = 0; t < n; ++t) {
      const float* g = gate_up.data() + t * 2 * F;
      const float* u = g + F;
      float* a = act.data() + t * F;
      for (int64_t i = 0; i < F; ++i) a[i] = swiglu(g[i], u[i]);
    }
    if (hook_) hook_(l, LinearSlot::Down, act.data(), n, F);
    linear_forward(L.slot(LinearSlot::Down), act.data(), n, x.data(), true);
  }
  position_ += static_cast<int>(n);
  if (!logits || last == 0) return;
  const int64_t first = n - last, rows = last;
  rms_norm(x.data() + first * H, w_.output_norm.data(), xn.data(), rows, H, c.rms_eps);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), c.vocab, static_cast<int>(H), 1.0f,
              xn.data(), static_cast<int>(H), w_.lm_head_data(), static_cast<int>(H), 0.0f, logits, c.vocab);
}

}  // namespace micromix::model
