// CUDA entry points of the fused layer ops (rms_norm, qkv_rope, silu_mul): the checks shared
// with the CPU kernels (ops/checks.h), the row-sum order of torch's reduction for the shapes
// transformers would reduce (ops/sum_order.h), and one kernel launch on the current stream.
// Nothing is allocated for contiguous inputs and nothing synchronises with the host, so the
// *_out forms can be captured in CUDA graphs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/fused_args.h"
#include "cuda/host_utils.h"
#include "ops/checks.h"
#include "ops/sum_order.h"

namespace mage::cuda {
namespace {

using T = const at::Tensor&;
using OptT = const std::optional<at::Tensor>&;

// torch's order and mean factor for the rows transformers reduces: `rows` rows of n elements.
void set_sum_order(int64_t rows, int64_t n, SumOrder* order, float* factor) {
  *order = torch_mean_order(rows, n);
  // Rows are limited to kMaxFusedRow elements (ops/checks.cpp), where torch never splits a
  // row across CTAs (tests/cpp/test_sum_order.cpp).
  TORCH_CHECK(!order->cta_split, "mage: internal error: torch's row sum for ", rows, " x ", n,
              " spans CTAs, which the fused kernels do not reproduce");
  *factor = torch_mean_factor(rows, n);
}

void rms_norm_out(T x_in, T weight_in, double eps, OptT residual_in, T out, T residual_out) {
  const char* op = "mage.rms_norm";
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto d = check_rms_norm_inputs(op, x_in, weight_in, residual_in, eps);
  check_rms_norm_outputs(op, x_in, out, residual_out);
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto residual = residual_in.has_value() ? residual_in->contiguous() : at::Tensor();
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"x", &x},
                         {"weight", &weight}, {"out", &out}, {"residual_out", &residual_out}}) {
    check_aligned(op, name, *t);
  }
  if (residual.defined()) check_aligned(op, "residual", residual);
  if (d.rows == 0) return;
  RmsNormArgs a;
  a.x = x.data_ptr();
  a.residual = residual.defined() ? residual.data_ptr() : nullptr;
  a.weight = weight.data_ptr();
  a.out = out.data_ptr();
  a.residual_out = residual_out.data_ptr();
  a.rows = d.rows;
  a.n = static_cast<int>(d.hidden);
  a.eps = static_cast<float>(eps);
  set_sum_order(d.rows, d.hidden, &a.order, &a.mean_factor);
  C10_CUDA_CHECK(launch_rms_norm(dtype_of(x), a, at::cuda::getCurrentCUDAStream()));
}

void qkv_rope_out(T qkv_in, T positions_in, T inv_freq_in, int64_t n_q_heads, int64_t n_kv_heads,
                  int64_t head_dim, OptT q_norm_weight, OptT k_norm_weight, double eps, T q, T k,
                  T v) {
  const char* op = "mage.qkv_rope";
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const auto d = check_qkv_rope_inputs(op, qkv_in, positions_in, inv_freq_in, n_q_heads,
                                       n_kv_heads, head_dim, q_norm_weight, k_norm_weight, eps);
  check_qkv_rope_outputs(op, d, qkv_in, q, k, v);
  const auto qkv = qkv_in.contiguous();
  const auto positions = positions_in.contiguous();
  const auto inv_freq = inv_freq_in.contiguous();
  const auto qw = d.qk_norm ? q_norm_weight->contiguous() : at::Tensor();
  const auto kw = d.qk_norm ? k_norm_weight->contiguous() : at::Tensor();
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"qkv", &qkv}, {"q", &q},
                         {"k", &k}, {"v", &v}}) {
    check_aligned(op, name, *t);
  }
  if (d.qk_norm) {
    check_aligned(op, "q_norm_weight", qw);
    check_aligned(op, "k_norm_weight", kw);
  }
  QkvRopeArgs a;
  a.qkv = qkv.data_ptr();
  a.positions = positions.data_ptr<int64_t>();
  a.inv_freq = inv_freq.data_ptr<float>();
  a.q_norm_weight = d.qk_norm ? qw.data_ptr() : nullptr;
  a.k_norm_weight = d.qk_norm ? kw.data_ptr() : nullptr;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.batch = static_cast<int>(d.batch);
  a.block = static_cast<int>(d.block);
  a.hq = static_cast<int>(d.hq);
  a.hkv = static_cast<int>(d.hkv);
  a.dim = static_cast<int>(d.dim);
  a.eps = static_cast<float>(eps);
  // transformers norms q as [batch, B, Hq, d] and k as [batch, B, Hkv, d].
  const int64_t tokens = d.batch * d.block;
  set_sum_order(tokens * d.hq, d.dim, &a.q_order, &a.q_mean_factor);
  set_sum_order(tokens * d.hkv, d.dim, &a.k_order, &a.k_mean_factor);
  C10_CUDA_CHECK(launch_qkv_rope(dtype_of(qkv), a, at::cuda::getCurrentCUDAStream()));
}

void silu_mul_out(T gate_up_in, T out) {
  const char* op = "mage.silu_mul";
  const c10::cuda::CUDAGuard guard(gate_up_in.device());
  const auto d = check_silu_mul_inputs(op, gate_up_in);
  check_silu_mul_outputs(op, gate_up_in, out);
  if (d.rows == 0) return;
  const auto gate_up = gate_up_in.contiguous();
  SiluMulArgs a;
  a.gate_up = gate_up.data_ptr();
  a.out = out.data_ptr();
  a.rows = d.rows;
  a.inter = static_cast<int>(d.inter);
  a.vec16 = is_aligned16(gate_up) && is_aligned16(out);
  C10_CUDA_CHECK(launch_silu_mul(dtype_of(gate_up), a, at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CUDA, m) {
  m.impl("rms_norm_out", &rms_norm_out);
  m.impl("qkv_rope_out", &qkv_rope_out);
  m.impl("silu_mul_out", &silu_mul_out);
}

}  // namespace mage::cuda
