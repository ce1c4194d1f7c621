// The order in which torch's CUDA reduction sums each row of a contiguous fp32 [rows, n] tensor
// in x.mean(-1) (ATen/native/cuda/Reduce.cuh of torch 2.11: setReduceConfig and ReduceOp), and
// the factor its mean multiplies by (ReduceMomentKernel.cu). The fused RMSNorm kernels add their
// squares in this order, so their variance is bit-identical to transformers'
// hidden_states.pow(2).mean(-1) on the GPU for the same tensor shape. Plain C++ without CUDA,
// unit-tested on every machine (tests/cpp/test_sum_order.cpp).
//
// torch's row sum: `threads` reducing threads per row, thread t = x + y * width. With vec == 4
// thread t reads the 4-element vectors u = t, t + threads, ... and adds element 4u + i to its
// accumulator i; with vec == 1 it reads elements e = t + m * threads and adds the m-th to
// accumulator m % 4. Each thread's value is ((acc0 + acc1) + acc2) + acc3. The threads' values
// are then added by a halving tree over x (offsets width/2 ... 1: v[x] += v[x + offset]) and
// then by a halving tree over y (offsets height/2 ... 1), height = threads / width.
#pragma once

#include <cstdint>

namespace mage {

struct SumOrder {
  int vec = 4;       // 4 or 1, see above
  int threads = 32;  // reducing threads per row, width * height
  int width = 32;    // threads along x (a power of two >= 32 for rows of >= 32 elements)
  // torch may also split a row across CTAs (a global reduce), an order the kernels do not
  // reproduce; never for rows of at most 16384 elements (tests/cpp/test_sum_order.cpp).
  bool cta_split = false;
};

// The order of x.mean(-1) for a contiguous, 16-byte aligned fp32 x with `rows` rows of n
// elements (n a multiple of 4).
SumOrder torch_mean_order(int64_t rows, int64_t n);

// torch's mean factor, float(rows) / float(rows * n): fl(1/n) whenever rows * n is exact in float.
float torch_mean_factor(int64_t rows, int64_t n);

}  // namespace mage
