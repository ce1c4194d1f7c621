// CUDA kernels of mage.block_attention and its backward: the shared split (ops/block_attention.h)
// with torch's own fused tensor-core attention for the prefix (A) and the causal diagonal (B),
// called as ATen ops that return (and take back) the log-sum-exp:
//   flash      at::_flash_attention_forward / _backward (FlashAttention-2, vendored in torch):
//              fp16/bf16, d % 8 == 0, d <= 256, sm80+; GQA native (Hq % Hkv == 0; the backward
//              sums dK/dV over the group itself); any row/head/batch strides with a contiguous
//              last dim, so the cache is read in place. The default for fp16/bf16 below sm90,
//              and for small calls.
//   cudnn      at::_scaled_dot_product_cudnn_attention / _backward: fp16/bf16, d % 8 == 0,
//              d <= 128. The forward hands cuDNN the GQA heads as they are (torch 2.11's takes
//              them: 620-680 TFLOP/s on the H200 at prefill shapes, 5-17% above K/V expanded per
//              query head); a build that refuses gets them expanded (a copy of Sk rows per head,
//              small against the Sq x Sk work of the part), as the backward always does.
//              auto's choice on sm90+ for training (the backward, and the forward when an input
//              requires grad) and for large inference calls (kCudnnMinRows query tokens over
//              kCudnnMinKeys keys: the later chunks of a long prefill): measured on the H200
//              about twice flash's speed (benchmarks/profile_train_attention.py: 1.5B heads,
//              T = 32K, both training streams 54 ms against 82; benchmarks/
//              probe_prefill_kernels.py: 600-680 TFLOP/s against 350; a 128K prefill in 16K
//              chunks 3.6 s against 5.1). Costs: ~0.8 s once per process (its first attention)
//              and a graph per new shape (~65 ms; cached for the process): training repeats one
//              shape, a prefill's chunks repeat across prompts (prefix lengths are multiples of
//              the chunk); small calls would pay it for little work.
//   efficient  at::_efficient_attention_forward / _backward (mem-efficient CUTLASS): fp32 too;
//              K/V expanded (no GQA in the kernel). The default for fp32.
//   generic    the ATen chunked online softmax (fp64, other head dims, and the fallback).
// The parts are non-causal or causal with Sq == Sk, so the kernels' causal alignment (flash:
// bottom-right; cuDNN, efficient: top-left) does not matter. MAGE_BLOCK_ATTENTION_KERNEL=
// auto|flash|cudnn|efficient|generic (read per call) picks the kernel where it applies (else
// auto's choice); a fused kernel that raises falls back to generic (auto's cuDNN:
// to flash) with a one-time warning, unless MAGE_BLOCK_ATTENTION_STRICT=1. Determinism follows
// torch's: the fused backward kernels accumulate dQ with atomics unless
// torch.use_deterministic_algorithms(True).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "ops/block_attention.h"

namespace mage::cuda {
namespace {

using at::Tensor;
using Out = std::tuple<Tensor, Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

bool half_type(const Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

int sm_version() {
  const auto* p = at::cuda::getCurrentDeviceProperties();
  return p->major * 10 + p->minor;
}

// [B, Hkv, S, d] -> [B, Hkv*G, S, d] (query head h reads KV head h / G), contiguous.
Tensor expand_kv(const Tensor& t, int64_t group) {
  const auto s = t.sizes();
  return t.unsqueeze(2).expand({s[0], s[1], group, s[2], s[3]}).reshape({s[0], s[1] * group, s[2], s[3]});
}

// The gradient of expand_kv: sum over each group of query heads.
Tensor reduce_kv(const Tensor& t, int64_t group) {
  return group == 1 ? t : t.unflatten(1, {t.size(1) / group, group}).sum(2);
}

// Never used without dropout, but the backward ops take them.
Tensor no_rng(const Tensor& like, at::ScalarType dtype) {
  return at::empty({}, like.options().dtype(dtype));
}

class FlashPart final : public PartKernel {
 public:
  const char* name() const override { return "flash"; }
  static bool applies(const Tensor& q) {
    return half_type(q) && q.size(3) % 8 == 0 && q.size(3) <= 256 && sm_version() >= 80;
  }
  // FlashAttention takes [B, S, H, d]: the transposes are views.
  Out forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
              double scale) const override {
    auto r = at::_flash_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          std::nullopt, std::nullopt, q.size(2), k.size(2), 0.0,
                                          causal, false, scale);
    return {std::get<0>(r).transpose(1, 2), std::get<1>(r)};  // lse [B, Hq, Sq]
  }
  Grads backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& out, const Tensor& lse, bool causal, double scale) const override {
    auto r = at::_flash_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        out.transpose(1, 2), lse.contiguous(), Tensor(), Tensor(), q.size(2), k.size(2), 0.0,
        causal, no_rng(q, at::kUInt64), no_rng(q, at::kUInt64), scale);
    return {std::get<0>(r).transpose(1, 2), std::get<1>(r).transpose(1, 2),
            std::get<2>(r).transpose(1, 2)};
  }
};

