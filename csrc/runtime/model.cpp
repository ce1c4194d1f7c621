// Numerics follow transformers (Qwen2RMSNorm, default rotary embedding, SiLU MLP): RMSNorm in
// float32 then cast back before the weight; cos/sin from float32 positions * inv_freq, cast to
// the activation dtype; projections with at::linear (what nn.Linear calls).
#include "runtime/model.h"

#include <cmath>
#include <map>
#include <stdexcept>

#include "runtime/safetensors.h"

namespace mage::runtime {
namespace {

// Where each checkpoint tensor goes: its expected shape (from config.json) and the member it
// fills. Shapes are checked against the header before any byte is copied.
struct Slot {
  std::vector<int64_t> shape;
  bool required;
  at::Tensor* dst;
};

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return at::cat({-x.slice(-1, h), x.slice(-1, 0, h)}, -1);
}

at::Tensor project(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b = {}) {
  return at::linear(x, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt);
}

}  // namespace

QwenModel QwenModel::load(const std::string& dir, at::ScalarType dtype, at::Device device) {
  QwenModel m;
  m.config_ = load_config(dir);
  m.dtype_ = dtype;
  m.device_ = device;
  const ModelConfig& c = m.config_;
  const int64_t h = c.hidden_size, d = c.head_dim, inter = c.intermediate_size;
  const int64_t qdim = c.num_heads * d, kvdim = c.num_kv_heads * d;
  m.layers_.resize(c.num_layers);  // sized first: the slots point into it
  at::Tensor lm_head;
  std::map<std::string, Slot> slots;
  auto want = [&](const std::string& name, std::vector<int64_t> shape, at::Tensor* dst,
                  bool required = true) { slots[name] = Slot{std::move(shape), required, dst}; };
  want("model.embed_tokens.weight", {c.vocab_size, h}, &m.embed_);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Layer& L = m.layers_[l];
    want(p + "input_layernorm.weight", {h}, &L.input_norm);
    want(p + "post_attention_layernorm.weight", {h}, &L.post_norm);
    want(p + "self_attn.q_proj.weight", {qdim, h}, &L.q_w);
    want(p + "self_attn.k_proj.weight", {kvdim, h}, &L.k_w);
    want(p + "self_attn.v_proj.weight", {kvdim, h}, &L.v_w);
    want(p + "self_attn.o_proj.weight", {h, qdim}, &L.o_w);
    const bool bias = !c.qk_norm;  // Qwen2 has q/k/v biases; Qwen3 has none unless configured
    want(p + "self_attn.q_proj.bias", {qdim}, &L.q_b, bias);
    want(p + "self_attn.k_proj.bias", {kvdim}, &L.k_b, bias);
    want(p + "self_attn.v_proj.bias", {kvdim}, &L.v_b, bias);
    if (c.qk_norm) {
      want(p + "self_attn.q_norm.weight", {d}, &L.q_norm);
      want(p + "self_attn.k_norm.weight", {d}, &L.k_norm);
    }
    want(p + "mlp.gate_proj.weight", {inter, h}, &L.gate_w);
    want(p + "mlp.up_proj.weight", {inter, h}, &L.up_w);
    want(p + "mlp.down_proj.weight", {h, inter}, &L.down_w);
  }
  want("model.norm.weight", {h}, &m.final_norm_);
  want("lm_head.weight", {c.vocab_size, h}, &lm_head, !c.tie_word_embeddings);

  const auto options = at::TensorOptions().dtype(dtype).device(device);
  visit_checkpoint(dir, [&](const std::string& file, const std::string& name, const at::Tensor& view) {
    auto it = slots.find(name);
    if (it == slots.end())
      throw std::runtime_error(file + ": tensor '" + name + "' is not a weight of the model");
    if (view.sizes() != at::IntArrayRef(it->second.shape))
      throw std::runtime_error(file + ": weight '" + name + "' has shape " + c10::str(view.sizes()) +
                               ", expected " + c10::str(at::IntArrayRef(it->second.shape)) +
                               " (from config.json)");
    *it->second.dst = copy_to(view, options);
  });
  for (const auto& [name, slot] : slots)
    if (slot.required && !slot.dst->defined())
      throw std::runtime_error(dir + ": weight '" + name + "' is missing");
  m.lm_head_ = c.tie_word_embeddings ? m.embed_ : lm_head;
  // inv_freq = 1 / theta^(arange(0, d, 2) / d) in float32, as compute_default_rope_parameters.
  at::Tensor expo = at::arange(0, d, 2, at::TensorOptions().dtype(at::kFloat)) / d;
  m.inv_freq_ = (at::pow(c.rope_theta, expo).reciprocal() * 1.0).to(device);
  return m;
}

