// Host-side helpers shared by the CUDA entry points (ops_cuda.cpp, fused_ops_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cuda/kernel_args.h"  // Dtype

namespace mage::cuda {

// The kernels' element type of a float16 / bfloat16 / float32 tensor (checked by the caller).
inline Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: return Dtype::kFloat32;
  }
}

// Whether t's data starts at a 16-byte aligned address (the kernels' vector loads).
inline bool is_aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline void check_aligned(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_aligned16(t), op, ": ", name,
              " must start at a 16-byte aligned address for the CUDA kernels (a view with an "
              "odd storage offset?); call .contiguous() or clone() it");
}

}  // namespace mage::cuda
