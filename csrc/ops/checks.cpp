#include "ops/checks.h"

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <string>
#include <vector>
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

// Each named tensor has q's dtype and device; `together` names the group in the message.
void check_like_q(const char* op, const at::Tensor& q,
                  std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors,
                  const char* together) {
  for (auto [name, t] : tensors) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ",
                t->scalar_type(), " but q has ", q.scalar_type(), "; ", together,
                " must share one dtype");
    check_same_device(op, name, *t, q.device());
  }
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

void check_activation_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op, ": ",
              name, " must be float16, bfloat16 or float32, got ", dtype);
}

// `t` (named `name`) has the dtype and device of `ref` (named `ref_name`).
void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  check_defined(op, name, t);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type(),
              "; they must share one dtype");
  check_same_device(op, name, t, ref.device(), ref_name);
}

void check_contiguous_output(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (a preallocated output)");
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ",
              eps);
}

}  // namespace

AttentionDims check_attention_inputs(const char* op, const at::Tensor& q,
                                     const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& k_block, const at::Tensor& v_block,
                                     std::optional<double> scale, const AttentionNames& n,
                                     int64_t cuda_block) {
  check_rank(op, "q", q, 4, "[batch, Hq, B, d]");
  check_rank(op, n.k_cache, k_cache, 4, n.cache_layout);
  check_rank(op, n.v_cache, v_cache, 4, n.cache_layout);
  check_rank(op, n.k_block, k_block, 4, n.block_layout);
  check_rank(op, n.v_block, v_block, 4, n.block_layout);

  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  (dtype == at::kDouble && q.is_cpu()),
              op, ": q must be float16, bfloat16 or float32 (float64 on the CPU only), got ",
              dtype, " on ", q.device());
  check_like_q(op, q, {{n.k_cache, &k_cache}, {n.v_cache, &v_cache}, {n.k_block, &k_block},
                       {n.v_block, &v_block}}, "q, caches and block keys/values");

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
  TORCH_CHECK(d.hkv >= 1, op, ": ", n.k_cache, " has no KV heads (shape ", k_cache.sizes(), ")");
  TORCH_CHECK(d.hq % d.hkv == 0, op, ": q has ", d.hq,
              " heads, which is not a multiple of the ", d.hkv, " KV heads of ", n.k_cache,
              " (GQA needs Hq = G * Hkv)");
  d.group = d.hq / d.hkv;
  TORCH_CHECK(k_cache.size(0) == d.batch && k_cache.size(3) == d.dim, op, ": ", n.k_cache,
              " must have shape ", n.cache_layout, " with batch=", d.batch, " and d=", d.dim,
              ", got ", k_cache.sizes());
  TORCH_CHECK(d.capacity >= 1, op, ": ", n.k_cache,
              " is empty (capacity 0); pass a cache with at least one position "
              "(sequences with no cached tokens use cache_lens = 0 or counts = 0)");
  check_shape(op, n.v_cache, v_cache, k_cache.sizes(), "(the shape of the key cache)");
  check_cache_layout(op, n.k_cache, k_cache);
  TORCH_CHECK(v_cache.strides() == k_cache.strides(), op, ": ", n.v_cache,
              " must have the strides of ", n.k_cache, ", got ", v_cache.strides(), " vs ",
              k_cache.strides());
  const std::vector<int64_t> block_shape{d.batch, d.hkv, d.block, d.dim};
  check_shape(op, n.k_block, k_block, block_shape, n.block_layout);
  check_shape(op, n.v_block, v_block, block_shape, n.block_layout);

  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale) && *scale > 0, op,
                ": scale must be a positive finite number, got ", *scale);
    d.scale = *scale;
  } else {
    d.scale = 1.0 / std::sqrt(static_cast<double>(d.dim));
  }
  if (q.is_cuda()) {
    const int64_t block = cuda_block >= 0 ? cuda_block : d.block;
    TORCH_CHECK(d.dim == 64 || d.dim == 128, op,
                ": the CUDA kernels support head dim 64 or 128, got d = ", d.dim);
    TORCH_CHECK(block <= 64, op, ": the CUDA kernels support block sizes up to 64, got B = ",
                block);
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

namespace {

// Values of a selection: counts in [0, k], the first counts entries of each row in [0, capacity).
// indices [rows..., k] and counts [rows...] (contiguous copies are taken); `lead` is the shape of
// the row dims, for messages that give each bad entry's coordinates.
void check_selection_values(const char* op, const at::Tensor& indices, const at::Tensor& counts,
                            at::IntArrayRef lead, int64_t capacity) {
  const auto idx = indices.contiguous();
  const auto cnt = counts.contiguous();
  const int32_t* pi = idx.data_ptr<int32_t>();
  const int32_t* pc = cnt.data_ptr<int32_t>();
  const int64_t k = indices.size(-1);
  auto where = [&](int64_t row) {
    std::vector<int64_t> at(lead.size());
    for (int64_t i = static_cast<int64_t>(lead.size()) - 1; i >= 0; --i) {
      at[i] = row % lead[i];
      row /= lead[i];
    }
    std::string s;
    for (size_t i = 0; i < at.size(); ++i) s += (i ? ", " : "") + std::to_string(at[i]);
    return s;
  };
  for (int64_t row = 0; row < counts.numel(); ++row) {
    TORCH_CHECK(pc[row] >= 0 && pc[row] <= k, op, ": counts[", where(row), "] = ", pc[row],
                " is outside [0, k=", k, "]");
    for (int64_t i = 0; i < pc[row]; ++i) {
      const int32_t j = pi[row * k + i];
      TORCH_CHECK(j >= 0 && j < capacity, op, ": indices[", where(row), ", ", i, "] = ", j,
                  " is outside the cache (expected 0 <= index < capacity=", capacity, ")");
      // A repeated index would be attended twice (its softmax weight doubled).
      TORCH_CHECK(i == 0 || j > pi[row * k + i - 1], op, ": indices[", where(row), ", ", i,
                  "] = ", j, " does not follow indices[", where(row), ", ", i - 1, "] = ",
                  pi[row * k + i - 1], " (expected the first counts indices of each row strictly "
                  "ascending: sorted, no repeats)");
    }
  }
}

// indices [lead..., k] and counts [lead...] int32 on `device` (lead: named sizes, e.g. batch and
// Hkv); on the CPU also the values.
void check_selection_tensors(const char* op, const at::Tensor& indices, const at::Tensor& counts,
                             const std::vector<std::pair<const char*, int64_t>>& lead,
                             int64_t capacity, const at::Device& device) {
  std::string layout = "[", expected = "[";
  std::vector<int64_t> lead_sizes;
  for (const auto& [name, size] : lead) {
    layout += std::string(name) + ", ";
    expected += std::string(name) + "=" + std::to_string(size) + ", ";
    lead_sizes.push_back(size);
  }
  const std::string counts_layout = layout.substr(0, layout.size() - 2) + "]";
  layout += "k]";
  expected += "k]";
  const auto rank = static_cast<int64_t>(lead.size());
  check_rank(op, "indices", indices, rank + 1, layout.c_str());
  check_rank(op, "counts", counts, rank, counts_layout.c_str());
  check_dtype(op, "indices", indices, at::kInt);
  check_dtype(op, "counts", counts, at::kInt);
  check_same_device(op, "indices", indices, device);
  check_same_device(op, "counts", counts, device);
  TORCH_CHECK(indices.sizes().slice(0, rank) == at::IntArrayRef(lead_sizes), op,
              ": indices must have shape ", expected, ", got ", indices.sizes());
  TORCH_CHECK(indices.size(rank) >= 1, op, ": indices must hold at least one slot (k >= 1)");
  check_shape(op, "counts", counts, lead_sizes, counts_layout.c_str());
  if (indices.is_cpu()) check_selection_values(op, indices, counts, counts.sizes(), capacity);
}

}  // namespace

void check_selection(const char* op, const at::Tensor& indices, const at::Tensor& counts,
                     const AttentionDims& dims, const at::Device& device) {
  check_selection_tensors(op, indices, counts, {{"batch", dims.batch}, {"Hkv", dims.hkv}},
                          dims.capacity, device);
}

void check_block_selection(const char* op, const at::Tensor& indices, const at::Tensor& counts,
                           int64_t batch, int64_t n_blocks, int64_t hkv, int64_t ctx_len,
                           const at::Device& device) {
  check_selection_tensors(op, indices, counts,
                          {{"batch", batch}, {"n_blocks", n_blocks}, {"Hkv", hkv}}, ctx_len,
                          device);
}

BlockSparseDims check_block_sparse_inputs(const char* op, const at::Tensor& q,
                                          const at::Tensor& k_ctx, const at::Tensor& v_ctx,
                                          const at::Tensor& indices, const at::Tensor& counts,
                                          const at::Tensor& k_own, const at::Tensor& v_own,
                                          int64_t block_size, std::optional<double> scale) {
  TORCH_CHECK(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
  AttentionNames names;
  names.k_cache = "k_ctx";
  names.v_cache = "v_ctx";
  names.k_block = "k_own";
  names.v_block = "v_own";
  names.cache_layout = "[batch, Hkv, N, d]";
  names.block_layout = "[batch, Hkv, T, d]";
  BlockSparseDims r;
  r.dims = check_attention_inputs(op, q, k_ctx, v_ctx, k_own, v_own, scale, names, block_size);
  r.block_size = block_size;
  TORCH_CHECK(r.dims.block % block_size == 0, op, ": the sequence length T = q.size(2) = ",
              r.dims.block, " is not a multiple of block_size = ", block_size);
  r.n_blocks = r.dims.block / block_size;
  if (q.is_cuda()) {
    TORCH_CHECK(r.n_blocks * r.dims.hkv <= 65535, op, ": n_blocks * Hkv = ",
                r.n_blocks * r.dims.hkv,
                " is more than the CUDA kernels take in one call (65535); split the sequence");
  }
  check_block_selection(op, indices, counts, r.dims.batch, r.n_blocks, r.dims.hkv,
                        r.dims.capacity, q.device());
  return r;
}

void check_attention_grads(const char* op, const AttentionDims& dims, const at::Tensor& q,
                           const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                           const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> lse_shape{dims.batch, dims.hq, dims.block};
  const auto stats = lse_dtype(q.scalar_type());
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"dout", &dout}, {"out", &out}}) {
    check_defined(op, name, *t);
    check_shape(op, name, *t, q.sizes(), "(the shape of q)");
    check_dtype(op, name, *t, q.scalar_type());
    check_same_device(op, name, *t, q.device());
  }
  check_defined(op, "lse", lse);
  check_shape(op, "lse", lse, lse_shape, "[batch, Hq, B]");
  check_dtype(op, "lse", lse, stats);
  check_same_device(op, "lse", lse, q.device());
  if (dlse.has_value() && dlse->defined()) {
    check_shape(op, "dlse", *dlse, lse_shape, "[batch, Hq, B]");
    check_dtype(op, "dlse", *dlse, stats);
    check_same_device(op, "dlse", *dlse, q.device());
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
  check_dtype(op, "lse", lse, lse_dtype(q.scalar_type()));
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

RmsNormDims check_rms_norm_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& residual, double eps) {
  check_defined(op, "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, op,
              ": x must be a tensor [..., hidden] with hidden >= 1, got shape ", x.sizes());
  check_activation_dtype(op, "x", x);
  RmsNormDims d;
  d.hidden = x.size(-1);
  d.rows = x.numel() / d.hidden;
  check_rank(op, "weight", weight, 1, "[hidden]");
  check_like(op, "weight", weight, "x", x);
  check_shape(op, "weight", weight, {d.hidden}, "[hidden] (hidden = x.size(-1))");
  if (residual.has_value()) {
    check_like(op, "residual", *residual, "x", x);
    check_shape(op, "residual", *residual, x.sizes(), "(the shape of x)");
  }
  check_eps(op, eps);
  if (x.is_cuda()) {
    TORCH_CHECK(d.hidden % 8 == 0 && d.hidden >= 32 && d.hidden <= 16384, op,
                ": the CUDA kernel takes rows of 32 to 16384 elements, a multiple of 8; got "
                "hidden = ", d.hidden);
    TORCH_CHECK(d.rows <= INT32_MAX, op, ": too many rows for one call: ", d.rows);
  }
  return d;
}

