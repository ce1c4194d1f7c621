// Fast-dLLM v2 block-diffusion generation (greedy), the loop of mage_ext/generate.py for one
// sequence: the prompt's full blocks are prefilled (dense, block-causal), the remainder heads the
// first block; each block is denoised sub-block by sub-block with the threshold rule on
// token-shifted logits, then one commit forward writes its KV and yields the next block's first
// token.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/attention.h"
#include "runtime/model.h"

namespace mage::runtime {

struct GenerateOptions {
  Policy policy;
  int64_t max_new_tokens = 256;
  int64_t block_size = 0;      // 0: the checkpoint's
  int64_t sub_block = 8;
  double threshold = 0.9;
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
