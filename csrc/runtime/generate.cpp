// The loop of mage_ext/generate.py (_Run); the per-step rules are in decoding.cpp so ties break
// (and sampling draws) as in Python.
#include "runtime/generate.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <array>
#include <deque>
#include <memory>
#include <mutex>
#include <chrono>
#include <limits>
#include <stdexcept>
#include <string>

#include "runtime/graphs.h"
#include "runtime/sync_check.h"

#ifdef MAGE_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mage::runtime {
namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

Style style_of(const QwenModel& model, const GenerateOptions& o) {
  return o.style ? *o.style : parse_style(model.config().family);
}

int64_t mask_of(const QwenModel& model, const GenerateOptions& o) {
  return o.mask_id >= 0 ? o.mask_id : model.config().mask_id;
}

at::Generator make_generator(at::Device device, uint64_t seed) {
  at::Generator g;
#ifdef MAGE_WITH_CUDA
  if (device.is_cuda()) g = at::cuda::detail::createCUDAGenerator(device.index());
#endif
  if (!g.defined()) g = at::make_generator<at::CPUGeneratorImpl>();
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_current_seed(seed);  // as torch.Generator(device).manual_seed(seed)
  return g;
}

// Per-forward times without synchronising inside a block: CUDA events recorded around each
// forward on the generation's stream, read when the host waits anyway (block boundaries).
class Timeline {
 public:
  explicit Timeline(at::Device device) : cuda_(device.is_cuda()) {}

  void begin(StepTime::Kind kind, int64_t block) {
    pending_.push_back({kind, block, Clock::now(), 0.0, next_event(), next_event()});
#ifdef MAGE_WITH_CUDA
    if (cuda_) events_[pending_.back().start].record();
#endif
  }
  void end() {
    Pending& p = pending_.back();
    p.host = since(p.t0);
#ifdef MAGE_WITH_CUDA
    if (cuda_) events_[p.stop].record();
#endif
  }
  // Moves the recorded forwards into `out` (waits for the device on CUDA).
  void flush(std::vector<StepTime>& out) {
    for (const Pending& p : pending_) {
      double device = p.host;  // the CPU ops ran synchronously
#ifdef MAGE_WITH_CUDA
      if (cuda_) {
        events_[p.stop].synchronize();
        device = events_[p.start].elapsed_time(events_[p.stop]) / 1e3;
      }
#endif
      out.push_back({p.kind, p.block, device, p.host});
    }
    pending_.clear();
    used_ = 0;
  }

 private:
  struct Pending {
    StepTime::Kind kind;
    int64_t block;
    Clock::time_point t0;
    double host;
    size_t start, stop;  // indices into events_
  };
  size_t next_event() {
#ifdef MAGE_WITH_CUDA
    if (cuda_ && used_ == events_.size()) events_.emplace_back(cudaEventDefault);  // timing on
#endif
    return used_++;
  }

  bool cuda_;
  std::vector<Pending> pending_;
  size_t used_ = 0;
#ifdef MAGE_WITH_CUDA
  std::deque<at::cuda::CUDAEvent> events_;  // reused across flushes
#endif
};

class Run {
 public:
  Run(const QwenModel& model, const std::vector<std::vector<int64_t>>& prompts,
      const GenerateOptions& o)
      : model_(model), prompts_(prompts), o_(o), n_(static_cast<int64_t>(prompts.size())),
        B_(o.block_size ? o.block_size : model.config().block_size), mask_(mask_of(model, o)),
        style_(style_of(model, o)), device_(model.device()), full_(split(0)), gen_start_(split(1)),
        cache_(model.config().num_layers, n_, model.config().num_kv_heads,
               model.config().head_dim, capacity(), model.dtype(), o.policy, model.device()),
        generator_(make_generator(model.device(), o.seed)), timeline_(model.device()) {
    const bool graphs = o.cuda_graphs && device_.is_cuda();
    for (int k = StepTime::FirstStep; k < 4; ++k) {  // prefill chunks run eagerly (prefill())
      const bool last_only = k == StepTime::Commit;
      forwards_[k] = std::make_unique<GraphedForward>(
          [this, last_only](const at::Tensor& ids) { return logits_of(ids, last_only); }, graphs);
    }
    at::Tensor x = at::full({n_, B_}, mask_, at::kLong);
    for (int64_t b = 0; b < n_; ++b) {  // the first block: the prompt's remainder, then [MASK]
      const auto& p = prompts[b];
      const int64_t rem = gen_start_[b];
      for (int64_t i = 0; i < rem; ++i) x[b][i] = p[p.size() - rem + i];
    }
    x_ = x.to(device_);
    result_.tokens.resize(n_);
    result_.stopped.assign(n_, false);
  }

