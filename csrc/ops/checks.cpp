#include "ops/checks.h"

#include <cmath>
#include <limits>

namespace mage {
namespace {

void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined (None); expected a tensor");
}

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                const char* layout) {
  check_defined(op, name, t);
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must be a ", rank, "-D tensor ", layout,
              ", got shape ", t.sizes());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const at::Device& device, const char* ref = "q") {
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but ", ref,
              " is on ", device, "; all inputs must be on one device");
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ",
              t.scalar_type());
}

void check_shape(const char* op, const char* name, const at::Tensor& t,
                 at::IntArrayRef want, const char* layout) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, " ", layout,
              ", got ", t.sizes());
}

// The kernels read cache rows of d contiguous elements; batch and head strides are free.
void check_cache_layout(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) == t.size(3)), op, ": ", name,
              " must have contiguous rows (stride(3) == 1 and stride(2) == d); got strides ",
              t.strides(), ". Call .contiguous() on the cache once, not per step");
}

}  // namespace

AttentionDims check_attention_inputs(const char* op, const at::Tensor& q,
                                     const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& k_block, const at::Tensor& v_block,
                                     std::optional<double> scale) {
  check_rank(op, "q", q, 4, "[batch, Hq, B, d]");
  check_rank(op, "k_cache", k_cache, 4, "[batch, Hkv, capacity, d]");
  check_rank(op, "v_cache", v_cache, 4, "[batch, Hkv, capacity, d]");
  check_rank(op, "k_block", k_block, 4, "[batch, Hkv, B, d]");
  check_rank(op, "v_block", v_block, 4, "[batch, Hkv, B, d]");

  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
              ": q must be float16, bfloat16 or float32, got ", dtype);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k_cache", &k_cache},
                         {"v_cache", &v_cache}, {"k_block", &k_block}, {"v_block", &v_block}}) {
    TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " has dtype ", t->scalar_type(),
                " but q has ", dtype, "; q, caches and block keys/values must share one dtype");
    check_same_device(op, name, *t, q.device());
  }

  AttentionDims d;
  d.batch = q.size(0);
  d.hq = q.size(1);
  d.block = q.size(2);
  d.dim = q.size(3);
  d.hkv = k_cache.size(1);
  d.capacity = k_cache.size(2);
  TORCH_CHECK(d.batch >= 1 && d.hq >= 1 && d.block >= 1 && d.dim >= 1, op,
              ": q must have non-zero batch, heads, block size and head dim, got shape ",
              q.sizes());
  TORCH_CHECK(d.hkv >= 1, op, ": k_cache has no KV heads (shape ", k_cache.sizes(), ")");
  TORCH_CHECK(d.hq % d.hkv == 0, op, ": q has ", d.hq,
              " heads, which is not a multiple of the ", d.hkv,
              " KV heads of k_cache (GQA needs Hq = G * Hkv)");
  d.group = d.hq / d.hkv;
  TORCH_CHECK(k_cache.size(0) == d.batch && k_cache.size(3) == d.dim, op,
              ": k_cache must have shape [batch=", d.batch, ", Hkv, capacity, d=", d.dim,
              "], got ", k_cache.sizes());
  TORCH_CHECK(d.capacity >= 1, op,
              ": k_cache is empty (capacity 0); pass a cache with at least one position "
              "(sequences with no cached tokens use cache_lens = 0)");
  check_shape(op, "v_cache", v_cache, k_cache.sizes(), "(the shape of k_cache)");
  check_cache_layout(op, "k_cache", k_cache);
  TORCH_CHECK(v_cache.strides() == k_cache.strides(), op,
              ": v_cache must have the strides of k_cache, got ", v_cache.strides(), " vs ",
              k_cache.strides());
  const std::vector<int64_t> block_shape{d.batch, d.hkv, d.block, d.dim};
  check_shape(op, "k_block", k_block, block_shape, "[batch, Hkv, B, d]");
  check_shape(op, "v_block", v_block, block_shape, "[batch, Hkv, B, d]");

  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale) && *scale > 0, op,
                ": scale must be a positive finite number, got ", *scale);
    d.scale = *scale;
  } else {
    d.scale = 1.0 / std::sqrt(static_cast<double>(d.dim));
  }
  if (q.is_cuda()) {
    TORCH_CHECK(d.dim == 64 || d.dim == 128, op,
                ": the CUDA kernels support head dim 64 or 128, got d = ", d.dim);
    TORCH_CHECK(d.block <= 64, op, ": the CUDA kernels support block sizes up to 64, got B = ",
                d.block);
  }
  return d;
}

