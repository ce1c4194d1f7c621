// Per-step decoding rules of block diffusion (greedy), the C++ counterpart of
// mage_ext/decoding.py: which [MASK] positions a denoising step fills.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

namespace mage::runtime {

// fast_dllm: token shift, sub-blocks filled by the threshold rule. sdar: no shift, `steps`
// steps per block with the low-confidence rules.
enum class Style { FastDllm, Sdar };
enum class Remasking { Static, Dynamic };

// Names as in Python (fast_dllm|sdar, low_confidence_static|low_confidence_dynamic);
// std::invalid_argument listing the accepted names otherwise (the caller adds which option).
Style parse_style(const std::string& name);
Remasking parse_remasking(const std::string& name);

// Greedy token and its probability per position: logits [..., V] -> ([...], [...]).
std::pair<at::Tensor, at::Tensor> greedy(const at::Tensor& logits);

// Fast-dLLM v2: masked positions with p > threshold, plus the most confident masked one.
at::Tensor threshold_unmask(const at::Tensor& probs, const at::Tensor& masked, double threshold);

// SDAR: tokens to fill per step, block_size split evenly, the remainder to the first steps.
std::vector<int64_t> transfer_schedule(int64_t block_size, int64_t steps);

// SDAR, per row: static fills the n most confident masked positions; dynamic fills every masked
// position with p > threshold when there are at least n of them, else as static.
at::Tensor low_confidence_unmask(const at::Tensor& probs, const at::Tensor& masked, int64_t n,
                                 Remasking rule, double threshold);

}  // namespace mage::runtime