// Rank of the logsumexp the cuDNN forward returns ([B, H, S] or [B, H, S, 1] depending on the
// torch version); its backward takes the same. Recorded at each forward.
std::atomic<int> cudnn_lse_rank{4};
// Whether the cuDNN forward takes fewer KV heads than query heads; cleared at the first refusal.
std::atomic<bool> native_gqa{true};

class CudnnPart final : public PartKernel {
 public:
  const char* name() const override { return "cudnn"; }
  static bool applies(const Tensor& q) {
    return half_type(q) && q.size(3) % 8 == 0 && q.size(3) <= 128 && sm_version() >= 80;
  }
  Out forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
              double scale) const override {
    const int64_t group = q.size(1) / k.size(1);
    auto call = [&](const Tensor& kk, const Tensor& vv) {
      return at::_scaled_dot_product_cudnn_attention(q.contiguous(), kk, vv, std::nullopt,
                                                     /*compute_log_sumexp=*/true, 0.0, causal,
                                                     false, scale);
    };
    auto r = [&] {
      if (group > 1 && native_gqa.load()) {
        try {
          return call(k, v);
        } catch (const c10::Error&) {
          native_gqa.store(false);  // this build's cuDNN path wants one KV head per query head
        }
      }
      return call(expand_kv(k, group), expand_kv(v, group));
    }();
    const auto& lse = std::get<1>(r);
    cudnn_lse_rank.store(static_cast<int>(lse.dim()));
    return {std::get<0>(r), lse.reshape({q.size(0), q.size(1), q.size(2)})};
  }
  Grads backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& out, const Tensor& lse, bool causal, double scale) const override {
    const int64_t group = q.size(1) / k.size(1);
    auto stats = lse.contiguous();
    if (cudnn_lse_rank.load() == 4) stats = stats.unsqueeze(-1);
    auto r = at::_scaled_dot_product_cudnn_attention_backward(
        dout.contiguous(), q.contiguous(), expand_kv(k, group), expand_kv(v, group),
        out.contiguous(), stats, no_rng(q, at::kLong), no_rng(q, at::kLong), Tensor(), Tensor(),
        Tensor(), q.size(2), k.size(2), 0.0, causal, scale);
    return {std::get<0>(r), reduce_kv(std::get<1>(r), group), reduce_kv(std::get<2>(r), group)};
  }
};

