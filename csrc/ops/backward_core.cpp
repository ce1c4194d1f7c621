#include "ops/backward_core.h"

#include <algorithm>
#include <cstdlib>

namespace mage {
namespace {

// Elements of one [units, Hkv, R, C] matrix. The chunk step holds three of them (P, dP / dS and
// a matmul result) at once: ~24 MB on the CPU, ~200 MB on a GPU.
constexpr int64_t kCpuChunkElems = int64_t{1} << 21;
constexpr int64_t kGpuChunkElems = int64_t{1} << 24;
constexpr int64_t kMinKeys = 64;  // below this the matmuls get too thin: split units instead

bool use_atomics() {
  const char* on = std::getenv("MAGE_BACKWARD_ATOMICS");
  return on != nullptr && on[0] != '\0' && on[0] != '0';
}

}  // namespace

QueryRowsGrad::QueryRowsGrad(const MatmulPrecision& math, const at::Tensor& q,
                             const at::Tensor& dout, const at::Tensor& lse,
                             const at::Tensor& delta, double scale)
    : math_(math),
      q_(math.op(q)),
      dout_(math.op(dout)),
      lse_(lse.unsqueeze(-1)),
      delta_(delta.unsqueeze(-1)),
      dq_(at::zeros(q.sizes(), q.options().dtype(math.compute))),
      scale_(scale) {}

std::pair<at::Tensor, at::Tensor> QueryRowsGrad::key_chunk(at::Tensor keys, at::Tensor values,
                                                           const at::Tensor& valid) {
  keys = math_.op(keys);
  values = math_.op(values);
  at::Tensor invalid;
  if (valid.defined()) {
    // Zero the keys/values of invalid slots (past a length or a count: stale or poisoned cache
    // rows) so that no NaN reaches a product, then mask their probabilities.
    invalid = valid.logical_not();
    keys = keys.masked_fill(invalid.unsqueeze(-1), 0);
    values = values.masked_fill(invalid.unsqueeze(-1), 0);
  }
  auto p = math_.mm(q_, keys.transpose(-1, -2));  // logits / scale [U, Hkv, R, C]
  p.mul_(scale_).sub_(lse_).exp_();
  if (invalid.defined()) p.masked_fill_(invalid.unsqueeze(-2), 0);
  auto dvalues = math_.mm(p.transpose(-1, -2), dout_);  // [U, Hkv, C, d]
  auto ds = math_.mm(dout_, values.transpose(-1, -2));  // dP
  ds.sub_(delta_).mul_(p);                              // dS = P * (dP - D)
  p = at::Tensor();                                     // free before the next products
  ds = math_.op(ds);
  dq_.add_(math_.mm(ds, keys));                         // times scale in dq()
  auto dkeys = math_.mm(ds.transpose(-1, -2), q_).mul_(scale_);
  return {dkeys, dvalues};
}

at::Tensor QueryRowsGrad::dq() const { return dq_ * scale_; }

at::Tensor softmax_delta(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& dlse,
                         at::ScalarType acc) {
  auto delta = (dout.to(acc) * out.to(acc)).sum(-1);
  // lse's own gradient: d lse / d logit = P, so it enters as P * dlse, i.e. D - dlse.
  if (dlse.defined()) delta.sub_(dlse.to(acc));
  return delta;
}

ChunkPlan plan_chunks(const at::Device& device, int64_t units, int64_t rows_per_unit,
                      int64_t keys) {
  const int64_t budget = device.is_cpu() ? kCpuChunkElems : kGpuChunkElems;
  rows_per_unit = std::max<int64_t>(rows_per_unit, 1);
  keys = std::max<int64_t>(keys, 1);
  ChunkPlan p;
  p.units_per_group =
      std::clamp<int64_t>(budget / (rows_per_unit * std::min(keys, kMinKeys)), 1, units);
  p.keys_per_chunk =
      std::clamp<int64_t>(budget / (rows_per_unit * p.units_per_group), 1, keys);
  return p;
}

at::Tensor gather_rows(const at::Tensor& cache, const at::Tensor& pos) {
  const auto sizes = pos.sizes();
  return cache.gather(2, pos.unsqueeze(-1).expand({sizes[0], sizes[1], sizes[2], cache.size(3)}));
}

void accumulate_rows(const at::Tensor& dst, const at::Tensor& pos, const at::Tensor& src) {
  const int64_t units = pos.size(0), hkv = pos.size(1), c = pos.size(2), d = src.size(3);
  if (dst.is_cuda() && !use_atomics()) {
    const auto heads = at::arange(hkv, pos.options()).view({1, hkv, 1}).expand_as(pos);
    dst.index_put_({heads, pos}, src, /*accumulate=*/true);
    return;
  }
  // Head-major, then unit by unit: the CPU kernel walks the index dim in this order.
  const auto idx = pos.transpose(0, 1).reshape({hkv, units * c, 1}).expand({hkv, units * c, d});
  dst.scatter_add_(1, idx, src.transpose(0, 1).reshape({hkv, units * c, d}));
}

SelectedRowGrads::SelectedRowGrads(int64_t batch, int64_t hkv, int64_t n_ctx, int64_t dim,
                                   const at::TensorOptions& options)
    : dkv_(at::zeros({batch, hkv, n_ctx + kSpareRows, 2 * dim}, options)),
      n_ctx_(n_ctx),
      dim_(dim) {}

void SelectedRowGrads::add(int64_t b, const at::Tensor& idx, const at::Tensor& valid,
                           const at::Tensor& dk, const at::Tensor& dv) {
  const int64_t n = idx.size(0), c = idx.size(2);
  const auto spare = at::arange(n * c, idx.options()).view({n, 1, c}).remainder(kSpareRows);
  accumulate_rows(dkv_[b], at::where(valid, idx, spare + n_ctx_),
                  at::cat({dk.to(dkv_.scalar_type()), dv.to(dkv_.scalar_type())}, -1));
}

at::Tensor SelectedRowGrads::dk(at::ScalarType dtype) const {
  return dkv_.narrow(2, 0, n_ctx_).narrow(3, 0, dim_).to(dtype).contiguous();
}

at::Tensor SelectedRowGrads::dv(at::ScalarType dtype) const {
  return dkv_.narrow(2, 0, n_ctx_).narrow(3, dim_, dim_).to(dtype).contiguous();
}

}  // namespace mage
