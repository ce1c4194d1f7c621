// The loop of mage_ext/generate.py (_Run); the per-step rules are in
// decoding.cpp so ties break as in Python.
#include "runtime/generate.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>
#include <string>

namespace mage::runtime {
namespace {

using Clock = std::chrono::steady_clock;

Style style_of(const QwenModel& model, const GenerateOptions& o) {
  return o.style ? *o.style : parse_style(model.config().family);
}

class Run {
 public:
  Run(const QwenModel& model, const std::vector<std::vector<int64_t>>& prompts,
      const GenerateOptions& o)
      : model_(model), prompts_(prompts), o_(o), n_(static_cast<int64_t>(prompts.size())),
        B_(o.block_size ? o.block_size : model.config().block_size),
        mask_(model.config().mask_id), style_(style_of(model, o)), full_(split(0)),
        gen_start_(split(1)),
        cache_(model.config().num_layers, n_, model.config().num_kv_heads,
               model.config().head_dim, capacity(), model.dtype(), o.policy) {
    x_ = at::full({n_, B_}, mask_, at::kLong);
    for (int64_t b = 0; b < n_; ++b) {  // the first block: the prompt's remainder, then [MASK]
      const auto& p = prompts[b];
      const int64_t rem = gen_start_[b];
      for (int64_t i = 0; i < rem; ++i) x_[b][i] = p[p.size() - rem + i];
    }
    result_.tokens.resize(n_);
    result_.stopped.assign(n_, false);
  }

  BatchResult run() {
    prefill();
    while (true) {
      cache_.begin_block();
      if (style_ == Style::FastDllm) {
        denoise_fast_dllm();
      } else {
        denoise_sdar();
      }
      if (collect()) break;
      cache_.begin_step(/*commit=*/true);
      at::Tensor logits = forward(x_, StepTime::Commit, /*last_only=*/true);
      x_ = at::full({n_, B_}, mask_, at::kLong);
      if (style_ == Style::FastDllm)  // the commit forward yields the next block's first token
        x_.select(1, 0).copy_(greedy(logits.select(1, -1)).first);
      std::fill(gen_start_.begin(), gen_start_.end(), 0);
    }
    result_.kv_fraction = cache_.kv_fraction();
    return std::move(result_);
  }

 private:
  std::vector<int64_t> split(int which) const {  // per prompt: full blocks (0), remainder (1)
    std::vector<int64_t> v;
    for (const auto& p : prompts_) {
      const int64_t n = static_cast<int64_t>(p.size());
      v.push_back(which == 0 ? n / B_ : n % B_);
    }
    return v;
  }

  int64_t capacity() const {  // as _Run.__init__: full prompt blocks + generation blocks
    const int64_t full = *std::max_element(full_.begin(), full_.end());
    const int64_t rem = *std::max_element(gen_start_.begin(), gen_start_.end());
    return full * B_ + ((o_.max_new_tokens + rem + B_ - 1) / B_ + 1) * B_;
  }

  at::Tensor forward(const at::Tensor& ids, StepTime::Kind kind, bool last_only) {
    at::Tensor pos = cache_.cache_lens().to(at::kLong).unsqueeze(1) + at::arange(B_, at::kLong);
    auto t0 = Clock::now();
    at::Tensor logits = model_.forward(ids, pos, cache_, last_only);
    logits.select(-1, mask_).fill_(-std::numeric_limits<double>::infinity());
    cache_.end_forward(B_);
    result_.times.push_back({kind, std::chrono::duration<double>(Clock::now() - t0).count()});
    return logits;
  }

  void prefill() {  // chunk i: rows with more than i full blocks; the others are scratch
    const int64_t chunks = *std::max_element(full_.begin(), full_.end());
    for (int64_t i = 0; i < chunks; ++i) {
      at::Tensor ids = at::full({n_, B_}, mask_, at::kLong);
      at::Tensor advance = at::zeros({n_}, at::kBool);
      for (int64_t b = 0; b < n_; ++b) {
        if (full_[b] <= i) continue;
        const auto first = prompts_[b].begin() + i * B_;
        ids[b].copy_(at::tensor(std::vector<int64_t>(first, first + B_), at::kLong));
        advance[b] = true;
      }
      cache_.begin_prefill(advance);
      at::Tensor logits = forward(ids, StepTime::Prefill, /*last_only=*/true);
      if (style_ != Style::FastDllm) continue;
      at::Tensor tok = greedy(logits.select(1, -1)).first;
      for (int64_t b = 0; b < n_; ++b)  // the token after a block-aligned prompt
        if (gen_start_[b] == 0 && full_[b] == i + 1) x_[b][0] = tok[b];
    }
  }

  at::Tensor step_logits() {
    cache_.begin_step(/*commit=*/false);
    const bool first = cache_.step() == 0;
    return forward(x_, first ? StepTime::FirstStep : StepTime::LaterStep, /*last_only=*/false);
  }