void check_cache_lens(const char* op, const at::Tensor& cache_lens, const AttentionDims& dims,
                      const at::Device& device, int64_t extra, const char* ref) {
  check_rank(op, "cache_lens", cache_lens, 1, "[batch]");
  check_dtype(op, "cache_lens", cache_lens, at::kInt);
  check_same_device(op, "cache_lens", cache_lens, device, ref);
  TORCH_CHECK(cache_lens.size(0) == dims.batch, op, ": cache_lens must have ", dims.batch,
              " entries (one per sequence), got ", cache_lens.size(0));
  if (cache_lens.is_cpu()) {
    const auto lens = cache_lens.contiguous();
    const int32_t* p = lens.data_ptr<int32_t>();
    for (int64_t b = 0; b < dims.batch; ++b) {
      TORCH_CHECK(p[b] >= 0 && p[b] + extra <= dims.capacity, op, ": cache_lens[", b, "] = ",
                  p[b], extra ? " plus the block" : "", " does not fit the cache capacity ",
                  dims.capacity, " (expected 0 <= cache_lens[b]",
                  extra ? " + B" : "", " <= capacity)");
    }
  }
}

void check_selection(const char* op, const at::Tensor& indices, const at::Tensor& counts,
                     const AttentionDims& dims, const at::Device& device) {
  check_rank(op, "indices", indices, 3, "[batch, Hkv, k]");
  check_rank(op, "counts", counts, 2, "[batch, Hkv]");
  check_dtype(op, "indices", indices, at::kInt);
  check_dtype(op, "counts", counts, at::kInt);
  check_same_device(op, "indices", indices, device);
  check_same_device(op, "counts", counts, device);
  TORCH_CHECK(indices.size(0) == dims.batch && indices.size(1) == dims.hkv, op,
              ": indices must have shape [batch=", dims.batch, ", Hkv=", dims.hkv,
              ", k], got ", indices.sizes());
  TORCH_CHECK(indices.size(2) >= 1, op, ": indices must hold at least one slot (k >= 1)");
  check_shape(op, "counts", counts, {dims.batch, dims.hkv}, "[batch, Hkv]");
  if (indices.is_cpu()) {
    const auto idx = indices.contiguous();
    const auto cnt = counts.contiguous();
    const int32_t* pi = idx.data_ptr<int32_t>();
    const int32_t* pc = cnt.data_ptr<int32_t>();
    const int64_t k = indices.size(2);
    for (int64_t bh = 0; bh < dims.batch * dims.hkv; ++bh) {
      const int64_t b = bh / dims.hkv, h = bh % dims.hkv;
      TORCH_CHECK(pc[bh] >= 0 && pc[bh] <= k, op, ": counts[", b, ", ", h, "] = ", pc[bh],
                  " is outside [0, k=", k, "]");
      for (int64_t i = 0; i < pc[bh]; ++i) {
        const int32_t j = pi[bh * k + i];
        TORCH_CHECK(j >= 0 && j < dims.capacity, op, ": indices[", b, ", ", h, ", ", i,
                    "] = ", j, " is outside the cache (expected 0 <= index < capacity=",
                    dims.capacity, ")");
        // A repeated index would be attended twice (its softmax weight doubled).
        TORCH_CHECK(i == 0 || j > pi[bh * k + i - 1], op, ": indices[", b, ", ", h, ", ", i,
                    "] = ", j, " does not follow indices[", b, ", ", h, ", ", i - 1, "] = ",
                    pi[bh * k + i - 1], " (expected the first counts[b, h] indices strictly "
                    "ascending: sorted, no repeats)");
      }
    }
  }
}

void check_attention_outputs(const char* op, const AttentionDims& dims, const at::Tensor& q,
                             const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor* scores) {
  check_defined(op, "out", out);
  check_defined(op, "lse", lse);
  check_shape(op, "out", out, q.sizes(), "(the shape of q)");
  check_dtype(op, "out", out, q.scalar_type());
  check_shape(op, "lse", lse, {dims.batch, dims.hq, dims.block}, "[batch, Hq, B]");
  check_dtype(op, "lse", lse, at::kFloat);
  check_same_device(op, "out", out, q.device());
  check_same_device(op, "lse", lse, q.device());
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous(), op,
              ": out and lse must be contiguous");
  if (scores != nullptr) {
    check_defined(op, "scores", *scores);
    check_shape(op, "scores", *scores, {dims.batch, dims.hkv, dims.capacity},
                "[batch, Hkv, capacity]");
    check_dtype(op, "scores", *scores, at::kFloat);
    check_same_device(op, "scores", *scores, q.device());
    TORCH_CHECK(scores->is_contiguous(), op, ": scores must be contiguous");
  }
}