void check_rms_norm_outputs(const char* op, const at::Tensor& x, const at::Tensor& out,
                            const at::Tensor& residual_out) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"out", &out},
                         {"residual_out", &residual_out}}) {
    check_like(op, name, *t, "x", x);
    check_shape(op, name, *t, x.sizes(), "(the shape of x)");
    check_contiguous_output(op, name, *t);
  }
  TORCH_CHECK(!out.is_same(residual_out) && out.data_ptr() != residual_out.data_ptr(), op,
              ": out and residual_out must be different tensors");
}

QkvRopeDims check_qkv_rope_inputs(const char* op, const at::Tensor& qkv,
                                  const at::Tensor& positions, const at::Tensor& inv_freq,
                                  int64_t n_q_heads, int64_t n_kv_heads, int64_t head_dim,
                                  const std::optional<at::Tensor>& q_norm_weight,
                                  const std::optional<at::Tensor>& k_norm_weight, double eps) {
  TORCH_CHECK(n_q_heads >= 1 && n_kv_heads >= 1, op,
              ": n_q_heads and n_kv_heads must be >= 1, got ", n_q_heads, " and ", n_kv_heads);
  TORCH_CHECK(head_dim >= 2 && head_dim % 2 == 0, op,
              ": head_dim must be even and >= 2 (RoPE rotates pairs), got ", head_dim);
  check_rank(op, "qkv", qkv, 3, "[batch, B, (Hq + 2 * Hkv) * d]");
  check_activation_dtype(op, "qkv", qkv);
  QkvRopeDims d;
  d.batch = qkv.size(0);
  d.block = qkv.size(1);
  d.hq = n_q_heads;
  d.hkv = n_kv_heads;
  d.dim = head_dim;
  TORCH_CHECK(d.batch >= 1 && d.block >= 1, op, ": qkv has no tokens, shape ", qkv.sizes());
  TORCH_CHECK(qkv.size(2) == (d.hq + 2 * d.hkv) * d.dim, op,
              ": qkv.size(2) must be (Hq + 2 * Hkv) * d = (", d.hq, " + 2 * ", d.hkv, ") * ",
              d.dim, " = ", (d.hq + 2 * d.hkv) * d.dim, ", got ", qkv.size(2));
  check_rank(op, "positions", positions, 2, "[batch, B]");
  check_dtype(op, "positions", positions, at::kLong);
  check_same_device(op, "positions", positions, qkv.device(), "qkv");
  check_shape(op, "positions", positions, {d.batch, d.block}, "[batch, B] (those of qkv)");
  check_rank(op, "inv_freq", inv_freq, 1, "[d / 2]");
  check_dtype(op, "inv_freq", inv_freq, at::kFloat);
  check_same_device(op, "inv_freq", inv_freq, qkv.device(), "qkv");
  check_shape(op, "inv_freq", inv_freq, {d.dim / 2}, "[d / 2]");
  TORCH_CHECK(q_norm_weight.has_value() == k_norm_weight.has_value(), op,
              ": pass both q_norm_weight and k_norm_weight (Qwen3) or neither (Qwen2), got only ",
              q_norm_weight.has_value() ? "q_norm_weight" : "k_norm_weight");
  d.qk_norm = q_norm_weight.has_value();
  if (d.qk_norm) {
    for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q_norm_weight",
                                                                      &*q_norm_weight},
                           {"k_norm_weight", &*k_norm_weight}}) {
      check_rank(op, name, *t, 1, "[d]");
      check_like(op, name, *t, "qkv", qkv);
      check_shape(op, name, *t, {d.dim}, "[d]");
    }
  }
  check_eps(op, eps);
  if (qkv.is_cuda()) {
    TORCH_CHECK(d.dim % 16 == 0 && d.dim >= 32 && d.dim <= 512, op,
                ": the CUDA kernel takes head dims of 32 to 512, a multiple of 16; got d = ",
                d.dim);
    const int64_t bytes = (d.hq + d.hkv) * d.dim * static_cast<int64_t>(qkv.element_size());
    TORCH_CHECK(bytes <= 160 * 1024, op, ": the CUDA kernel holds a token's q and k heads in "
                "shared memory, at most 160 KB; (Hq + Hkv) * d = ", (d.hq + d.hkv) * d.dim,
                " elements need ", bytes, " bytes");
    TORCH_CHECK(d.batch * d.block <= INT32_MAX, op, ": too many tokens for one call: ",
                d.batch * d.block);
  }
  return d;
}

