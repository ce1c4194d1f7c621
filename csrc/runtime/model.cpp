// The forward of mage_ext/hf/fast_forward.py (the Python fast path) on the same fused ops
// (mage/ops.h: rms_norm with the residual add, qkv_rope, silu_mul; CPU and CUDA kernels that
// give transformers' Qwen2 / Qwen3 rounding), one QKV GEMM and one gate|up GEMM per layer, every
// GEMM through mage::linear (cuBLAS, or the experimental few-row kernel: MAGE_SKINNY_GEMM=on).
#include "runtime/model.h"

#include <cmath>
#include <map>
#include <stdexcept>

#include "mage/ops.h"
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
  std::vector<Parts> parts(c.num_layers);
  at::Tensor lm_head;
  std::map<std::string, Slot> slots;
  auto want = [&](const std::string& name, std::vector<int64_t> shape, at::Tensor* dst,
                  bool required = true) { slots[name] = Slot{std::move(shape), required, dst}; };
  want("model.embed_tokens.weight", {c.vocab_size, h}, &m.embed_);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Layer& L = m.layers_[l];
    Parts& P = parts[l];
    want(p + "input_layernorm.weight", {h}, &L.input_norm);
    want(p + "post_attention_layernorm.weight", {h}, &L.post_norm);
    want(p + "self_attn.q_proj.weight", {qdim, h}, &P.q_w);
    want(p + "self_attn.k_proj.weight", {kvdim, h}, &P.k_w);
    want(p + "self_attn.v_proj.weight", {kvdim, h}, &P.v_w);
    want(p + "self_attn.o_proj.weight", {h, qdim}, &L.o_w);
    const bool bias = !c.qk_norm;  // Qwen2 has q/k/v biases; Qwen3 has none unless configured
    want(p + "self_attn.q_proj.bias", {qdim}, &P.q_b, bias);
    want(p + "self_attn.k_proj.bias", {kvdim}, &P.k_b, bias);
    want(p + "self_attn.v_proj.bias", {kvdim}, &P.v_b, bias);
    if (c.qk_norm) {
      want(p + "self_attn.q_norm.weight", {d}, &L.q_norm);
      want(p + "self_attn.k_norm.weight", {d}, &L.k_norm);
    }
    want(p + "mlp.gate_proj.weight", {inter, h}, &P.gate_w);
    want(p + "mlp.up_proj.weight", {inter, h}, &P.up_w);
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
  for (int64_t l = 0; l < c.num_layers; ++l) {  // the fused weights; the halves are freed
    Parts& P = parts[l];
    Layer& L = m.layers_[l];
    L.qkv_w = at::cat({P.q_w, P.k_w, P.v_w});
    if (P.q_b.defined() || P.k_b.defined() || P.v_b.defined()) {  // a missing one is zeros
      auto or_zeros = [&](const at::Tensor& b, int64_t n) {
        return b.defined() ? b : at::zeros({n}, options);
      };
      L.qkv_b = at::cat({or_zeros(P.q_b, qdim), or_zeros(P.k_b, kvdim), or_zeros(P.v_b, kvdim)});
    }
    L.gate_up_w = at::cat({P.gate_w, P.up_w});
    P = Parts();
  }
  // inv_freq = 1 / theta^(arange(0, d, 2) / d) in float32, as compute_default_rope_parameters.
  at::Tensor expo = at::arange(0, d, 2, at::TensorOptions().dtype(at::kFloat)) / d;
  m.inv_freq_ = (at::pow(c.rope_theta, expo).reciprocal() * 1.0).to(device);
  return m;
}

at::Tensor QwenModel::head(const at::Tensor& x, const at::Tensor& residual, bool last_only,
                           const at::Tensor& keep) const {
  // The final norm is per position: only the positions whose logits are wanted.
  auto pick = [&](const at::Tensor& t) {
    if (keep.defined()) return t.gather(1, keep.view({-1, 1, 1}).expand({-1, 1, t.size(2)}));
    return last_only ? t.slice(1, t.size(1) - 1) : t;
  };
  at::Tensor h = std::get<0>(mage::rms_norm(pick(x), final_norm_, config_.rms_norm_eps,
                                            pick(residual)));
  return mage::linear(h, lm_head_).to(at::kFloat);
}

at::Tensor QwenModel::forward(const at::Tensor& ids, const at::Tensor& positions, KVCache& cache,
                              bool last_only, const at::Tensor& keep) const {
  const ModelConfig& c = config_;
  const int64_t batch = ids.size(0), n = ids.size(1), d = c.head_dim;
  const double eps = c.rms_norm_eps, scale = std::pow(static_cast<double>(d), -0.5);
  auto if_defined = [](const at::Tensor& t) {  // an absent weight (no bias, no q/k norm)
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  };
  at::Tensor x = at::embedding(embed_, ids), residual;
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& w = layers_[l];
    auto [h, res] = mage::rms_norm(x, w.input_norm, eps, if_defined(residual));
    at::Tensor qkv = mage::linear(h, w.qkv_w, if_defined(w.qkv_b));
    auto [q, k, v] = mage::qkv_rope(qkv, positions, inv_freq_, c.num_heads, c.num_kv_heads, d,
                                    if_defined(w.q_norm), if_defined(w.k_norm), eps);
    at::Tensor a = cache.attend(static_cast<int64_t>(l), q, k, v, scale);  // [batch, Hq, n, d]
    x = mage::linear(a.transpose(1, 2).reshape({batch, n, c.num_heads * d}), w.o_w);
    std::tie(h, residual) = mage::rms_norm(x, w.post_norm, eps, res);
    x = mage::linear(mage::silu_mul(mage::linear(h, w.gate_up_w)), w.down_w);
  }
  return head(x, residual, last_only, keep);
}

}  // namespace mage::runtime