class EfficientPart final : public PartKernel {
 public:
  const char* name() const override { return "efficient"; }
  static bool applies(const Tensor& q) {
    return (half_type(q) || q.scalar_type() == at::kFloat) && q.size(3) % 8 == 0 &&
           q.size(3) <= 256 && sm_version() >= 50;
  }
  static constexpr int64_t kNoMask = 0, kCausalTopLeft = 1;  // sdp::CustomMaskType
  static constexpr int64_t kAlignLse = 32;                    // lse rows are padded to this
  Out forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
              double scale) const override {
    const int64_t group = q.size(1) / k.size(1);
    auto r = at::_efficient_attention_forward(
        q.transpose(1, 2), expand_kv(k, group).transpose(1, 2), expand_kv(v, group).transpose(1, 2),
        std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt, 0.0,
        causal ? kCausalTopLeft : kNoMask, /*compute_log_sumexp=*/true, scale);
    return {std::get<0>(r).transpose(1, 2), std::get<1>(r).narrow(2, 0, q.size(2))};
  }
  Grads backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& out, const Tensor& lse, bool causal, double scale) const override {
    const int64_t group = q.size(1) / k.size(1), sq = q.size(2);
    auto padded = at::zeros({q.size(0), q.size(1), (sq + kAlignLse - 1) / kAlignLse * kAlignLse},
                            lse.options().dtype(at::kFloat));
    padded.narrow(2, 0, sq).copy_(lse);
    const auto cpu_long = at::empty({}, at::TensorOptions().dtype(at::kLong));
    auto r = at::_efficient_attention_backward(
        dout.transpose(1, 2).contiguous(), q.transpose(1, 2), expand_kv(k, group).transpose(1, 2),
        expand_kv(v, group).transpose(1, 2), std::nullopt, out.transpose(1, 2).contiguous(),
        std::nullopt, std::nullopt, sq, k.size(2), padded, 0.0, cpu_long, cpu_long,
        causal ? kCausalTopLeft : kNoMask, /*bias_requires_grad=*/false, scale);
    return {std::get<0>(r).transpose(1, 2), reduce_kv(std::get<1>(r).transpose(1, 2), group),
            reduce_kv(std::get<2>(r).transpose(1, 2), group)};
  }
};

// A fused kernel that falls back to the generic one when it raises (a torch build without it,
// a shape it refuses), warning once; MAGE_BLOCK_ATTENTION_STRICT=1 raises instead (the tests).
// auto's cuDNN falls back to flash (itself falling back to generic): a torch
// build whose cuDNN lacks these kernels then trains as fast as before, not on the ATen path.
class WithFallback final : public PartKernel {
 public:
  explicit WithFallback(const PartKernel& primary,
                        const PartKernel& fallback = generic_part_kernel())
      : primary_(primary), fallback_(fallback) {}
  const char* name() const override { return primary_.name(); }
  Out forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
              double scale) const override {
    return run([&](const PartKernel& p) { return p.forward(q, k, v, causal, scale); });
  }
  Grads backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& out, const Tensor& lse, bool causal, double scale) const override {
    return run([&](const PartKernel& p) {
      return p.backward(dout, q, k, v, out, lse, causal, scale);
    });
  }

 private:
  template <typename Fn>
  auto run(Fn&& fn) const -> decltype(fn(std::declval<const PartKernel&>())) {
    try {
      return fn(primary_);
    } catch (const c10::Error& e) {
      if (env_flag("MAGE_BLOCK_ATTENTION_STRICT")) throw;
      TORCH_WARN_ONCE("mage.block_attention: the ", primary_.name(), " kernel failed (",
                      e.what_without_backtrace(), "); using the ", fallback_.name(),
                      " kernel instead. Set MAGE_BLOCK_ATTENTION_STRICT=1 to raise.");
      return fn(fallback_);
    }
  }
  const PartKernel& primary_;
  const PartKernel& fallback_;
};

// 16-byte aligned rows (the fused kernels load 16-byte vectors).
bool aligned(const Tensor& t) {
  const int64_t per16 = 16 / t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if (t.size(i) > 1 && t.stride(i) % per16 != 0) return false;
  }
  return t.stride(-1) == 1;
}

// Inference calls auto gives cuDNN on sm90+ (see the top of the file): at least this many query
// tokens over at least this many keys. cuDNN's first attention in a process costs ~0.8 s and each
// new shape ~65 ms (H200, benchmarks/results/cold_prefill_h200_34695aa.txt); with cuDNN for every
// chunk a 32K prefill, the process's first, took 2.24 s against 0.49 s on flash. A 16K-token
// chunk over 48K keys saves ~0.12 s per 28-layer forward, and more as the prefix grows.
constexpr int64_t kCudnnMinRows = 2048, kCudnnMinKeys = 49152;