void check_qkv_rope_outputs(const char* op, const QkvRopeDims& dims, const at::Tensor& qkv,
                            const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_like(op, "q", q, "qkv", qkv);
  check_shape(op, "q", q, {dims.batch, dims.hq, dims.block, dims.dim}, "[batch, Hq, B, d]");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", &v}}) {
    check_like(op, name, *t, "qkv", qkv);
    check_shape(op, name, *t, {dims.batch, dims.hkv, dims.block, dims.dim}, "[batch, Hkv, B, d]");
  }
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k},
                         {"v", &v}}) {
    check_contiguous_output(op, name, *t);
  }
}

SiluMulDims check_silu_mul_inputs(const char* op, const at::Tensor& gate_up) {
  check_defined(op, "gate_up", gate_up);
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) >= 2 && gate_up.size(-1) % 2 == 0, op,
              ": gate_up must be [..., 2 * I] (gate, then up) with an even last dim >= 2, got "
              "shape ", gate_up.sizes());
  check_activation_dtype(op, "gate_up", gate_up);
  SiluMulDims d;
  d.inter = gate_up.size(-1) / 2;
  d.rows = gate_up.numel() / gate_up.size(-1);
  if (gate_up.is_cuda()) {
    TORCH_CHECK(d.inter <= INT32_MAX, op, ": I = ", d.inter, " is too large for the CUDA kernel");
  }
  return d;
}