  BatchResult run() {
    auto t0 = Clock::now();
    prefill();
    flush();  // waits for the prefill's last forward
    result_.prefill_wall_s = since(t0);
    t0 = Clock::now();
    SyncCheck check(device_.is_cuda());  // MAGE_SYNC_CHECK=1: no other host sync from here
    for (int64_t block = 0;; ++block) {
      cache_.begin_block();
      if (style_ == Style::FastDllm) {
        denoise_fast_dllm(block);
      } else {
        denoise_sdar(block);
      }
      const bool all_done = collect();  // reads the block: the host waits for the device here
      flush();
      if (all_done) break;
      cache_.begin_step(/*commit=*/true);
      at::Tensor logits = forward(StepTime::Commit, block, x_);
      at::Tensor next = at::full({n_, B_}, mask_, x_.options());
      if (style_ == Style::FastDllm)  // the commit forward yields the next block's first token
        next.select(1, 0).copy_(draw(logits.select(1, -1)).first);
      x_ = next;
      std::fill(gen_start_.begin(), gen_start_.end(), 0);
    }
    result_.decode_wall_s = since(t0);
    AllowSync allowed;
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

  // The forward itself: positions from the cache lengths on the device, [MASK] never output.
  at::Tensor logits_of(const at::Tensor& ids, bool last_only, const at::Tensor& keep = {}) {
    const auto longs = at::TensorOptions().dtype(at::kLong).device(device_);
    at::Tensor pos = cache_.cache_lens().to(at::kLong).unsqueeze(1) + at::arange(ids.size(1), longs);
    at::Tensor logits = model_.forward(ids, pos, cache_, last_only, keep);
    logits.select(-1, mask_).fill_(-std::numeric_limits<double>::infinity());
    return logits;
  }

  at::Tensor forward(StepTime::Kind kind, int64_t block, const at::Tensor& ids) {
    timeline_.begin(kind, block);
    at::Tensor logits = (*forwards_[kind])(ids);
    cache_.end_forward(ids.size(1));
    timeline_.end();
    return logits;
  }

  void flush() {
    AllowSync allowed;
    timeline_.flush(result_.times);
  }

  std::pair<at::Tensor, at::Tensor> draw(const at::Tensor& logits) {
    return sample(logits, o_.temperature, o_.top_p, generator_);
  }

  // The prompts' full blocks, prefill_chunk tokens (whole blocks) per forward, as
  // mage_ext/core/loop.py prefill: a row whose full blocks end inside a chunk keeps only those
  // tokens (the rest of its row is scratch); Fast-dLLM v2 takes the token after a block-aligned
  // prompt from the logits of its last position. Chunks run eagerly (their start lengths are
  // host arguments of mage::block_attention, and the last chunk is shorter).
  void prefill() {
    const int64_t total = *std::max_element(full_.begin(), full_.end()) * B_;
    if (total == 0) return;
    const int64_t C = std::max(B_, o_.prefill_chunk / B_ * B_);
    const int64_t chunks = (total + C - 1) / C;
    // One upload: every row's full blocks ([MASK] where a row has fewer: scratch) and, per
    // chunk, the tokens each row keeps, the position whose logits it needs, where a prompt ends.
    at::Tensor ids = at::full({n_, total}, mask_, at::kLong);
    at::Tensor kept = at::zeros({chunks, n_}, at::kInt);
    at::Tensor keep = at::zeros({chunks, n_}, at::kLong);
    at::Tensor ends = at::zeros({chunks, n_}, at::kBool);
    std::vector<std::vector<int64_t>> starts(chunks, std::vector<int64_t>(n_));
    std::vector<bool> any_end(chunks, false);
    for (int64_t b = 0; b < n_; ++b) {
      const int64_t len = full_[b] * B_;
      if (len) ids[b].slice(0, 0, len).copy_(at::tensor(std::vector<int64_t>(prompts_[b].begin(), prompts_[b].begin() + len)));
      for (int64_t i = 0; i < chunks; ++i) {
        const int64_t c0 = i * C, n = std::min(C, total - c0);
        const int64_t mine = std::clamp<int64_t>(len - c0, 0, n);
        kept[i][b] = mine;
        keep[i][b] = std::max<int64_t>(mine, 1) - 1;
        starts[i][b] = std::min(len, c0);
        if (gen_start_[b] == 0 && len - c0 > 0 && len - c0 <= n) {
          ends[i][b] = true;
          any_end[i] = true;
        }
      }
    }
    ids = ids.to(device_);
    kept = kept.to(device_);
    keep = keep.to(device_);
    ends = ends.to(device_);
    SyncCheck check(device_.is_cuda());
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t c0 = i * C, n = std::min(C, total - c0);
      cache_.begin_prefill(kept[i], B_, starts[i]);
      timeline_.begin(StepTime::Prefill, -1);
      at::Tensor logits = logits_of(ids.slice(1, c0, c0 + n), /*last_only=*/false, keep[i]);
      cache_.end_forward(n);
      timeline_.end();
      // A draw only where a block-aligned prompt ends (as Python: a single prompt then draws
      // the same random numbers whatever the prefill chunking).
      if (style_ != Style::FastDllm || !any_end[i]) continue;
      at::Tensor tok = draw(logits.select(1, -1)).first;
      at::Tensor first = x_.select(1, 0);
      first.copy_(at::where(ends[i], tok, first));
    }
  }