TopkDims check_topk_inputs(const char* op, const at::Tensor& scores,
                           const at::Tensor& cache_lens, int64_t k, int64_t n_sink,
                           int64_t n_recent) {
  check_rank(op, "scores", scores, 3, "[batch, Hkv, capacity]");
  check_dtype(op, "scores", scores, at::kFloat);
  TopkDims d{scores.size(0), scores.size(1), scores.size(2), k};
  TORCH_CHECK(d.batch >= 1 && d.hkv >= 1, op, ": scores has an empty batch or head dim: ",
              scores.sizes());
  TORCH_CHECK(d.capacity >= 1, op, ": scores is empty (cache capacity 0); nothing to select");
  TORCH_CHECK(k >= 1, op, ": k must be >= 1, got ", k);
  TORCH_CHECK(k <= d.capacity, op, ": k = ", k, " is larger than the cache capacity ",
              d.capacity, " (scores.size(2)); clamp the budget to the capacity");
  TORCH_CHECK(n_sink >= 0 && n_recent >= 0, op,
              ": n_sink and n_recent must be >= 0, got ", n_sink, " and ", n_recent);
  TORCH_CHECK(n_sink + n_recent <= k, op, ": n_sink + n_recent = ", n_sink + n_recent,
              " exceeds k = ", k, " (always-kept positions count towards the budget)");
  AttentionDims ad;
  ad.batch = d.batch;
  ad.capacity = d.capacity;
  check_cache_lens(op, cache_lens, ad, scores.device(), 0, "scores");
  return d;
}

void check_topk_outputs(const char* op, const TopkDims& dims, const at::Tensor& scores,
                        const at::Tensor& indices, const at::Tensor& counts) {
  check_defined(op, "indices", indices);
  check_defined(op, "counts", counts);
  check_shape(op, "indices", indices, {dims.batch, dims.hkv, dims.k}, "[batch, Hkv, k]");
  check_shape(op, "counts", counts, {dims.batch, dims.hkv}, "[batch, Hkv]");
  check_dtype(op, "indices", indices, at::kInt);
  check_dtype(op, "counts", counts, at::kInt);
  check_same_device(op, "indices", indices, scores.device(), "scores");
  check_same_device(op, "counts", counts, scores.device(), "scores");
  TORCH_CHECK(indices.is_contiguous() && counts.is_contiguous(), op,
              ": indices and counts must be contiguous");
}

void check_fits_int(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value <= std::numeric_limits<int32_t>::max(), op, ": ", what, " = ", value,
              " does not fit the 32-bit ints the CUDA kernels index with (at most ",
              std::numeric_limits<int32_t>::max(), ")");
}

AttentionDims check_append_inputs(const char* op, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                  const at::Tensor& k_block, const at::Tensor& v_block) {
  check_rank(op, "k_cache", k_cache, 4, "[batch, Hkv, capacity, d]");
  check_rank(op, "v_cache", v_cache, 4, "[batch, Hkv, capacity, d]");
  check_rank(op, "k_block", k_block, 4, "[batch, Hkv, B, d]");
  check_rank(op, "v_block", v_block, 4, "[batch, Hkv, B, d]");
  AttentionDims d;
  d.batch = k_cache.size(0);
  d.hkv = d.hq = k_cache.size(1);
  d.group = 1;
  d.capacity = k_cache.size(2);
  d.dim = k_cache.size(3);
  d.block = k_block.size(2);
  TORCH_CHECK(d.capacity >= 1, op, ": k_cache is empty (capacity 0)");
  check_shape(op, "v_cache", v_cache, k_cache.sizes(), "(the shape of k_cache)");
  check_cache_layout(op, "k_cache", k_cache);
  check_cache_layout(op, "v_cache", v_cache);
  const std::vector<int64_t> block_shape{d.batch, d.hkv, d.block, d.dim};
  check_shape(op, "k_block", k_block, block_shape, "[batch, Hkv, B, d] (batch, Hkv, d of k_cache)");
  check_shape(op, "v_block", v_block, block_shape, "[batch, Hkv, B, d] (batch, Hkv, d of k_cache)");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"v_cache", &v_cache},
                         {"k_block", &k_block}, {"v_block", &v_block}}) {
    TORCH_CHECK(t->scalar_type() == k_cache.scalar_type(), op, ": ", name, " has dtype ",
                t->scalar_type(), " but k_cache has ", k_cache.scalar_type());
    check_same_device(op, name, *t, k_cache.device(), "k_cache");
  }
  check_cache_lens(op, cache_lens, d, k_cache.device(), d.block, "k_cache");
  return d;
}

}  // namespace mage