// training: a backward, or a forward on inputs that require grad (whatever the grad mode: the
// signal is the inputs; inference makes its activations under no_grad / inference_mode, so
// they do not). Training repeats its shapes, so cuDNN's per-shape graph is built once.
const PartKernel& choose_kernel(const Tensor& q, const Tensor& k_ctx, const Tensor& v_ctx,
                                at::IntArrayRef start, bool training) {
  static const FlashPart flash_kernel;
  static const CudnnPart cudnn_kernel;
  static const EfficientPart efficient_kernel;
  static const WithFallback flash(flash_kernel), cudnn(cudnn_kernel), efficient(efficient_kernel);
  // (where cuDNN's kernel applies, flash's does: fp16 / bf16, d % 8 == 0, d <= 128, sm80+)
  static const WithFallback cudnn_then_flash(cudnn_kernel, flash);
  const auto& generic = generic_part_kernel();
  // The context is read in place (never copied), so the fused kernels need it aligned.
  if (!aligned(k_ctx) || !aligned(v_ctx)) {
    TORCH_WARN_ONCE("mage.block_attention: k_ctx / v_ctx rows are not 16-byte aligned (strides ",
                    k_ctx.strides(), "); using the generic ATen path (slow)");
    return generic;
  }
  const char* env = std::getenv("MAGE_BLOCK_ATTENTION_KERNEL");
  const std::string want = env == nullptr ? "auto" : env;
  TORCH_CHECK(want == "auto" || want == "flash" || want == "cudnn" || want == "efficient" ||
                  want == "generic",
              "mage.block_attention: MAGE_BLOCK_ATTENTION_KERNEL must be auto, flash, cudnn, "
              "efficient or generic, got '", want, "'");
  if (want == "generic") return generic;
  if (want == "cudnn" && CudnnPart::applies(q)) return cudnn;
  if (want == "efficient" && EfficientPart::applies(q)) return efficient;
  const int64_t keys = *std::max_element(start.begin(), start.end()) + q.size(2);
  if (want == "auto" && sm_version() >= 90 && CudnnPart::applies(q) &&
      (training || (q.size(2) >= kCudnnMinRows && keys >= kCudnnMinKeys))) {
    return cudnn_then_flash;
  }
  if (FlashPart::applies(q)) return flash;
  if (EfficientPart::applies(q)) return efficient;
  return generic;
}

// q, k_own, v_own as the fused kernels take them: 16-byte aligned rows (else a contiguous copy).
Tensor kernel_ready(const Tensor& t) { return aligned(t) ? t : t.contiguous(); }

std::tuple<Tensor, Tensor> block_attention(const Tensor& q, const Tensor& k_ctx,
                                           const Tensor& v_ctx, const Tensor& k_own,
                                           const Tensor& v_own, int64_t block_size,
                                           at::IntArrayRef start, std::optional<double> scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const auto d = check_block_attention_inputs("mage.block_attention", q, k_ctx, v_ctx, k_own,
                                              v_own, block_size, start, scale);
  const bool training = q.requires_grad() || k_ctx.requires_grad() || v_ctx.requires_grad() ||
                        k_own.requires_grad() || v_own.requires_grad();
  return compute_block_attention(kernel_ready(q), k_ctx, v_ctx, kernel_ready(k_own),
                                 kernel_ready(v_own), d, start,
                                 choose_kernel(q, k_ctx, v_ctx, start, training));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> block_attention_backward(
    const Tensor& dout, const Tensor& q, const Tensor& k_ctx, const Tensor& v_ctx,
    const Tensor& k_own, const Tensor& v_own, const Tensor& out, const Tensor& lse,
    int64_t block_size, at::IntArrayRef start, std::optional<double> scale) {
  const char* op = "mage.block_attention_backward";
  const c10::cuda::CUDAGuard guard(q.device());
  const auto d = check_block_attention_inputs(op, q, k_ctx, v_ctx, k_own, v_own, block_size,
                                              start, scale);
  check_block_attention_grad_inputs(op, d, q, dout, out, lse);
  return compute_block_attention_backward(
      kernel_ready(dout), kernel_ready(q), k_ctx, v_ctx, kernel_ready(k_own), kernel_ready(v_own),
      kernel_ready(out), lse, d, start, choose_kernel(q, k_ctx, v_ctx, start, /*training=*/true));
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CUDA, m) {
  m.impl("block_attention", &block_attention);
  m.impl("block_attention_backward", &block_attention_backward);
}

}  // namespace mage::cuda
