// CUDA-graph replay of the forwards a generation repeats (the C++ counterpart of
// mage_ext/graphs.py, for every kind of forward): the first call of a kind runs eagerly (lazy
// initialisation such as cuBLAS workspaces happens outside any capture), the second is captured
// into a graph and replayed, later calls only replay. The forward reads its ids from a fixed
// buffer and leaves its logits in a fixed tensor; everything else it reads (weights, KV cache,
// lengths, MAGE's selection buffers) already lives at fixed addresses.
//
// A build without CUDA (or a CPU model) runs every call eagerly: same results, no graphs.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <memory>

namespace mage::runtime {

class GraphedForward {
 public:
  using Forward = std::function<at::Tensor(const at::Tensor& ids)>;
  // enabled: capture and replay on CUDA; otherwise always eager.
  GraphedForward(Forward forward, bool enabled);
  ~GraphedForward();
  GraphedForward(GraphedForward&&) noexcept;
  GraphedForward& operator=(GraphedForward&&) noexcept;

  // The logits of forward(ids). When replayed, the returned tensor is the graph's own output:
  // valid until the next call of this object (callers consume it before the next forward).
  at::Tensor operator()(const at::Tensor& ids);

  bool replaying() const;  // a graph has been captured

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mage::runtime