void check_silu_mul_outputs(const char* op, const at::Tensor& gate_up, const at::Tensor& out) {
  check_like(op, "out", out, "gate_up", gate_up);
  auto shape = gate_up.sizes().vec();
  shape.back() /= 2;
  check_shape(op, "out", out, shape, "[..., I] (gate_up's shape with the last dim halved)");
  check_contiguous_output(op, "out", out);
}

namespace {

double resolve_scale(const char* op, std::optional<double> scale, int64_t dim) {
  if (!scale.has_value()) return 1.0 / std::sqrt(static_cast<double>(dim));
  TORCH_CHECK(std::isfinite(*scale) && *scale > 0, op,
              ": scale must be a positive finite number, got ", *scale);
  return *scale;
}

}  // namespace

BlockAttentionDims check_block_attention_inputs(const char* op, const at::Tensor& q,
                                                const at::Tensor& k_ctx, const at::Tensor& v_ctx,
                                                const at::Tensor& k_own, const at::Tensor& v_own,
                                                int64_t block_size, at::IntArrayRef start,
                                                std::optional<double> scale) {
  check_rank(op, "q", q, 4, "[batch, Hq, T, d]");
  check_rank(op, "k_ctx", k_ctx, 4, "[batch, Hkv, N, d]");
  check_rank(op, "v_ctx", v_ctx, 4, "[batch, Hkv, N, d]");
  check_rank(op, "k_own", k_own, 4, "[batch, Hkv, T, d]");
  check_rank(op, "v_own", v_own, 4, "[batch, Hkv, T, d]");

  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              op, ": q must be float16, bfloat16, float32 or float64, got ", dtype);
  check_like_q(op, q, {{"k_ctx", &k_ctx}, {"v_ctx", &v_ctx}, {"k_own", &k_own}, {"v_own", &v_own}},
               "q, k/v context and own k/v");

  BlockAttentionDims d;
  d.batch = q.size(0);
  d.hq = q.size(1);
  d.tokens = q.size(2);
  d.dim = q.size(3);
  d.hkv = k_ctx.size(1);
  d.capacity = k_ctx.size(2);
  d.block = block_size;
  TORCH_CHECK(d.batch >= 1 && d.hq >= 1 && d.tokens >= 1 && d.dim >= 1, op,
              ": q must have non-zero batch, heads, tokens and head dim, got shape ", q.sizes());
  TORCH_CHECK(d.hkv >= 1, op, ": k_ctx has no KV heads (shape ", k_ctx.sizes(), ")");
  TORCH_CHECK(d.hq % d.hkv == 0, op, ": q has ", d.hq,
              " heads, which is not a multiple of the ", d.hkv,
              " KV heads of k_ctx (GQA needs Hq = G * Hkv)");
  d.group = d.hq / d.hkv;
  TORCH_CHECK(k_ctx.size(0) == d.batch && k_ctx.size(3) == d.dim, op,
              ": k_ctx must have shape [batch=", d.batch, ", Hkv, N, d=", d.dim, "], got ",
              k_ctx.sizes());
  check_shape(op, "v_ctx", v_ctx, k_ctx.sizes(), "(the shape of k_ctx)");
  // Read in place by the fused kernels, which need only the last dim contiguous: a cache, or
  // K/V straight from a projection ([batch, T, Hkv, d] transposed), are taken without a copy.
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k_ctx", &k_ctx},
                         {"v_ctx", &v_ctx}}) {
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) == 1, op, ": ", name,
                " must have a contiguous last dim (stride(3) == 1); got strides ", t->strides());
  }
  const std::vector<int64_t> own_shape{d.batch, d.hkv, d.tokens, d.dim};
  check_shape(op, "k_own", k_own, own_shape, "[batch, Hkv, T, d] (T = q.size(2))");
  check_shape(op, "v_own", v_own, own_shape, "[batch, Hkv, T, d] (T = q.size(2))");

  TORCH_CHECK(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
  TORCH_CHECK(d.tokens % block_size == 0, op, ": q has T = ", d.tokens,
              " tokens, which is not a multiple of block_size = ", block_size,
              " (the op attends whole blocks; pad the last block)");
  TORCH_CHECK(static_cast<int64_t>(start.size()) == d.batch, op, ": start must have ",
              d.batch, " entries (one per sequence), got ", start.size());
  for (int64_t b = 0; b < d.batch; ++b) {
    TORCH_CHECK(start[b] >= 0, op, ": start[", b, "] = ", start[b], " must be >= 0");
    TORCH_CHECK(start[b] + d.tokens - block_size <= d.capacity, op, ": start[", b, "] = ",
                start[b], " needs k_ctx positions up to start + T - block_size = ",
                start[b] + d.tokens - block_size, ", but k_ctx holds N = ", d.capacity,
                " (expected start[b] + T - block_size <= N)");
  }
  d.scale = resolve_scale(op, scale, d.dim);
  return d;
}

