// Numerics follow transformers (Qwen2RMSNorm, default rotary embedding, SiLU MLP): RMSNorm in
// float32 then cast back before the weight; cos/sin from float32 positions * inv_freq, cast to
// the activation dtype; projections with at::linear (what nn.Linear calls).
#include "runtime/model.h"

#include <cmath>
#include <set>
#include <stdexcept>

#include "runtime/safetensors.h"

namespace mage::runtime {
namespace {

// Takes a weight out of the map (so leftovers can be reported) and checks its shape.
class WeightTaker {
 public:
  WeightTaker(TensorMap weights, std::string dir, at::ScalarType dtype)
      : w_(std::move(weights)), dir_(std::move(dir)), dtype_(dtype) {}

  at::Tensor take(const std::string& name, std::vector<int64_t> shape, bool required = true) {
    auto it = w_.find(name);
    if (it == w_.end()) {
      if (required) throw std::runtime_error(dir_ + ": weight '" + name + "' is missing");
      return {};
    }
    at::Tensor t = it->second;
    w_.erase(it);
    if (t.sizes() != at::IntArrayRef(shape))
      throw std::runtime_error(dir_ + ": weight '" + name + "' has shape " + c10::str(t.sizes()) +
                               ", expected " + c10::str(at::IntArrayRef(shape)) +
                               " (from config.json)");
    return t.to(dtype_).contiguous();
  }

  void expect_empty() const {
    if (!w_.empty())
      throw std::runtime_error(dir_ + ": tensor '" + w_.begin()->first +
                               "' is not a weight of the model (" + std::to_string(w_.size()) +
                               " unknown tensor(s))");
  }

 private:
  TensorMap w_;
  std::string dir_;
  at::ScalarType dtype_;
};

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return at::cat({-x.slice(-1, h), x.slice(-1, 0, h)}, -1);
}

at::Tensor project(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b = {}) {
  return at::linear(x, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt);
}

}  // namespace

QwenModel QwenModel::load(const std::string& dir, at::ScalarType dtype) {
  QwenModel m;
  m.config_ = load_config(dir);
  m.dtype_ = dtype;
  const ModelConfig& c = m.config_;
  WeightTaker w(load_checkpoint_weights(dir), dir, dtype);
  const int64_t h = c.hidden_size, d = c.head_dim, inter = c.intermediate_size;
  const int64_t qdim = c.num_heads * d, kvdim = c.num_kv_heads * d;
  m.embed_ = w.take("model.embed_tokens.weight", {c.vocab_size, h});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Layer L;
    L.input_norm = w.take(p + "input_layernorm.weight", {h});
    L.post_norm = w.take(p + "post_attention_layernorm.weight", {h});
    L.q_w = w.take(p + "self_attn.q_proj.weight", {qdim, h});
    L.k_w = w.take(p + "self_attn.k_proj.weight", {kvdim, h});
    L.v_w = w.take(p + "self_attn.v_proj.weight", {kvdim, h});
    L.o_w = w.take(p + "self_attn.o_proj.weight", {h, qdim});
    const bool bias = !c.qk_norm;  // Qwen2 has q/k/v biases; Qwen3 has none unless configured
    L.q_b = w.take(p + "self_attn.q_proj.bias", {qdim}, bias);
    L.k_b = w.take(p + "self_attn.k_proj.bias", {kvdim}, bias);
    L.v_b = w.take(p + "self_attn.v_proj.bias", {kvdim}, bias);
    if (c.qk_norm) {
      L.q_norm = w.take(p + "self_attn.q_norm.weight", {d});
      L.k_norm = w.take(p + "self_attn.k_norm.weight", {d});
    }
    L.gate_w = w.take(p + "mlp.gate_proj.weight", {inter, h});
    L.up_w = w.take(p + "mlp.up_proj.weight", {inter, h});
    L.down_w = w.take(p + "mlp.down_proj.weight", {h, inter});
    m.layers_.push_back(std::move(L));
  }
  m.final_norm_ = w.take("model.norm.weight", {h});
  at::Tensor head = w.take("lm_head.weight", {c.vocab_size, h}, !c.tie_word_embeddings);
  m.lm_head_ = c.tie_word_embeddings ? m.embed_ : head;
  w.expect_empty();
  // inv_freq = 1 / theta^(arange(0, d, 2) / d) in float32, as compute_default_rope_parameters.
  at::Tensor expo = at::arange(0, d, 2, at::TensorOptions().dtype(at::kFloat)) / d;
  m.inv_freq_ = at::pow(c.rope_theta, expo).reciprocal() * 1.0;
  return m;
}

at::Tensor QwenModel::rms_norm(const at::Tensor& x, const at::Tensor& weight) const {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(var + config_.rms_norm_eps);
  return weight * h.to(x.scalar_type());
}

at::Tensor QwenModel::attention(const Layer& w, int64_t layer, const at::Tensor& x,
                                const at::Tensor& cos, const at::Tensor& sin,
                                KVCache& cache) const {
  const int64_t batch = x.size(0), len = x.size(1), d = config_.head_dim;
  auto heads = [&](const at::Tensor& t, const at::Tensor& norm) {
    at::Tensor v = t.view({batch, len, -1, d});
    if (norm.defined()) v = rms_norm(v, norm);
    return v.transpose(1, 2);
  };
  at::Tensor q = heads(project(x, w.q_w, w.q_b), w.q_norm);
  at::Tensor k = heads(project(x, w.k_w, w.k_b), w.k_norm);
  at::Tensor v = heads(project(x, w.v_w, w.v_b), at::Tensor());
  q = (q * cos) + (rotate_half(q) * sin);
  k = (k * cos) + (rotate_half(k) * sin);
  const double scale = std::pow(static_cast<double>(d), -0.5);
  at::Tensor out = cache.attend(layer, q.contiguous(), k.contiguous(), v.contiguous(), scale);
  out = out.transpose(1, 2).reshape({batch, len, -1}).contiguous();
  return project(out, w.o_w);
}

at::Tensor QwenModel::forward(const at::Tensor& ids, const at::Tensor& positions, KVCache& cache,
                              bool last_only) const {
  at::Tensor x = at::embedding(embed_, ids);
  // Rotary tables [batch, 1, B, d]: float32 math, then the activation dtype.
  at::Tensor freqs = positions.unsqueeze(-1).to(at::kFloat) * inv_freq_;
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  at::Tensor cos = (emb.cos() * 1.0).to(x.scalar_type()).unsqueeze(1);
  at::Tensor sin = (emb.sin() * 1.0).to(x.scalar_type()).unsqueeze(1);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& w = layers_[l];
    at::Tensor h = attention(w, static_cast<int64_t>(l), rms_norm(x, w.input_norm), cos, sin, cache);
    x = x + h;
    at::Tensor n = rms_norm(x, w.post_norm);
    x = x + project(at::silu(project(n, w.gate_w)) * project(n, w.up_w), w.down_w);
  }
  x = rms_norm(x, final_norm_);
  if (last_only) x = x.slice(1, x.size(1) - 1);
  return project(x, lm_head_).to(at::kFloat);
}

}  // namespace mage::runtime
