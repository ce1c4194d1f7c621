// Block-diffusion generation (greedy), the loop of mage_ext/generate.py: the
// prompt's full blocks are prefilled (dense, block-causal), the remainder heads the first block;
// each block is denoised, then one commit forward writes its KV.
// Fast-dLLM v2: sub-block by sub-block with the threshold rule on token-shifted logits; the
// prefill / commit forward yields the next block's first token.
// SDAR: no shift, `steps` steps per block (transfer_schedule) with the low-confidence rules;
// every block after the first starts all [MASK].
// A batch advances block by block in lockstep, each row with its own cache length and
// positions; a row that is done keeps running but its extra tokens are dropped, so each row's
// tokens equal a batch-of-one run.
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

struct BatchResult {
  std::vector<std::vector<int64_t>> tokens;  // per prompt, as GenerateResult::tokens
  std::vector<bool> stopped;                 // per prompt
  std::vector<StepTime> times;               // one per (batched) forward
  double kv_fraction = 1.0;
};

// Throws std::invalid_argument on bad options or prompts.
BatchResult generate_batch(const QwenModel& model, const std::vector<std::vector<int64_t>>& prompts,
                           const GenerateOptions& options);
GenerateResult generate(const QwenModel& model, const std::vector<int64_t>& prompt,
                        const GenerateOptions& options);

}  // namespace mage::runtime
