// CPU kernels of the fused layer ops: the ATen op sequences of the transformers modules they
// replace (Qwen2RMSNorm, Qwen2/Qwen3 attention's q_norm / k_norm and rotary embedding,
// Qwen2MLP's act_fn(gate) * up), op for op and on tensors of the same shapes and layouts, so
// the results are those modules' results bit for bit. They define the ops' semantics; the CUDA
// kernels reproduce them.
#include <torch/library.h>

#include "ops/checks.h"

namespace mage::cpu {
namespace {

using T = const at::Tensor&;
using OptT = const std::optional<at::Tensor>&;

// Qwen2RMSNorm.forward (== Qwen3RMSNorm) on h [..., n].
at::Tensor rms_norm_module(T h, T weight, double eps) {
  auto hf = h.to(at::kFloat);
  const auto variance = hf.pow(2).mean(-1, /*keepdim=*/true);
  hf = hf * at::rsqrt(variance + eps);
  return weight * hf.to(h.scalar_type());
}

// transformers' rotate_half and apply_rotary_pos_emb for one tensor x [batch, H, B, d], with
// cos / sin [batch, 1, B, d].
at::Tensor rotate(T x, T cos, T sin) {
  const int64_t half = x.size(-1) / 2;
  const auto rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return (x * cos) + (rotated * sin);
}

void rms_norm_out(T x, T weight, double eps, OptT residual, T out, T residual_out) {
  const char* op = "mage.rms_norm";
  check_rms_norm_inputs(op, x, weight, residual, eps);
  check_rms_norm_outputs(op, x, out, residual_out);
  // The decoder layer's `hidden_states = residual + hidden_states`.
  const auto h = residual.has_value() ? *residual + x : x;
  const auto normed = rms_norm_module(h, weight, eps);
  residual_out.copy_(h);
  out.copy_(normed);
}

void qkv_rope_out(T qkv, T positions, T inv_freq, int64_t n_q_heads, int64_t n_kv_heads,
                  int64_t head_dim, OptT q_norm_weight, OptT k_norm_weight, double eps, T q_out,
                  T k_out, T v_out) {
  const char* op = "mage.qkv_rope";
  const auto d = check_qkv_rope_inputs(op, qkv, positions, inv_freq, n_q_heads, n_kv_heads,
                                       head_dim, q_norm_weight, k_norm_weight, eps);
  check_qkv_rope_outputs(op, d, qkv, q_out, k_out, v_out);
  // The separate q/k/v projections' outputs, [batch, B, H, d] and contiguous as theirs.
  auto heads = [&](int64_t first, int64_t count) {
    return qkv.narrow(-1, first * d.dim, count * d.dim)
        .contiguous()
        .view({d.batch, d.block, count, d.dim});
  };
  auto q = heads(0, d.hq);
  auto k = heads(d.hq, d.hkv);
  const auto v = heads(d.hq + d.hkv, d.hkv);
  if (d.qk_norm) {  // Qwen3: q_norm / k_norm before the transpose and the rotation
    q = rms_norm_module(q, *q_norm_weight, eps);
    k = rms_norm_module(k, *k_norm_weight, eps);
  }
  // Qwen2RotaryEmbedding.forward (attention_scaling is 1.0 for the default RoPE: its multiply
  // is the identity and skipped).
  const auto freqs = positions.unsqueeze(-1).to(at::kFloat) * inv_freq;
  const auto emb = at::cat({freqs, freqs}, -1);
  const auto cos = emb.cos().to(qkv.scalar_type()).unsqueeze(1);
  const auto sin = emb.sin().to(qkv.scalar_type()).unsqueeze(1);
  q_out.copy_(rotate(q.transpose(1, 2), cos, sin));
  k_out.copy_(rotate(k.transpose(1, 2), cos, sin));
  v_out.copy_(v.transpose(1, 2));
}

void silu_mul_out(T gate_up, T out) {
  const char* op = "mage.silu_mul";
  const auto d = check_silu_mul_inputs(op, gate_up);
  check_silu_mul_outputs(op, gate_up, out);
  // gate_proj(x) and up_proj(x) are separate contiguous tensors in Qwen2MLP: the same layout
  // gives the same vectorised / scalar split of silu's loop.
  const auto gate = gate_up.narrow(-1, 0, d.inter).contiguous();
  const auto up = gate_up.narrow(-1, d.inter, d.inter).contiguous();
  out.copy_(at::silu(gate) * up);
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CPU, m) {
  m.impl("rms_norm_out", &rms_norm_out);
  m.impl("qkv_rope_out", &qkv_rope_out);
  m.impl("silu_mul_out", &silu_mul_out);
}

}  // namespace mage::cpu
