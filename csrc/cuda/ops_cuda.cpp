// CUDA entry points of the ops: the same checks as the CPU kernels (ops/checks.h), then the
// launch plan (how many key splits) and the kernel launches on the current stream. Nothing
// here synchronises with the host; the only allocation is the split workspace (from the
// caching allocator, which CUDA graph capture supports). Input values the host cannot see
// without a sync are checked by the kernels into the device's error record (device_errors.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>

#include "cuda/host_utils.h"
#include "cuda/kernel_args.h"
#include "cuda/tma_maps.h"
#include "ops/checks.h"
#include "ops/launch_plan.h"

namespace mage::cuda {
namespace {

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// CUDA grids take at most 65535 blocks along y and z, where the kernels put the sequences and
// KV heads: a clear error instead of a failed launch.
void check_grid(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value <= 65535, op, ": ", what, " = ", value,
              " is more than the CUDA kernels take in one call (65535); split the batch");
}

// The sm_90a warpgroup kernel: built (setup.py / CMake define MAGE_WGMMA for a 9.0a target),
// on an sm_90 device, and not switched off by MAGE_DISABLE_WGMMA=1 (read per call, so tests
// and benchmarks can compare both kernels in one process).
bool use_wgmma() {
#ifdef MAGE_WGMMA
  const char* off = std::getenv("MAGE_DISABLE_WGMMA");
  if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0;
#else
  return false;
#endif
}

// Programmatic dependent launch of the merge after the attention kernel (device_utils.cuh) on
// sm_90+, unless MAGE_DISABLE_PDL=1 (read per call, as use_wgmma()).
bool use_pdl() {
  const char* off = std::getenv("MAGE_DISABLE_PDL");
  if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 9;
}

// TMA loads of the dense cache tiles in the warpgroup kernel (tma_maps.h), unless
// MAGE_DISABLE_TMA=1 (read per call, as use_wgmma()).
bool use_tma() {
  const char* off = std::getenv("MAGE_DISABLE_TMA");
  return off == nullptr || off[0] == '\0' || off[0] == '0';
}

struct Prepared {
  AttentionDims dims;
  at::Tensor q, k_block, v_block;  // contiguous
};

Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& k_block,
                 const at::Tensor& v_block, std::optional<double> scale) {
  Prepared p;
  p.dims = check_attention_inputs(op, q, k_cache, v_cache, k_block, v_block, scale);
  check_grid(op, "batch * Hkv", p.dims.batch * p.dims.hkv);
  check_fits_int(op, "capacity + B", p.dims.capacity + p.dims.block);  // a key list's length
  p.q = q.contiguous();
  p.k_block = k_block.contiguous();
  p.v_block = v_block.contiguous();
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &p.q},
                         {"k_cache", &k_cache}, {"v_cache", &v_cache},
                         {"k_block", &p.k_block}, {"v_block", &p.v_block}}) {
    check_aligned(op, name, *t);
  }
  TORCH_CHECK(k_cache.stride(0) % 8 == 0 && k_cache.stride(1) % 8 == 0, op,
              ": k_cache/v_cache batch and head strides must be multiples of 8 elements for "
              "the CUDA kernels, got ", k_cache.strides());
  return p;
}

AttentionArgs attention_args(const Prepared& p, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, DeviceErrorOp op) {
  const auto& d = p.dims;
  AttentionArgs a;
  a.err = {device_error_record(), static_cast<int32_t>(op)};
  a.q = p.q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.k_block = p.k_block.data_ptr();
  a.v_block = p.v_block.data_ptr();
  a.cache_stride_b = k_cache.stride(0);
  a.cache_stride_h = k_cache.stride(1);
  a.capacity = static_cast<int>(d.capacity);
  a.batch = static_cast<int>(d.batch);
  a.hq = static_cast<int>(d.hq);
  a.hkv = static_cast<int>(d.hkv);
  a.group = static_cast<int>(d.group);
  a.block = static_cast<int>(d.block);
  a.dim = static_cast<int>(d.dim);
  a.rows = a.group * a.block;
  a.scale_log2 = static_cast<float>(d.scale * M_LOG2E);
  return a;
}

