// block_sparse_attention's backward through FlashAttention-2's variable-length backward (torch's
// at::_flash_attention_backward with cumulative sequence lengths), instead of the chunked ATen
// recompute (ops/block_sparse.cpp): a fused kernel keeps P and dS on chip. The packing of the
// (block, KV head) problems into variable-length sequences is ops/block_sparse_varlen.h's
// (tested on the CPU with a reference kernel); this file supplies the kernel.
//
// The default where it applies (fp16 / bf16, d % 8 == 0, d <= 256, sm80+, no dlse: training's
// loss does not read lse): on the H200 (benchmarks/bench_train_attention.py, 1.5B heads, fwd+bwd)
// 32K k 512 34.9 ms against the generic path's 42.0, k 2048 57.4 against 84.5, 8K k 512 5.6
// against 7.9 (blocks grouped, 2.3 GB peak at 32K). MAGE_SPARSE_BACKWARD=generic takes the
// chunked ATen recompute instead, and so does deterministic mode (flash adds dQ with atomics; the
// context's dK / dV are summed in a fixed order either way). Where it does not apply, or raises
// (unless MAGE_BLOCK_ATTENTION_STRICT=1; warned once), the generic path.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <string>

#include "ops/attention_backward.h"
#include "ops/block_sparse_varlen.h"
#include "ops/checks.h"

namespace mage::cuda {
namespace {

using at::Tensor;

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}

bool flash_applies(const Tensor& q) {
  const auto t = q.scalar_type();
  const auto* p = at::cuda::getCurrentDeviceProperties();
  return (t == at::kHalf || t == at::kBFloat16) && q.size(3) % 8 == 0 && q.size(3) <= 256 &&
         p->major >= 8;
}

// Rank of the lse the variable-length flash forward returns: 3 ([sequences, heads, max_q], older
// FlashAttention-2) or 2 ([heads, total_q], newer); its backward takes the same. Probed once.
int varlen_lse_rank(const Tensor& like) {
  static std::once_flag once;
  static int rank = 0;
  std::call_once(once, [&] {
    auto x = at::zeros({2, 1, 64}, like.options());
    auto cu = at::arange(0, 3, like.options().dtype(at::kInt));
    rank = static_cast<int>(
        std::get<1>(at::_flash_attention_forward(x, x, x, cu, cu, 1, 1, 0.0, false, false, 1.0))
            .dim());
  });
  return rank;
}

std::tuple<Tensor, Tensor, Tensor> flash_varlen_backward(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& cu_q, const Tensor& cu_k, int64_t max_q, int64_t max_k,
    double scale) {
  const auto no_rng = at::empty({}, q.options().dtype(at::kUInt64));
  auto r = at::_flash_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0,
                                         false, no_rng, no_rng, scale);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

AttentionGrads block_sparse_attention_backward(const Tensor& dout,
                                               const std::optional<Tensor>& dlse,
                                               const Tensor& q, const Tensor& k_ctx,
                                               const Tensor& v_ctx, const Tensor& indices,
                                               const Tensor& counts, const Tensor& k_own,
                                               const Tensor& v_own, const Tensor& out,
                                               const Tensor& lse, int64_t block_size,
                                               std::optional<double> scale) {
  auto generic = [&] {
    return block_sparse_attention_backward_generic(dout, dlse, q, k_ctx, v_ctx, indices, counts,
                                                   k_own, v_own, out, lse, block_size, scale);
  };
  const char* want = std::getenv("MAGE_SPARSE_BACKWARD");
  TORCH_CHECK(want == nullptr || env_is("MAGE_SPARSE_BACKWARD", "flash") ||
                  env_is("MAGE_SPARSE_BACKWARD", "generic"),
              "mage.block_sparse_attention_backward: MAGE_SPARSE_BACKWARD must be flash or "
              "generic, got '", want, "'");
  // FlashAttention-2 sums dQ over key blocks with atomics: under
  // torch.use_deterministic_algorithms(True) the generic path (sorted, fixed-order sums) runs.
  if (env_is("MAGE_SPARSE_BACKWARD", "generic") || dlse.has_value() || !flash_applies(q) ||
      at::globalContext().deterministicAlgorithms()) {
    return generic();
  }
  const char* op = "mage.block_sparse_attention_backward";
  const c10::cuda::CUDAGuard guard(q.device());
  const auto bd = check_block_sparse_inputs(op, q, k_ctx, v_ctx, indices, counts, k_own, v_own,
                                            block_size, scale);
  check_attention_grads(op, bd.dims, q, dout, dlse, out, lse);
  try {
    return block_sparse_backward_varlen(dout.contiguous(), q.contiguous(), k_ctx, v_ctx, indices,
                                        counts, k_own.contiguous(), v_own.contiguous(),
                                        out.contiguous(), lse.contiguous(), block_size, bd,
                                        flash_varlen_backward, varlen_lse_rank(q));
  } catch (const c10::Error& e) {
    const char* strict = std::getenv("MAGE_BLOCK_ATTENTION_STRICT");
    if (strict != nullptr && strict[0] != '\0' && strict[0] != '0') throw;
    TORCH_WARN_ONCE(op, ": the FlashAttention variable-length backward failed (",
                    e.what_without_backtrace(), "); using the generic ATen path instead");
    return generic();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CUDA, m) {
  m.impl("block_sparse_attention_backward", &block_sparse_attention_backward);
}

}  // namespace mage::cuda