void check_block_attention_grad_inputs(const char* op, const BlockAttentionDims& dims,
                                       const at::Tensor& q, const at::Tensor& dout,
                                       const at::Tensor& out, const at::Tensor& lse) {
  check_rank(op, "dout", dout, 4, "[batch, Hq, T, d]");
  check_rank(op, "out", out, 4, "[batch, Hq, T, d]");
  check_rank(op, "lse", lse, 3, "[batch, Hq, T]");
  check_shape(op, "dout", dout, q.sizes(), "(the shape of q)");
  check_shape(op, "out", out, q.sizes(), "(the shape of q)");
  check_shape(op, "lse", lse, {dims.batch, dims.hq, dims.tokens}, "[batch, Hq, T]");
  check_dtype(op, "dout", dout, q.scalar_type());
  check_dtype(op, "out", out, q.scalar_type());
  check_dtype(op, "lse", lse, q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  check_same_device(op, "dout", dout, q.device());
  check_same_device(op, "out", out, q.device());
  check_same_device(op, "lse", lse, q.device());
}

LinearDims check_linear_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  check_defined(op, "x", x);
  check_rank(op, "weight", weight, 2, "[N, K] (out_features, in_features)");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x must be [..., K] with K = ",
              "weight.size(1) = ", weight.size(1), ", got x of shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
              x.scalar_type());
  check_like(op, "weight", weight, "x", x);
  LinearDims d;
  d.in = weight.size(1);
  d.out = weight.size(0);
  d.rows = d.in == 0 ? 0 : x.numel() / d.in;
  if (bias.has_value() && bias->defined()) {
    check_like(op, "bias", *bias, "x", x);
    check_shape(op, "bias", *bias, {d.out}, "[N] (out_features)");
  }
  return d;
}

}  // namespace mage
