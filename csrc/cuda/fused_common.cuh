// Device helpers of the fused elementwise kernels: 16-byte vectors, rounding to the activation
// dtype, and the RMSNorm row sum in the order torch's reduction uses (ops/sum_order.h).
//
// Every rounding step of the torch op sequence the kernels replace is reproduced: each torch op
// on bf16/fp16 tensors computes in fp32 and rounds once to the output dtype (round_to), and
// fp32 results are rounded once per op. The fp32 arithmetic uses the _rn intrinsics so that the
// compiler cannot contract a multiply and an add into one fma (torch runs them as two kernels).
#pragma once

#include <cstdint>

#include "cuda/device_utils.cuh"
#include "cuda/fused_args.h"

namespace mage::cuda {

// Calls fn(T{}) with T the element type of dtype: the per-dtype launch of a kernel template.
template <typename Fn>
cudaError_t with_element_type(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat16: return fn(__half{});
    case Dtype::kBFloat16: return fn(__nv_bfloat16{});
    default: return fn(float{});
  }
}

// Opts `kernel` in to `bytes` of dynamic shared memory where that is more than the default 48 KB.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// Elements of one 16-byte vector, and the vector itself.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct alignas(16) Vec {
  T v[kVec<T>];
};

// Four elements, read from shared memory in one access.
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

template <typename T>
MAGE_DEVICE Vec<T> load_vec(const T* p) {
  Vec<T> r;
  *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
  return r;
}

template <typename T>
MAGE_DEVICE void store_vec(T* p, const Vec<T>& r) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

// The value a torch op with output dtype T stores for the fp32 result x (round to nearest even).
template <typename T>
MAGE_DEVICE float round_to(float x) {
  return to_float(from_float<T>(x));
}

MAGE_DEVICE float square(float x) { return __fmul_rn(x, x); }

// The butterfly over a warp's 32 values. Every lane ends with the value lane 0 gets from torch's
// shuffle-down tree (offsets 16 ... 1): the same additions of the same operands.
MAGE_DEVICE float warp_tree_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// The value reducing thread t of torch's row sum holds before the tree (ops/sum_order.h): its
// four accumulators of squares, then ((a0 + a1) + a2) + a3.
template <typename T>
MAGE_DEVICE float torch_thread_sum_sq(const T* row, int n, const SumOrder& o, int t) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  if (o.vec == 4) {
#pragma unroll 4
    for (int e = 4 * t; e + 3 < n; e += 4 * o.threads) {
      const Quad<T> q = *reinterpret_cast<const Quad<T>*>(row + e);  // row is 16-byte aligned
      a0 = __fadd_rn(a0, square(to_float(q.v[0])));
      a1 = __fadd_rn(a1, square(to_float(q.v[1])));
      a2 = __fadd_rn(a2, square(to_float(q.v[2])));
      a3 = __fadd_rn(a3, square(to_float(q.v[3])));
    }
  } else {
    const int s = o.threads;
    int e = t;
    for (; e + 3 * s < n; e += 4 * s) {
      a0 = __fadd_rn(a0, square(to_float(row[e])));
      a1 = __fadd_rn(a1, square(to_float(row[e + s])));
      a2 = __fadd_rn(a2, square(to_float(row[e + 2 * s])));
      a3 = __fadd_rn(a3, square(to_float(row[e + 3 * s])));
    }
    if (e < n) a0 = __fadd_rn(a0, square(to_float(row[e])));
    if (e + s < n) a1 = __fadd_rn(a1, square(to_float(row[e + s])));
    if (e + 2 * s < n) a2 = __fadd_rn(a2, square(to_float(row[e + 2 * s])));
  }
  return __fadd_rn(__fadd_rn(__fadd_rn(a0, a1), a2), a3);
}

// Sum of the squares of row[0, n) in torch's order `o`, by one whole warp; every lane gets it.
// row is in shared memory, written before the call (the caller synchronises); scratch is the
// warp's o.threads floats of shared memory, used when torch sums a row with more than 32 threads.
template <typename T>
MAGE_DEVICE float torch_row_sum_sq(const T* row, int n, const SumOrder& o, float* scratch) {
  const int lane = threadIdx.x & 31;
  if (o.threads == 32) return warp_tree_sum(torch_thread_sum_sq(row, n, o, lane));

  for (int t = lane; t < o.threads; t += 32) scratch[t] = torch_thread_sum_sq(row, n, o, t);
  __syncwarp();
  // The tree over x: its levels above a warp (shared memory in torch), then within a warp.
  for (int offset = o.width / 2; offset >= 32; offset >>= 1) {
    for (int t = lane; t < o.threads; t += 32) {
      if (t % o.width < offset) scratch[t] = __fadd_rn(scratch[t], scratch[t + offset]);
    }
    __syncwarp();
  }
  const int height = o.threads / o.width;
  for (int y = 0; y < height; ++y) {
    const float v = warp_tree_sum(scratch[y * o.width + lane]);
    __syncwarp();
    if (lane == 0) scratch[y * o.width] = v;
    __syncwarp();
  }
  // The tree over y.
  for (int offset = height / 2; offset >= 1; offset >>= 1) {
    if (lane < offset) {
      scratch[lane * o.width] =
          __fadd_rn(scratch[lane * o.width], scratch[(lane + offset) * o.width]);
    }
    __syncwarp();
  }
  const float sum = scratch[0];
  __syncwarp();  // scratch may be reused once every lane has read it
  return sum;
}

// 1 / sqrt(mean + eps) as transformers' RMSNorm computes it on the GPU: the mean is torch's
// sum * factor, and torch.rsqrt runs rsqrtf (the same instruction sequence, no fast math).
MAGE_DEVICE float rms_inverse(float sum_sq, float mean_factor, float eps) {
  return rsqrtf(__fadd_rn(__fmul_rn(sum_sq, mean_factor), eps));
}

// weight * (h * inv).to(T): the normalised value transformers' RMSNorm stores.
template <typename T>
MAGE_DEVICE float rms_apply(float h, float inv, float weight) {
  return round_to<T>(__fmul_rn(weight, round_to<T>(__fmul_rn(h, inv))));
}

}  // namespace mage::cuda