at::Tensor QwenModel::embed(const at::Tensor& ids) const { return at::embedding(embed_, ids); }

QwenModel::Rotary QwenModel::rotary(const at::Tensor& positions, at::ScalarType dtype) const {
  // Rotary tables [batch, 1, B, d]: float32 math, then the activation dtype.
  at::Tensor freqs = positions.unsqueeze(-1).to(at::kFloat) * inv_freq_;
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {(emb.cos() * 1.0).to(dtype).unsqueeze(1), (emb.sin() * 1.0).to(dtype).unsqueeze(1)};
}

at::Tensor QwenModel::rms_norm(const at::Tensor& x, const at::Tensor& weight) const {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(var + config_.rms_norm_eps);
  return weight * h.to(x.scalar_type());
}

std::pair<at::Tensor, at::Tensor> QwenModel::add_rms_norm(const at::Tensor& residual,
                                                          const at::Tensor& delta,
                                                          const at::Tensor& weight) const {
  at::Tensor sum = residual + delta;
  return {sum, rms_norm(sum, weight)};
}

QwenModel::QKV QwenModel::qkv_rope(const Layer& w, const at::Tensor& x, const Rotary& rot) const {
  const int64_t batch = x.size(0), len = x.size(1), d = config_.head_dim;
  auto heads = [&](const at::Tensor& t, const at::Tensor& norm) {
    at::Tensor v = t.view({batch, len, -1, d});
    if (norm.defined()) v = rms_norm(v, norm);
    return v.transpose(1, 2);
  };
  at::Tensor q = heads(project(x, w.q_w, w.q_b), w.q_norm);
  at::Tensor k = heads(project(x, w.k_w, w.k_b), w.k_norm);
  at::Tensor v = heads(project(x, w.v_w, w.v_b), at::Tensor());
  q = (q * rot.cos) + (rotate_half(q) * rot.sin);
  k = (k * rot.cos) + (rotate_half(k) * rot.sin);
  return {q.contiguous(), k.contiguous(), v.contiguous()};
}

at::Tensor QwenModel::output_projection(const Layer& w, const at::Tensor& attn) const {
  const int64_t batch = attn.size(0), len = attn.size(2);
  return project(attn.transpose(1, 2).reshape({batch, len, -1}).contiguous(), w.o_w);
}

at::Tensor QwenModel::mlp(const Layer& w, const at::Tensor& x) const {
  return project(at::silu(project(x, w.gate_w)) * project(x, w.up_w), w.down_w);
}

at::Tensor QwenModel::head(const at::Tensor& x, bool last_only, const at::Tensor& keep) const {
  at::Tensor h = keep.defined() ? x.gather(1, keep.view({-1, 1, 1}).expand({-1, 1, x.size(2)}))
                 : last_only    ? x.slice(1, x.size(1) - 1)
                                : x;
  return project(h, lm_head_).to(at::kFloat);
}

at::Tensor QwenModel::forward(const at::Tensor& ids, const at::Tensor& positions, KVCache& cache,
                              bool last_only, const at::Tensor& keep) const {
  at::Tensor x = embed(ids);
  const Rotary rot = rotary(positions, x.scalar_type());
  const double scale = std::pow(static_cast<double>(config_.head_dim), -0.5);
  at::Tensor normed = rms_norm(x, layers_.front().input_norm);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& w = layers_[l];
    QKV a = qkv_rope(w, normed, rot);
    at::Tensor attn = cache.attend(static_cast<int64_t>(l), a.q, a.k, a.v, scale);
    std::tie(x, normed) = add_rms_norm(x, output_projection(w, attn), w.post_norm);
    // The next layer's input norm, or the final norm, fused with this layer's residual add.
    const at::Tensor& next = l + 1 < layers_.size() ? layers_[l + 1].input_norm : final_norm_;
    std::tie(x, normed) = add_rms_norm(x, mlp(w, normed), next);
  }
  return head(normed, last_only, keep);
}

}  // namespace mage::runtime
