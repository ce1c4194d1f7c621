// Streaming (online) softmax over key chunks, in plain ATen: the running max, sum and weighted
// value sum of a set of query rows, updated chunk by chunk so memory stays bounded by one chunk
// whatever the key count. Device- and dtype-generic (the state takes the options it is given);
// shared by the CPU attention kernels and the generic block attention (ops/block_attention.h).
#pragma once

#include <ATen/ATen.h>

#include <limits>

namespace mage {

class OnlineSoftmax {
 public:
  // State of `rows` query rows for each of `heads` heads, value dim `dim`.
  OnlineSoftmax(int64_t heads, int64_t rows, int64_t dim, const at::TensorOptions& options) {
    max_ = at::full({heads, rows, 1}, -std::numeric_limits<double>::infinity(), options);
    sum_ = at::zeros({heads, rows, 1}, options);
    acc_ = at::zeros({heads, rows, dim}, options);
  }

  // Folds in a chunk: logits [heads, rows, C] (-inf where masked) and values [heads, C, d].
  void add(const at::Tensor& logits, const at::Tensor& values) {
    auto new_max = at::maximum(max_, std::get<0>(logits.max(-1, /*keepdim=*/true)));
    // Rows with nothing seen yet keep max -inf; use 0 there so exp() gives 0, not NaN.
    auto base = at::where(at::isinf(new_max), at::zeros_like(new_max), new_max);
    auto p = at::exp(logits - base);
    auto alpha = at::exp(max_ - base);
    sum_ = sum_ * alpha + p.sum(-1, /*keepdim=*/true);
    acc_ = acc_ * alpha + at::matmul(p, values);
    max_ = new_max;
  }

  at::Tensor output() const { return acc_ / sum_; }                      // [heads, rows, d]
  at::Tensor lse() const { return (max_ + at::log(sum_)).squeeze(-1); }  // [heads, rows]

 private:
  at::Tensor max_, sum_, acc_;
};

}  // namespace mage
