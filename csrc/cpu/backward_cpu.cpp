// CPU kernels of the backward ops: the device-generic ATen implementation
// (ops/attention_backward.h), which runs its matmuls through BLAS with intra-op threads.
#include <torch/library.h>

#include "ops/attention_backward.h"

TORCH_LIBRARY_IMPL(mage, CPU, m) {
  m.impl("dense_attention_backward", &mage::dense_attention_backward_generic);
  m.impl("sparse_attention_backward", &mage::sparse_attention_backward_generic);
  m.impl("block_sparse_attention_backward", &mage::block_sparse_attention_backward_generic);
}
