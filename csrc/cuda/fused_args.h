// Argument structs of the fused elementwise kernels (RMSNorm + residual, QKV layout + q/k norm +
// RoPE, SiLU * up), shared by the host entry points (fused_ops_cuda.cpp) and the kernels
// (fused_*.cu). Pointers are raw device pointers to contiguous tensors, 16-byte aligned except
// where a field says otherwise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/kernel_args.h"  // Dtype
#include "ops/sum_order.h"

namespace mage::cuda {

struct RmsNormArgs {
  const void* x;         // [rows, n]
  const void* residual;  // [rows, n], or nullptr
  const void* weight;    // [n]
  void* out;             // [rows, n]
  void* residual_out;    // [rows, n]: x + residual (x when residual is nullptr)
  int64_t rows = 0;
  int n = 0;             // a multiple of 8, 32 <= n <= kMaxFusedRow
  float eps = 0.f;
  float mean_factor = 0.f;  // torch_mean_factor(rows, n)
  SumOrder order;           // torch_mean_order(rows, n)
};

// Most threads of the RMSNorm kernel's CTA (one CTA per row).
constexpr int kMaxRmsThreads = 512;

struct QkvRopeArgs {
  const void* qkv;           // [tokens, (hq + 2 hkv) * d], tokens = batch * block
  const int64_t* positions;  // [tokens]
  const float* inv_freq;     // [d / 2]
  const void* q_norm_weight;  // [d], or nullptr: no q/k norm (then k_norm_weight is nullptr)
  const void* k_norm_weight;
  void* q;  // [batch, hq, block, d]
  void* k;  // [batch, hkv, block, d]
  void* v;  // [batch, hkv, block, d]
  int batch = 0, block = 0, hq = 0, hkv = 0, dim = 0;
  float eps = 0.f;
  float q_mean_factor = 0.f, k_mean_factor = 0.f;  // of [tokens * hq, d] and [tokens * hkv, d]
  SumOrder q_order, k_order;
};

struct SiluMulArgs {
  const void* gate_up;  // [rows, 2 * inter]: gate, then up
  void* out;            // [rows, inter]
  int64_t rows = 0;
  int inter = 0;
  bool vec16 = false;  // both pointers 16-byte aligned (then rows are too when inter allows)
};

// Longest row (hidden size, head dim) the fused kernels take: a row lives in shared memory.
constexpr int kMaxFusedRow = 16384;

cudaError_t launch_rms_norm(Dtype dtype, const RmsNormArgs& args, cudaStream_t stream);
cudaError_t launch_qkv_rope(Dtype dtype, const QkvRopeArgs& args, cudaStream_t stream);
cudaError_t launch_silu_mul(Dtype dtype, const SiluMulArgs& args, cudaStream_t stream);

}  // namespace mage::cuda
