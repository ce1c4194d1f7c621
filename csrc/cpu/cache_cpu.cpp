// CPU append of a finished block's keys/values into the cache.
#include <torch/library.h>

#include "ops/checks.h"

namespace mage::cpu {
namespace {

void append_kv(const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& cache_lens_in, const at::Tensor& k_block,
               const at::Tensor& v_block) {
  const auto d = check_append_inputs("mage.append_kv", k_cache, v_cache, cache_lens_in, k_block,
                                     v_block);
  const auto cache_lens = cache_lens_in.contiguous();
  const int32_t* lens = cache_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < d.batch; ++b) {
    k_cache[b].narrow(1, lens[b], d.block).copy_(k_block[b]);
    v_cache[b].narrow(1, lens[b], d.block).copy_(v_block[b]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CPU, m) { m.impl("append_kv", &append_kv); }

}  // namespace mage::cpu
