// Few-row GEMM (skinny_gemm.h): y[M, N] = x[M, K] W[N, K]^T (+ bias), M <= 32, fp16 / bf16 in,
// fp32 accumulate, one rounding to the dtype at the end.
//
// Layout. The MMA computes y^T = W x^T: W's rows are the m16n8k16 A operand (row-major, K
// contiguous, as W is stored) and x's rows the B operand (K contiguous per column). Because a dot
// product does not depend on the order of K, each thread takes 8 CONSECUTIVE K of its A row and
// B column with one 16-byte load and feeds them to two k16 MMAs as if they were the fragment's
// scattered columns {2q, 2q+1, 2q+8, 2q+9} of each step: A and B use the same permutation, so
// the products pair up as in the plain layout and no shuffles or ldmatrix are needed.
//
// Work. A CTA (4 warps) owns 64 weight rows (16 per warp) and one K slice; the CTAs of one row
// tile form a cluster (one per slice, at most 8) so that small matrices still give every SM
// work. W and x stream through a ring of four shared-memory stages of 128 K filled by cp.async
// (three stages in flight while one multiplies): each thread copies the W vectors it will feed
// to its own MMAs, the CTA copies x's slice together and all four warps read it. At the end
// each CTA leaves its fp32 partial tile in shared memory and the cluster sums the partials in
// rank order through distributed shared memory (deterministic). Opt-in and slower than cuBLAS
// so far: skinny_gemm.h says what bounds it.
#include <cooperative_groups.h>

#include <algorithm>

#include "cuda/fused_common.cuh"
#include "cuda/skinny_gemm.h"

namespace mage::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 128;
constexpr int kChunk = 32;                 // K per 16-byte load of each of the 4 threads of a row
constexpr int kGroup = 4;                  // chunks per pipeline stage: 128 K
constexpr int kStageK = kGroup * kChunk;
constexpr int kStages = 4;                 // stages in the ring: 3 in flight while one computes
constexpr int kWVecs = kGroup * 2;         // 16-byte W vectors per thread per stage
constexpr int kXStride = kStageK / 8 + 4;  // x row stride in vectors: +64 B puts rows g and g+1
                                           // 16 banks apart (conflict-free fragment reads)

// One ring stage: each thread's own W vectors ([vector][thread], so a warp's reads are
// contiguous), then the stage's x slice [8 * kTiles rows][kXStride vectors] shared by the CTA.
template <int kTiles>
__host__ __device__ constexpr int stage_vecs() {
  return kWVecs * kThreads + kTiles * 8 * kXStride;
}
template <int kTiles>
__host__ __device__ constexpr int smem_bytes() {
  return kStages * stage_vecs<kTiles>() * 16;
}

