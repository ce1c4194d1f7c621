// Block-diffusion generation (greedy), the loop of mage_ext/generate.py for one sequence: the
// prompt's full blocks are prefilled (dense, block-causal), the remainder heads the first block;
// each block is denoised, then one commit forward writes its KV.
// Fast-dLLM v2: sub-block by sub-block with the threshold rule on token-shifted logits; the
// prefill / commit forward yields the next block's first token.
// SDAR: no shift, `steps` steps per block (transfer_schedule) with the low-confidence rules;
// every block after the first starts all [MASK].
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "runtime/attention.h"
#include "runtime/decoding.h"
#include "runtime/model.h"

namespace mage::runtime {

struct GenerateOptions {
  Policy policy;
  int64_t max_new_tokens = 256;
  int64_t block_size = 0;      // 0: the checkpoint's
  std::optional<Style> style;  // unset: the checkpoint family's (config().family)
  int64_t sub_block = 8;       // Fast-dLLM v2
  double threshold = 0.9;      // Fast-dLLM v2 and SDAR low_confidence_dynamic
  int64_t steps = 4;           // SDAR: denoising steps per block, in [1, block_size]
  Remasking remasking = Remasking::Static;  // SDAR
};

struct StepTime {
  enum Kind { Prefill, FirstStep, LaterStep, Commit } kind;
  double seconds;
};

struct GenerateResult {
  std::vector<int64_t> tokens;  // generated ids, ending before the first stop id
  bool stopped = false;         // a stop id ended the sequence
  std::vector<StepTime> times;  // one per forward
  double kv_fraction = 1.0;     // share of the cache read by denoise/commit forwards
};

// Throws std::invalid_argument on bad options or prompt.
GenerateResult generate(const QwenModel& model, const std::vector<int64_t>& prompt,
                        const GenerateOptions& options);

}  // namespace mage::runtime