  at::Tensor step_logits(int64_t block) {
    cache_.begin_step(/*commit=*/false);
    const bool first = cache_.step() == 0;
    return forward(first ? StepTime::FirstStep : StepTime::LaterStep, block, x_);
  }

  // The one host read inside a block: whether any [MASK] is left (one small copy per step).
  static bool any_mask(const at::Tensor& x, int64_t mask) {
    at::Tensor any = x.eq(mask).any();
    AllowSync allowed;
    return any.item<bool>();
  }

  // As mage_ext/core/loop.py: each step samples the whole block, shifts the tokens (position i
  // is predicted from hidden i-1; position 0 is never masked) and fills by the threshold rule in
  // each row's first sub-block with a [MASK].
  void denoise_fast_dllm(int64_t block) {
    while (any_mask(x_, mask_)) {
      auto [tok, p] = draw(step_logits(block));
      tok = at::cat({tok.slice(1, 0, 1), tok.slice(1, 0, -1)}, 1);
      p = at::cat({p.slice(1, 0, 1), p.slice(1, 0, -1)}, 1);
      at::Tensor pick = fast_dllm_unmask(p, x_.eq(mask_), o_.sub_block, o_.threshold);
      x_.copy_(at::where(pick, tok, x_));
    }
  }

  void denoise_sdar(int64_t block) {
    for (int64_t n : transfer_schedule(B_, o_.steps)) {
      if (!any_mask(x_, mask_)) break;
      at::Tensor masked = x_.eq(mask_);
      auto [tok, p] = draw(step_logits(block));
      x_ = at::where(low_confidence_unmask(p, masked, n, o_.remasking, o_.threshold), tok, x_);
    }
  }

  bool done(int64_t b) const {
    return result_.stopped[b] ||
           static_cast<int64_t>(result_.tokens[b].size()) >= o_.max_new_tokens;
  }

  bool collect() {  // appends the block's new tokens; true when every row is done
    const auto& stops = model_.config().stop_ids;
    at::Tensor x;
    {
      AllowSync allowed;
      x = x_.to(at::kCPU).contiguous();
    }
    const int64_t* rows = x.data_ptr<int64_t>();
    if (std::find(rows, rows + x.numel(), mask_) != rows + x.numel())  // cannot happen
      throw std::logic_error("generate: a block was committed with [MASK] tokens left");
    std::vector<std::vector<int64_t>> added(n_);
    bool all = true;
    for (int64_t b = 0; b < n_; ++b) {
      for (int64_t i = gen_start_[b]; i < B_ && !done(b); ++i) {
        const int64_t t = rows[b * B_ + i];
        if (std::find(stops.begin(), stops.end(), t) != stops.end()) {
          result_.stopped[b] = true;
        } else {
          result_.tokens[b].push_back(t);
          added[b].push_back(t);
        }
      }
      all = all && done(b);
    }
    if (o_.on_block) o_.on_block(added);
    return all;
  }

  const QwenModel& model_;
  const std::vector<std::vector<int64_t>>& prompts_;
  const GenerateOptions& o_;
  const int64_t n_, B_, mask_;
  const Style style_;
  const at::Device device_;
  const std::vector<int64_t> full_;  // full prompt blocks per row
  std::vector<int64_t> gen_start_;   // first generated position of the current block per row
  KVCache cache_;
  at::Generator generator_;
  Timeline timeline_;
  std::array<std::unique_ptr<GraphedForward>, 4> forwards_;  // by StepTime::Kind
  at::Tensor x_;
  BatchResult result_;
};

void check(const QwenModel& model, const std::vector<std::vector<int64_t>>& prompts,
           const GenerateOptions& o) {
  const ModelConfig& c = model.config();
  const int64_t B = o.block_size ? o.block_size : c.block_size;
  const int64_t mask = mask_of(model, o);
  auto bad = [](const std::string& m) { throw std::invalid_argument("generate: " + m); };
  o.policy.validate();
  if (mask < 0 || mask >= c.vocab_size)
    bad(o.mask_id >= 0 ? "mask id " + std::to_string(mask) + " is outside the vocabulary"
                       : "the model's config.json has no valid mask_token_id (and none was given)");
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
  if (!(o.temperature >= 0.0) || o.temperature == std::numeric_limits<double>::infinity())
    bad("temperature must be a finite number >= 0");
  if (!(o.top_p > 0.0 && o.top_p <= 1.0)) bad("top_p must lie in (0, 1]");
  if (o.max_new_tokens <= 0) bad("max_new_tokens must be > 0");
  if (o.prefill_chunk <= 0) bad("prefill_chunk must be > 0, got " + std::to_string(o.prefill_chunk));
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
#ifdef MAGE_WITH_CUDA
  // One non-default stream for the whole generation: graph capture needs one, and eager work,
  // captures and replays then stay in order without cross-stream waits.
  std::optional<c10::cuda::CUDAStreamGuard> stream;
  if (model.device().is_cuda())
    stream.emplace(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, model.device().index()));
#endif
  return Run(model, prompts, options).run();
}

}  // namespace mage::runtime
