// The precision of the ATen matmuls behind the generic attention code (block_attention's local
// part, every chunked-recompute backward): fp32 math (fp64 for fp64 inputs), and on CUDA for
// fp16 / bf16 inputs the tensor cores with the input dtype's operands, fp32 accumulation and
// output (bmm's out_dtype), as the fused kernels and FlashAttention's backward do (P and dS
// are rounded to the input dtype before their products). fp32 operands on a GPU would run on
// the CUDA cores (torch keeps TF32 off by default) at a fraction of the tensor-core rate.
#pragma once

#include <ATen/ATen.h>

#include "ops/checks.h"

namespace mage {

struct MatmulPrecision {
  at::ScalarType compute;  // accumulation and output dtype
  at::ScalarType operand;  // operand dtype: compute, or the input's fp16 / bf16 on CUDA

  explicit MatmulPrecision(const at::Tensor& like)
      : compute(lse_dtype(like.scalar_type())),
        operand(like.is_cuda() && (like.scalar_type() == at::kHalf ||
                                   like.scalar_type() == at::kBFloat16)
                    ? like.scalar_type()
                    : compute) {}

  at::Tensor op(const at::Tensor& t) const { return t.to(operand); }

  // [..., m, k] x [..., k, n] -> [..., m, n] of `compute` (equal leading dims, any strides).
  at::Tensor mm(const at::Tensor& a, const at::Tensor& b) const {
    if (operand == compute) return at::matmul(op(a), op(b));
    auto sizes = a.sizes().vec();
    sizes.back() = b.size(-1);
    return at::bmm(op(a).reshape({-1, a.size(-2), a.size(-1)}),
                   op(b).reshape({-1, b.size(-2), b.size(-1)}), compute)
        .view(sizes);
  }
};

}  // namespace mage