// Runs the attention kernel (split over the key list when that fills the GPU better) and the
// merge; writes out / lse.
void run_attention(const char* op, bool sparse, AttentionArgs a, const Prepared& p,
                   int64_t max_keys, const at::Tensor& out, const at::Tensor& lse) {
  check_aligned(op, "out", out);  // the kernels store 4- and 8-byte vectors
  const auto dtype = dtype_of(p.q);
  const auto stream = at::cuda::getCurrentCUDAStream();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  if (dtype == Dtype::kFloat32) {  // SIMT path: one warp per row, no splits
    C10_CUDA_CHECK(launch_attention(dtype, sparse, a, stream));
    return;
  }
  const AttentionPlan plan =
      plan_attention(a.rows, static_cast<int64_t>(a.batch) * a.hkv, max_keys, sparse, sm_count(),
                     use_wgmma());
  a.rows_per_cta = plan.rows_per_cta;
  a.wgmma_groups = plan.wgmma_groups;
  a.num_splits = plan.splits.num_splits;
  a.keys_per_split = plan.splits.keys_per_split;
  if (!sparse && a.wgmma_groups > 0 && use_tma()) {
    a.use_tma = encode_cache_map(&a.k_map, a.k_cache, a.batch, a.hkv, a.capacity, a.dim,
                                 a.cache_stride_b, a.cache_stride_h) &&
                encode_cache_map(&a.v_map, a.v_cache, a.batch, a.hkv, a.capacity, a.dim,
                                 a.cache_stride_b, a.cache_stride_h);
  }
  at::Tensor o_part, lse_part;
  const int64_t total_rows = static_cast<int64_t>(a.batch) * a.hq * a.block;
  if (a.num_splits > 1) {
    o_part = at::empty({a.num_splits, total_rows, a.dim}, p.q.options().dtype(at::kFloat));
    lse_part = at::empty({a.num_splits, total_rows}, p.q.options().dtype(at::kFloat));
    a.o_part = o_part.data_ptr<float>();
    a.lse_part = lse_part.data_ptr<float>();
  }
  C10_CUDA_CHECK(launch_attention(dtype, sparse, a, stream));
  if (a.num_splits > 1) {
    MergeArgs m;
    m.o_part = a.o_part;
    m.lse_part = a.lse_part;
    m.num_splits = a.num_splits;
    m.total_rows = static_cast<int>(total_rows);
    m.dim = a.dim;
    m.out = out.data_ptr();
    m.lse = lse.data_ptr<float>();
    // Measured on the H200: the sparse step at batch 1 gains ~0.7 us of ~9 per layer; the
    // dense steps lose 1-10% (batch 32), so they launch the merge the ordinary way.
    m.pdl = sparse && use_pdl();
    C10_CUDA_CHECK(launch_merge(dtype, m, stream));
  }
}

void dense_attention_out(const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& cache_lens,
                         const at::Tensor& k_block, const at::Tensor& v_block,
                         std::optional<double> scale, const at::Tensor& out,
                         const at::Tensor& lse) {
  const char* op = "mage.dense_attention";
  const c10::cuda::CUDAGuard guard(q.device());
  const auto p = prepare(op, q, k_cache, v_cache, k_block, v_block, scale);
  check_cache_lens(op, cache_lens, p.dims, q.device());
  check_attention_outputs(op, p.dims, q, out, lse, nullptr);
  auto a = attention_args(p, k_cache, v_cache, DeviceErrorOp::kDenseAttention);
  const auto lens = cache_lens.contiguous();
  a.cache_lens = lens.data_ptr<int32_t>();
  run_attention(op, false, a, p, p.dims.capacity + p.dims.block, out, lse);
}

void attention_with_scores_out(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                               const at::Tensor& k_block, const at::Tensor& v_block,
                               std::optional<double> scale, const at::Tensor& out,
                               const at::Tensor& lse, const at::Tensor& scores) {
  const char* op = "mage.attention_with_scores";
  const c10::cuda::CUDAGuard guard(q.device());
  const auto p = prepare(op, q, k_cache, v_cache, k_block, v_block, scale);
  check_cache_lens(op, cache_lens, p.dims, q.device());
  check_attention_outputs(op, p.dims, q, out, lse, &scores);
  auto a = attention_args(p, k_cache, v_cache, DeviceErrorOp::kAttentionWithScores);
  const auto lens = cache_lens.contiguous();
  a.cache_lens = lens.data_ptr<int32_t>();
  run_attention(op, false, a, p, p.dims.capacity + p.dims.block, out, lse);

  // Second pass: the scores need every row's final log-sum-exp.
  ScoresArgs s;
  s.q = a.q;
  s.k_cache = a.k_cache;
  s.cache_lens = a.cache_lens;
  s.lse = lse.data_ptr<float>();
  s.scores = scores.data_ptr<float>();
  s.cache_stride_b = a.cache_stride_b;
  s.cache_stride_h = a.cache_stride_h;
  s.capacity = a.capacity;
  s.batch = a.batch;
  s.hq = a.hq;
  s.hkv = a.hkv;
  s.group = a.group;
  s.block = a.block;
  s.dim = a.dim;
  s.rows = a.rows;
  s.scale_log2 = a.scale_log2;
  // The sm_90a kernel spreads a split's tiles over 4 warpgroups: give each split >= 8 tiles.
  s.wgmma = use_wgmma() && dtype_of(p.q) != Dtype::kFloat32 && a.rows <= 256;
  const Splits splits = plan_splits(a.capacity, static_cast<int64_t>(a.batch) * a.hkv, sm_count(),
                                    /*min_tiles=*/s.wgmma ? 8 : 2);
  s.num_splits = splits.num_splits;
  s.keys_per_split = splits.keys_per_split;
  if (s.wgmma && use_tma()) {
    s.use_tma = encode_cache_map(&s.k_map, s.k_cache, a.batch, a.hkv, a.capacity, a.dim,
                                 a.cache_stride_b, a.cache_stride_h);
  }
  C10_CUDA_CHECK(launch_scores(dtype_of(p.q), s, at::cuda::getCurrentCUDAStream()));
}

