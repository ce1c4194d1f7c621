// CUDA kernel of mage.linear (ops/linear.cpp): at::linear (cuBLAS), or with MAGE_SKINNY_GEMM=on
// the few-row split-K GEMM (skinny_gemm.cu) where it applies (experimental: slower than cuBLAS
// so far); MAGE_SKINNY_SPLITS=1..8 fixes its K splits (for tuning).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/host_utils.h"
#include "cuda/skinny_gemm.h"
#include "ops/checks.h"

namespace mage::cuda {
namespace {

using T = const at::Tensor&;
using OptT = const std::optional<at::Tensor>&;

// Off by default: measured on the H200 the kernel is still slower than cuBLAS for a whole
// forward's GEMMs (benchmarks/results/skinny_gemm_probe_h200.json: wave quantisation and each
// CTA's pipeline fill and cluster sum; a stream-K schedule is the next step). MAGE_SKINNY_GEMM=on
// takes it where it applies.
bool skinny_enabled() {
  const char* v = std::getenv("MAGE_SKINNY_GEMM");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "off") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "on") == 0, "mage.linear: MAGE_SKINNY_GEMM must be 'on' or 'off', ",
              "got '", v, "'");
  return true;
}

int forced_splits() {
  const char* v = std::getenv("MAGE_SKINNY_SPLITS");
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  TORCH_CHECK(*end == '\0' && n >= 1 && n <= kSkinnyMaxSplits, "mage.linear: MAGE_SKINNY_SPLITS ",
              "must be an integer in [1, ", kSkinnyMaxSplits, "], got '", v, "'");
  return static_cast<int>(n);
}

// The kernel's domain: fp16 / bf16, 1..32 rows, K a multiple of 8 (16-byte loads), a contiguous
// weight and bias, a grid that fits (N / 64 row tiles in gridDim.y).
bool skinny_applies(const LinearDims& d, T x, T weight, OptT bias) {
  const auto dtype = x.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (d.rows < 1 || d.rows > kSkinnyMaxRows || d.in % 8 != 0 || d.in > INT32_MAX / 2) return false;
  if ((d.out + kSkinnyRowsPerCta - 1) / kSkinnyRowsPerCta > 65535) return false;
  if (!weight.is_contiguous() || !is_aligned16(weight)) return false;
  if (bias.has_value() && bias->defined() && !bias->is_contiguous()) return false;
  return skinny_enabled();
}

at::Tensor linear_cuda(T x_in, T weight, OptT bias) {
  const auto d = check_linear_inputs("mage.linear", x_in, weight, bias);
  if (!skinny_applies(d, x_in, weight, bias)) return at::linear(x_in, weight, bias);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  if (!is_aligned16(x)) x = x.clone();
  auto shape = x_in.sizes().vec();
  shape.back() = d.out;
  auto y = at::empty(shape, x.options());
  SkinnyGemmArgs a;
  a.x = x.data_ptr();
  a.w = weight.data_ptr();
  a.bias = bias.has_value() && bias->defined() ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.m = static_cast<int>(d.rows);
  a.n = static_cast<int>(d.out);
  a.k = static_cast<int>(d.in);
  plan_skinny_gemm(&a, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  if (const int s = forced_splits()) {
    a.k_per_split = ((a.k + s - 1) / s + 31) / 32 * 32;
    a.splits = (a.k + a.k_per_split - 1) / a.k_per_split;
  }
  C10_CUDA_CHECK(launch_skinny_gemm(dtype_of(x), a, at::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CUDA, m) { m.impl("linear", &linear_cuda); }

}  // namespace mage::cuda
