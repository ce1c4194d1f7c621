// Block-diffusion generation, the loop of mage_ext/generate.py: the prompt's full blocks are
// prefilled (dense, block-causal), the remainder heads the first block; each block is denoised,
// then one commit forward writes its KV.
// Fast-dLLM v2: sub-block by sub-block with the threshold rule on token-shifted logits; the
// prefill / commit forward yields the next block's first token.
// SDAR: no shift, `steps` steps per block (transfer_schedule) with the low-confidence rules;
// every block after the first starts all [MASK].
// A batch advances block by block in lockstep, each row with its own cache length and
// positions; a row that is done keeps running but its extra tokens are dropped, so each row's
// tokens equal a batch-of-one run.
//
// The prompts are prefilled `prefill_chunk` tokens per forward (block-causal inside a chunk:
// one mage::block_attention call). On CUDA the whole generation runs on one stream, each kind
// of block forward (a block's first (selecting) step, its later steps, the commit) is replayed
// as a CUDA graph after its first call (prefill chunks run eagerly), and inside a block the host reads the device once per step (whether any [MASK]
// is left); timings come from CUDA events read at block boundaries.
#pragma once

#include <cstdint>
#include <functional>
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
  double temperature = 0.0;    // 0: greedy
  double top_p = 1.0;          // nucleus sampling mass, in (0, 1]
  uint64_t seed = 0;           // the sampling generator's seed (temperature > 0)
  int64_t mask_id = -1;        // -1: the checkpoint's mask_token_id
  bool cuda_graphs = true;     // replay repeated forwards as CUDA graphs (CUDA models)
  int64_t prefill_chunk = 16384;  // prompt tokens per prefill forward (whole blocks, >= 1 block;
                                  // as mage_ext/core/loop.py's DEFAULT_PREFILL_CHUNK)
  // After each block: the tokens it added to each prompt's output (possibly none), in order.
  std::function<void(const std::vector<std::vector<int64_t>>&)> on_block;
};

struct StepTime {
  enum Kind { Prefill, FirstStep, LaterStep, Commit } kind;
  int64_t block;        // generation block (-1: prefill)
  double seconds;       // device time (CUDA events) on CUDA; wall time on the CPU
  double host_seconds;  // host time to issue the forward
};

struct BatchResult {
  std::vector<std::vector<int64_t>> tokens;  // generated ids per prompt, ending before the first stop id
  std::vector<bool> stopped;                 // a stop id ended the prompt's sequence
  std::vector<StepTime> times;               // one per (batched) forward
  double kv_fraction = 1.0;                  // share of the cache read by denoise/commit forwards
  double prefill_wall_s = 0.0;               // host wall time of the whole prefill (synchronised)
  double decode_wall_s = 0.0;                // host wall time from the first block to the end
};

// Throws std::invalid_argument on bad options or prompts.
BatchResult generate_batch(const QwenModel& model, const std::vector<std::vector<int64_t>>& prompts,
                           const GenerateOptions& options);

}  // namespace mage::runtime