void sparse_attention_out(const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& indices,
                          const at::Tensor& counts, const at::Tensor& k_block,
                          const at::Tensor& v_block, std::optional<double> scale,
                          const at::Tensor& out, const at::Tensor& lse) {
  const char* op = "mage.sparse_attention";
  const c10::cuda::CUDAGuard guard(q.device());
  const auto p = prepare(op, q, k_cache, v_cache, k_block, v_block, scale);
  check_selection(op, indices, counts, p.dims, q.device());
  check_attention_outputs(op, p.dims, q, out, lse, nullptr);
  auto a = attention_args(p, k_cache, v_cache, DeviceErrorOp::kSparseAttention);
  const auto idx = indices.contiguous();
  const auto cnt = counts.contiguous();
  a.indices = idx.data_ptr<int32_t>();
  a.counts = cnt.data_ptr<int32_t>();
  a.kmax = static_cast<int>(indices.size(2));
  run_attention(op, true, a, p, a.kmax + p.dims.block, out, lse);
}

void topk_select_out(const at::Tensor& scores, const at::Tensor& cache_lens, int64_t k,
                     int64_t n_sink, int64_t n_recent, const at::Tensor& indices,
                     const at::Tensor& counts) {
  const char* op = "mage.topk_select";
  const c10::cuda::CUDAGuard guard(scores.device());
  const auto d = check_topk_inputs(op, scores, cache_lens, k, n_sink, n_recent);
  check_grid(op, "batch", d.batch);
  check_grid(op, "Hkv", d.hkv);
  check_fits_int(op, "capacity", d.capacity);
  check_topk_outputs(op, d, scores, indices, counts);
  const auto s = scores.contiguous();
  const auto lens = cache_lens.contiguous();
  TopkArgs a;
  a.scores = s.data_ptr<float>();
  a.cache_lens = lens.data_ptr<int32_t>();
  a.indices = indices.data_ptr<int32_t>();
  a.counts = counts.data_ptr<int32_t>();
  a.batch = static_cast<int>(d.batch);
  a.hkv = static_cast<int>(d.hkv);
  a.capacity = static_cast<int>(d.capacity);
  a.k = static_cast<int>(k);
  a.n_sink = static_cast<int>(n_sink);
  a.n_recent = static_cast<int>(n_recent);
  a.err = {device_error_record(), static_cast<int32_t>(DeviceErrorOp::kTopkSelect)};
  C10_CUDA_CHECK(launch_topk(a, at::cuda::getCurrentCUDAStream()));
}

void append_kv(const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& cache_lens, const at::Tensor& k_block,
               const at::Tensor& v_block) {
  const char* op = "mage.append_kv";
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const auto d = check_append_inputs(op, k_cache, v_cache, cache_lens, k_block, v_block);
  check_grid(op, "batch", d.batch);
  check_grid(op, "Hkv", d.hkv);
  check_fits_int(op, "capacity + B", d.capacity + d.block);
  const auto kb = k_block.contiguous();
  const auto vb = v_block.contiguous();
  const auto lens = cache_lens.contiguous();
  const int64_t esize = k_cache.element_size();
  AppendArgs a;
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.k_block = kb.data_ptr();
  a.v_block = vb.data_ptr();
  a.cache_lens = lens.data_ptr<int32_t>();
  a.cache_stride_b_bytes = k_cache.stride(0) * esize;
  a.cache_stride_h_bytes = k_cache.stride(1) * esize;
  a.capacity = static_cast<int>(d.capacity);
  a.batch = static_cast<int>(d.batch);
  a.hkv = static_cast<int>(d.hkv);
  a.block = static_cast<int>(d.block);
  a.row_bytes = static_cast<int>(d.dim * esize);
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  a.vec16 = a.row_bytes % 16 == 0 && a.cache_stride_b_bytes % 16 == 0 &&
            a.cache_stride_h_bytes % 16 == 0 && aligned(a.k_cache) && aligned(a.v_cache) &&
            aligned(a.k_block) && aligned(a.v_block);
  a.err = {device_error_record(), static_cast<int32_t>(DeviceErrorOp::kAppendKv)};
  C10_CUDA_CHECK(launch_append(a, at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CUDA, m) {
  m.impl("attention_with_scores_out", &attention_with_scores_out);
  m.impl("dense_attention_out", &dense_attention_out);
  m.impl("sparse_attention_out", &sparse_attention_out);
  m.impl("topk_select_out", &topk_select_out);
  m.impl("append_kv", &append_kv);
}

}  // namespace mage::cuda