// kTiles 8-row tiles of x (M <= 8 * kTiles).
template <typename T, int kTiles>
__global__ void __launch_bounds__(kThreads)
    skinny_gemm_kernel(const __grid_constant__ SkinnyGemmArgs a) {
  extern __shared__ uint4 smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, q = lane & 3;
  const int kbeg = blockIdx.x * a.k_per_split;
  const int kend = min(a.k, kbeg + a.k_per_split);
  const int stages = (kend - kbeg + kStageK - 1) / kStageK;
  const int row = blockIdx.y * kSkinnyRowsPerCta + warp * 16 + g;  // and row + 8
  const T* x = static_cast<const T*>(a.x);
  const T* w_lo = static_cast<const T*>(a.w) + static_cast<int64_t>(min(row, a.n - 1)) * a.k;
  const T* w_hi = static_cast<const T*>(a.w) + static_cast<int64_t>(min(row + 8, a.n - 1)) * a.k;
  const bool lo_ok = row < a.n, hi_ok = row + 8 < a.n;

  // Stage s's loads (K from kbeg + s * kStageK): this thread's W vectors, and its share of x.
  auto issue = [&](int s) {
    if (s < stages) {
      uint4* st = smem + (s % kStages) * stage_vecs<kTiles>();
      const int k0 = kbeg + s * kStageK;
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        const int k = k0 + j * kChunk + 8 * q;
        const bool in = k < kend;  // K % 8 == 0: a 16-byte piece is wholly in or out
        cp_async_16(st + (2 * j) * kThreads + tid, w_lo + (in ? k : 0), in && lo_ok);
        cp_async_16(st + (2 * j + 1) * kThreads + tid, w_hi + (in ? k : 0), in && hi_ok);
      }
      uint4* xs = st + kWVecs * kThreads;
      for (int i = tid; i < kTiles * 8 * (kStageK / 8); i += kThreads) {
        const int r = i / (kStageK / 8), c = i % (kStageK / 8), k = k0 + c * 8;
        const bool in = r < a.m && k < kend;
        cp_async_16(xs + r * kXStride + c, in ? x + static_cast<int64_t>(r) * a.k + k : x, in);
      }
    }
    cp_async_commit();  // empty groups past the end keep the wait counts uniform
  };

  float acc[kTiles][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  for (int s = 0; s < stages; ++s) {
    cp_async_wait<kStages - 2>();  // stage s has landed (for this thread) ...
    __syncthreads();               // ... for every thread; and stage s - 1's slot is free
    issue(s + kStages - 1);
    const uint4* st = smem + (s % kStages) * stage_vecs<kTiles>();
    const uint4* xs = st + kWVecs * kThreads;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const uint4 lo = st[(2 * j) * kThreads + tid], hi = st[(2 * j + 1) * kThreads + tid];
      const uint32_t a0[4] = {lo.x, hi.x, lo.y, hi.y};
      const uint32_t a1[4] = {lo.z, hi.z, lo.w, hi.w};
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        const uint4 xv = xs[(t * 8 + g) * kXStride + j * (kChunk / 8) + q];
        mma_16816<T>(acc[t], a0, xv.x, xv.y);
        mma_16816<T>(acc[t], a1, xv.z, xv.w);
      }
    }
  }
  cp_async_wait<0>();

  // This CTA's partial tile, [x row][64 weight rows] in fp32, in its (now free) shared memory.
  __syncthreads();
  float* partial = reinterpret_cast<float*>(smem);
  const int local = warp * 16 + g;
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    const int m0 = t * 8 + 2 * q;
    partial[m0 * kSkinnyRowsPerCta + local] = acc[t][0];
    partial[(m0 + 1) * kSkinnyRowsPerCta + local] = acc[t][1];
    partial[m0 * kSkinnyRowsPerCta + local + 8] = acc[t][2];
    partial[(m0 + 1) * kSkinnyRowsPerCta + local + 8] = acc[t][3];
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  // The cluster's CTAs share the sum (CTA r takes elements r * 128 + thread, strided by
  // splits * 128), each element summed over the splits in rank order.
  const int splits = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  for (int e = rank * kThreads + tid; e < a.m * kSkinnyRowsPerCta; e += splits * kThreads) {
    const int out_row = blockIdx.y * kSkinnyRowsPerCta + e % kSkinnyRowsPerCta;
    if (out_row >= a.n) continue;
    float sum = 0.0f;
    for (int r = 0; r < splits; ++r) sum += cluster.map_shared_rank(partial, r)[e];
    if (bias != nullptr) sum += to_float(bias[out_row]);
    y[static_cast<int64_t>(e / kSkinnyRowsPerCta) * a.n + out_row] = from_float<T>(sum);
  }
  cluster.sync();  // no CTA leaves while another still reads its shared memory
}

template <typename T, int kTiles>
cudaError_t launch_tiles(const SkinnyGemmArgs& a, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(a.splits),
                     static_cast<unsigned>((a.n + kSkinnyRowsPerCta - 1) / kSkinnyRowsPerCta));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem_bytes<kTiles>();
  if (const cudaError_t err = allow_dynamic_smem(skinny_gemm_kernel<T, kTiles>,
                                                 smem_bytes<kTiles>());
      err != cudaSuccess) {
    return err;
  }
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(a.splits);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, skinny_gemm_kernel<T, kTiles>, a);
}

template <typename T>
cudaError_t launch_typed(const SkinnyGemmArgs& a, cudaStream_t stream) {
  if (a.m <= 8) return launch_tiles<T, 1>(a, stream);
  if (a.m <= 16) return launch_tiles<T, 2>(a, stream);
  return launch_tiles<T, 4>(a, stream);
}

}  // namespace

void plan_skinny_gemm(SkinnyGemmArgs* a, int sms) {
  static_assert(4 * 8 * kSkinnyRowsPerCta * 4 <= smem_bytes<4>(), "the partial tile must fit");
  // Two CTAs fit an SM (shared memory). Score each split count by the share of the last wave's
  // slots that do work, discounted where a CTA gets fewer than 6 stages (the ring's fill and
  // the cluster's sum are then a large part of its time).
  const int tiles = (a->n + kSkinnyRowsPerCta - 1) / kSkinnyRowsPerCta;
  const int slots = 2 * sms;
  double best = -1.0;
  for (int s = 1; s <= kSkinnyMaxSplits; ++s) {
    const int per = ((a->k + s - 1) / s + kChunk - 1) / kChunk * kChunk;
    const int splits = (a->k + per - 1) / per;
    if (splits != s) continue;
    const int64_t ctas = static_cast<int64_t>(tiles) * s;
    const double waves = static_cast<double>((ctas + slots - 1) / slots);
    const double stages = static_cast<double>(per) / kStageK;
    const double score = ctas / (waves * slots) * std::min(1.0, stages / 6.0);
    if (score > best + 1e-9) {
      best = score;
      a->k_per_split = per;
      a->splits = splits;
    }
  }
}

cudaError_t launch_skinny_gemm(Dtype dtype, const SkinnyGemmArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat16: return launch_typed<__half>(a, stream);
    case Dtype::kBFloat16: return launch_typed<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;  // fp32 is not taken (the caller uses cuBLAS)
  }
}

}  // namespace mage::cuda
