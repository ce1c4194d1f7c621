// Per-step decoding rules of block diffusion, the C++ counterpart of mage_ext/core/decoding.py:
// sampling (greedy or temperature / top-p) and which [MASK] positions a denoising step fills.
// Pure tensor ops on the logits' device: none reads a value back to the host.
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

// Token and its probability per position, as decoding.sample: temperature 0 is greedy;
// otherwise nucleus sampling over softmax(logits / temperature) restricted to the smallest
// top-p set, drawn with `generator` (the same ops in the same order as Python, so a generator
// seeded alike draws the same tokens).
std::pair<at::Tensor, at::Tensor> sample(const at::Tensor& logits, double temperature,
                                         double top_p, const at::Generator& generator);

// Fast-dLLM v2: masked positions with p > threshold, plus the most confident masked one.
at::Tensor threshold_unmask(const at::Tensor& probs, const at::Tensor& masked, double threshold);

// Fast-Dllm v2 step (mage_ext/core/decoding.fast_dllm_unmask): the threshold rule inside each
// row's first sub-block that still holds a [MASK]; rows advance through their sub-blocks
// independently, so a row's tokens do not depend on its batch mates.
at::Tensor fast_dllm_unmask(const at::Tensor& probs, const at::Tensor& masked, int64_t sub_block,
                            double threshold);

// SDAR: tokens to fill per step, block_size split evenly, the remainder to the first steps.
std::vector<int64_t> transfer_schedule(int64_t block_size, int64_t steps);

// SDAR, per row: static fills the n most confident masked positions; dynamic fills every masked
// position with p > threshold when there are at least n of them, else as static. All rows at
// once (the same positions as Python's per-row loop).
at::Tensor low_confidence_unmask(const at::Tensor& probs, const at::Tensor& masked, int64_t n,
                                 Remasking rule, double threshold);

}  // namespace mage::runtime
