// The few-row GEMM y[M, N] = x[M, K] W[N, K]^T (+ bias) of a decoding forward (M <= 32 rows:
// one block of one sequence), where every weight is read once and the time is the weight bytes
// over the memory bandwidth. cuBLAS reaches 25-70% of that bandwidth at these shapes (fewer
// CTAs than SMs for the small matrices: benchmarks/results/skinny_gemm_probe_h200.json); this
// kernel splits K over a thread-block cluster so every shape fills the GPU, and sums the
// splits' partials through distributed shared memory in a fixed order (deterministic, no
// workspace, nothing to zero, CUDA-graph safe). EXPERIMENTAL (opt-in, MAGE_SKINNY_GEMM=on): on
// the H200 it reaches 1.6-2.7 TB/s against cuBLAS's 2.4-3.4 for a whole forward's GEMMs, bound
// by wave quantisation (280 tiles on 264 CTA slots) and each short CTA's pipeline fill and
// cluster sum; a persistent stream-K schedule over (tile, K stage) units is the next step.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernel_args.h"  // Dtype

namespace mage::cuda {

constexpr int kSkinnyMaxRows = 32;       // rows of x one launch takes (four 8-row MMA tiles)
constexpr int kSkinnyRowsPerCta = 64;    // weight rows (outputs) per CTA: 4 warps x 16
constexpr int kSkinnyMaxSplits = 8;      // the portable cluster size

struct SkinnyGemmArgs {
  const void* x;     // [m, k], contiguous
  const void* w;     // [n, k], contiguous
  const void* bias;  // [n] or nullptr
  void* y;           // [m, n], contiguous
  int m, n, k;       // k % 8 == 0, pointers 16-byte aligned (checked by the caller)
  int k_per_split;   // a multiple of 32
  int splits;        // CTAs of a cluster, each summing its k_per_split slice of K
};

// splits and k_per_split for an [m, k] x [n, k]^T product on a GPU with `sms` SMs.
void plan_skinny_gemm(SkinnyGemmArgs* args, int sms);

cudaError_t launch_skinny_gemm(Dtype dtype, const SkinnyGemmArgs& args, cudaStream_t stream);

}  // namespace mage::cuda
