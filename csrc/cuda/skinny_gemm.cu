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
// work. W streams from memory straight into registers, a group of four 32-K chunks loaded while
// the previous group multiplies; x's slice is staged in shared memory 512 K at a time and read
// by all four warps. At the end each CTA leaves its fp32 partial tile in shared memory and the
// cluster sums the partials in rank order through distributed shared memory (deterministic).
#include <cooperative_groups.h>

#include <algorithm>

#include "cuda/fused_common.cuh"
#include "cuda/skinny_gemm.h"

namespace mage::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 128;
constexpr int kChunk = 32;                  // K per 16-byte load of each of the 4 threads of a row
constexpr int kGroup = 4;                   // chunks per group (loaded together, in flight)
constexpr int kPiece = 512;                 // K of x staged in shared memory at a time
constexpr int kPieceVecs = kPiece / 8;      // 16-byte vectors per staged row
constexpr int kRowStride = kPieceVecs + 4;  // +64 bytes: rows g and g+1 land 16 banks apart

template <int kTiles>
constexpr int smem_bytes() {
  return kTiles * 8 * kRowStride * 16;
}

// A 16-byte read of data used once: not kept in L1, the next 256 bytes fetched into L2.
MAGE_DEVICE uint4 load_streaming(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// kTiles 8-row tiles of x (M <= 8 * kTiles).
template <typename T, int kTiles>
__global__ void __launch_bounds__(kThreads)
    skinny_gemm_kernel(const __grid_constant__ SkinnyGemmArgs a) {
  extern __shared__ uint4 smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  const int kbeg = blockIdx.x * a.k_per_split;
  const int kend = min(a.k, kbeg + a.k_per_split);
  const int row = blockIdx.y * kSkinnyRowsPerCta + warp * 16 + g;  // and row + 8
  const T* x = static_cast<const T*>(a.x);
  const T* w_lo = static_cast<const T*>(a.w) + static_cast<int64_t>(row) * a.k;
  const T* w_hi = w_lo + static_cast<int64_t>(8) * a.k;
  const bool lo_ok = row < a.n, hi_ok = row + 8 < a.n;

  float acc[kTiles][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 cur[kGroup][2], nxt[kGroup][2];
  auto load_group = [&](uint4 (&buf)[kGroup][2], int k0) {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int k = k0 + j * kChunk + 8 * q;
      const bool in = k < kend;  // K % 8 == 0: a 16-byte piece is wholly in or out
      buf[j][0] = in && lo_ok ? load_streaming(w_lo + k) : zero;
      buf[j][1] = in && hi_ok ? load_streaming(w_hi + k) : zero;
    }
  };

  load_group(cur, kbeg);
  int piece = kbeg;
  for (int k0 = kbeg; k0 < kend; k0 += kGroup * kChunk) {
    if ((k0 - kbeg) % kPiece == 0) {  // stage x[:, k0 : k0 + kPiece) (zeros past M and kend)
      piece = k0;
      __syncthreads();
      for (int i = threadIdx.x; i < kTiles * 8 * kPieceVecs; i += kThreads) {
        const int r = i / kPieceVecs, k = k0 + (i % kPieceVecs) * 8;
        smem[r * kRowStride + i % kPieceVecs] =
            r < a.m && k < kend
                ? *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(r) * a.k + k)
                : zero;
      }
      __syncthreads();
    }
    const int next = k0 + kGroup * kChunk;
    if (next < kend) load_group(nxt, next);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int col = (k0 - piece + j * kChunk) / 8 + q;
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        const uint4 xv = smem[(t * 8 + g) * kRowStride + col];
        const uint32_t a0[4] = {cur[j][0].x, cur[j][1].x, cur[j][0].y, cur[j][1].y};
        const uint32_t a1[4] = {cur[j][0].z, cur[j][1].z, cur[j][0].w, cur[j][1].w};
        mma_16816<T>(acc[t], a0, xv.x, xv.y);
        mma_16816<T>(acc[t], a1, xv.z, xv.w);
      }
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      cur[j][0] = nxt[j][0];
      cur[j][1] = nxt[j][1];
    }
  }

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
  for (int e = rank * kThreads + threadIdx.x; e < a.m * kSkinnyRowsPerCta;
       e += splits * kThreads) {
    const int out_row = blockIdx.y * kSkinnyRowsPerCta + e % kSkinnyRowsPerCta;
    if (out_row >= a.n) continue;
    float s = 0.0f;
    for (int r = 0; r < splits; ++r) s += cluster.map_shared_rank(partial, r)[e];
    if (bias != nullptr) s += to_float(bias[out_row]);
    y[static_cast<int64_t>(e / kSkinnyRowsPerCta) * a.n + out_row] = from_float<T>(s);
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
  static_assert(smem_bytes<4>() <= 48 * 1024, "x's staging must fit the default shared memory");
  static_assert(4 * 8 * kSkinnyRowsPerCta * 4 <= smem_bytes<4>(), "the partial tile must fit");
  const int tiles = (a->n + kSkinnyRowsPerCta - 1) / kSkinnyRowsPerCta;
  int splits = (2 * sms + tiles - 1) / tiles;  // at least two CTAs per SM
  splits = std::clamp(splits, 1, kSkinnyMaxSplits);
  splits = std::min(splits, std::max(1, a->k / (kGroup * kChunk)));  // a group per split at least
  const int per = (a->k + splits - 1) / splits;
  a->k_per_split = (per + kChunk - 1) / kChunk * kChunk;
  a->splits = (a->k + a->k_per_split - 1) / a->k_per_split;
}

cudaError_t launch_skinny_gemm(Dtype dtype, const SkinnyGemmArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat16: return launch_typed<__half>(a, stream);
    case Dtype::kBFloat16: return launch_typed<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;  // fp32 is not taken (the caller uses cuBLAS)
  }
}

}  // namespace mage::cuda
