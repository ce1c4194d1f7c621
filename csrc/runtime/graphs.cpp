// Capture needs a non-default stream: generate() runs the whole generation on a stream from
// the pool (see generate.cpp), so warm-up, capture and replay share one stream and stay ordered.
#include "runtime/graphs.h"

#include "runtime/sync_check.h"

#ifdef MAGE_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace mage::runtime {

struct GraphedForward::Impl {
  Forward forward;
  bool enabled;
  int calls = 0;
  at::Tensor ids, logits;  // the graph's input and output buffers
#ifdef MAGE_WITH_CUDA
  std::unique_ptr<at::cuda::CUDAGraph> graph;
#endif
};

GraphedForward::GraphedForward(Forward forward, bool enabled) : impl_(new Impl) {
  impl_->forward = std::move(forward);
  impl_->enabled = enabled;
}

GraphedForward::~GraphedForward() = default;
GraphedForward::GraphedForward(GraphedForward&&) noexcept = default;
GraphedForward& GraphedForward::operator=(GraphedForward&&) noexcept = default;

bool GraphedForward::replaying() const {
#ifdef MAGE_WITH_CUDA
  return impl_->graph != nullptr;
#else
  return false;
#endif
}

at::Tensor GraphedForward::operator()(const at::Tensor& ids) {
  Impl& s = *impl_;
  ++s.calls;
#ifdef MAGE_WITH_CUDA
  if (s.enabled && ids.is_cuda() && s.calls >= 2) {
    if (!s.graph) {
      // Capture itself may synchronise (and a sync inside the forward would fail the capture
      // anyway), so MAGE_SYNC_CHECK exempts it.
      AllowSync allowed;
      s.ids = ids.clone();
      s.graph = std::make_unique<at::cuda::CUDAGraph>();
      c10::cuda::device_synchronize();  // nothing of the eager calls may run during capture
      s.graph->capture_begin();
      try {
        s.logits = s.forward(s.ids);
      } catch (...) {
        s.graph->capture_end();
        s.graph.reset();
        throw;
      }
      s.graph->capture_end();
    }
    s.ids.copy_(ids);
    s.graph->replay();
    return s.logits;
  }
#endif
  return s.forward(ids);
}

}  // namespace mage::runtime
