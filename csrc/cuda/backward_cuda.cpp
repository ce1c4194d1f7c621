// CUDA kernels of the backward ops. For now the device-generic ATen implementation
// (ops/attention_backward.h: a chunked recompute with the saved lse, cuBLAS matmuls over
// bounded key chunks, deterministic accumulation). This registration is the dispatch point for
// a fused CUDA backward kernel (FlashAttention-2/3 style, see ops/backward_core.h): register it
// here and keep the generic path for the shapes and dtypes the kernel does not cover.
// block_sparse_attention_backward registers in block_sparse_backward_cuda.cpp (an opt-in
// FlashAttention variable-length path in front of the generic one).
#include <torch/library.h>

#include "ops/attention_backward.h"

TORCH_LIBRARY_IMPL(mage, CUDA, m) {
  m.impl("dense_attention_backward", &mage::dense_attention_backward_generic);
  m.impl("sparse_attention_backward", &mage::sparse_attention_backward_generic);
}