  void denoise_fast_dllm() {
    for (int64_t start = 0; start < B_; start += o_.sub_block) {
      const int64_t end = start + o_.sub_block;
      while (x_.slice(1, start, end).eq(mask_).any().item<bool>()) {
        at::Tensor logits = step_logits();
        // Token shift: position i is predicted from hidden i-1.
        logits = at::cat({logits.slice(1, 0, 1), logits.slice(1, 0, -1)}, 1).slice(1, start, end);
        auto [tok, p] = greedy(logits);
        at::Tensor cur = x_.slice(1, start, end);
        at::Tensor pick = threshold_unmask(p, cur.eq(mask_), o_.threshold);
        cur.copy_(at::where(pick, tok, cur));
      }
    }
  }

  void denoise_sdar() {
    for (int64_t n : transfer_schedule(B_, o_.steps)) {
      at::Tensor masked = x_.eq(mask_);
      if (!masked.any().item<bool>()) break;
      auto [tok, p] = greedy(step_logits());
      x_ = at::where(low_confidence_unmask(p, masked, n, o_.remasking, o_.threshold), tok, x_);
    }
    if (x_.eq(mask_).any().item<bool>())  // cannot happen: the schedule sums to B
      throw std::logic_error("generate: the SDAR schedule left [MASK] tokens in the block");
  }

  bool done(int64_t b) const {
    return result_.stopped[b] ||
           static_cast<int64_t>(result_.tokens[b].size()) >= o_.max_new_tokens;
  }

  bool collect() {  // appends the block's new tokens; true when every row is done
    const auto& stops = model_.config().stop_ids;
    at::Tensor x = x_.contiguous();
    const int64_t* rows = x.data_ptr<int64_t>();
    bool all = true;
    for (int64_t b = 0; b < n_; ++b) {
      for (int64_t i = gen_start_[b]; i < B_ && !done(b); ++i) {
        const int64_t t = rows[b * B_ + i];
        if (std::find(stops.begin(), stops.end(), t) != stops.end()) {
          result_.stopped[b] = true;
        } else {
          result_.tokens[b].push_back(t);
        }
      }
      all = all && done(b);
    }
    return all;
  }

  const QwenModel& model_;
  const std::vector<std::vector<int64_t>>& prompts_;
  const GenerateOptions& o_;
  const int64_t n_, B_, mask_;
  const Style style_;
  const std::vector<int64_t> full_;  // full prompt blocks per row
  std::vector<int64_t> gen_start_;   // first generated position of the current block per row
  KVCache cache_;
  at::Tensor x_;
  BatchResult result_;
};

void check(const QwenModel& model, const std::vector<std::vector<int64_t>>& prompts,
           const GenerateOptions& o) {
  const ModelConfig& c = model.config();
  const int64_t B = o.block_size ? o.block_size : c.block_size;
  auto bad = [](const std::string& m) { throw std::invalid_argument("generate: " + m); };
  o.policy.validate();
  if (c.mask_id < 0 || c.mask_id >= c.vocab_size)
    bad("the model's config.json has no valid mask_token_id");
  if (prompts.empty()) bad("no prompts given");
  size_t n = 0;  // the longest prompt
  for (const auto& prompt : prompts) {
    if (prompt.empty()) bad("the prompt is empty (at least one token is needed)");
    for (int64_t t : prompt)
      if (t < 0 || t >= c.vocab_size)
        bad("prompt id " + std::to_string(t) + " is outside the vocabulary [0, " +
            std::to_string(c.vocab_size) + ")");
    n = std::max(n, prompt.size());
  }
  if (B <= 0) bad("block_size must be > 0, got " + std::to_string(B));
  if (style_of(model, o) == Style::FastDllm) {
    if (B < 2) bad("fast_dllm style needs block_size >= 2 (position 0 is known)");
    if (o.sub_block <= 0 || B % o.sub_block)
      bad("sub_block (" + std::to_string(o.sub_block) + ") must be > 0 and divide block_size (" +
          std::to_string(B) + ")");
  } else if (o.steps < 1 || o.steps > B) {
    bad("steps must lie in [1, block_size=" + std::to_string(B) + "], got " +
        std::to_string(o.steps));
  }
  if (!(o.threshold >= 0.0 && o.threshold <= 1.0)) bad("threshold must lie in [0, 1]");
  if (o.max_new_tokens <= 0) bad("max_new_tokens must be > 0");
  if (c.max_positions > 0 && static_cast<int64_t>(n) + o.max_new_tokens > c.max_positions)
    bad("prompt (" + std::to_string(n) + ") + max_new_tokens (" +
        std::to_string(o.max_new_tokens) + ") exceeds max_position_embeddings (" +
        std::to_string(c.max_positions) + ")");
}

}  // namespace

BatchResult generate_batch(const QwenModel& model, const std::vector<std::vector<int64_t>>& prompts,
                           const GenerateOptions& options) {
  check(model, prompts, options);
  at::NoGradGuard no_grad;
  return Run(model, prompts, options).run();
}

GenerateResult generate(const QwenModel& model, const std::vector<int64_t>& prompt,
                        const GenerateOptions& options) {
  BatchResult r = generate_batch(model, {prompt}, options);
  return {std::move(r.tokens[0]), r.stopped[0], std::move(r.times), r.kv_fraction};
}

}  // namespace mage::runtime
