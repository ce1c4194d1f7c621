// CUDA entry points of the ops: the same checks as the CPU kernels (ops/checks.h), then the
// launch plan (how many key splits) and the kernel launches on the current stream. Nothing
// here synchronises with the host; the only allocation is the split workspace (from the
// caching allocator, which CUDA graph capture supports).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "cuda/kernel_args.h"
#include "ops/checks.h"

namespace mage::cuda {
namespace {

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: return Dtype::kFloat32;
  }
}

void check_aligned(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " must start at a 16-byte aligned address for the CUDA kernels (a view with an "
              "odd storage offset?); call .contiguous() or clone() it");
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// CUDA grids take at most 65535 blocks along y and z, where the kernels put the sequences and
// KV heads: a clear error instead of a failed launch.
void check_grid(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value <= 65535, op, ": ", what, " = ", value,
              " is more than the CUDA kernels take in one call (65535); split the batch");
}

// Splits of a key list of at most `max_keys` keys so that the grid has at most `target_ctas`
// CTAs (one wave) where it can; every split holds at least `min_tiles` key tiles.
void plan_splits(int64_t max_keys, int64_t ctas_per_split, int64_t target_ctas, int min_tiles,
                 int* num_splits, int* keys_per_split) {
  const int64_t tiles = std::max<int64_t>(1, (max_keys + kKeyTile - 1) / kKeyTile);
  const int64_t max_splits = std::max<int64_t>(1, tiles / min_tiles);
  // Rounded down: all CTAs in one wave. Rounding up left a few CTAs for a second wave (SDAR at
  // batch 1: 8 heads x 17 splits = 136 CTAs on 132 SMs), which cost a whole CTA's time again
  // (measured: SDAR dense 128K 306 -> 175 us, 1.5B batch 8 at 128K 728 -> 429 us).
  const int64_t want = std::max<int64_t>(1, target_ctas / ctas_per_split);
  const int64_t splits = std::clamp<int64_t>(want, 1, std::min<int64_t>(max_splits, 65535));
  const int64_t tiles_per_split = (tiles + splits - 1) / splits;
  *keys_per_split = static_cast<int>(tiles_per_split * kKeyTile);
  *num_splits = static_cast<int>((tiles + tiles_per_split - 1) / tiles_per_split);
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

// 64-row warpgroups per CTA for `rows` (> 64) query rows, or 0 for the mma.sync kernel: 2 or
// 3 groups (a fourth does not fit the registers). Up to 192 rows one CTA holds them all; more
// (224 for the 7B shape) take two 2-group CTAs per key split, the second reading the K/V tiles
// mostly from L2. Measured on the H200 (7B shape, both kernels in one process:
// benchmarks/results/wgmma_loop_probe_h200.json): the two 2-group CTAs beat the 224-row mma.sync
// CTA on the dense step at every batch (batch 1 128K: 169 vs 220 us; batch 8 32K: 333 vs 449;
// batch 32 32K: 1315 vs 1869) and on the sparse step at batch 8 (k = 512: 22.3 vs 26.6 us), not
// on the sparse step once the (sequence, head) units alone fill the GPU (batch 32: 45 vs 42 us).
// A short sparse key list (at most kShortKeyTiles tiles) whose units do not fill the GPU spreads
// 129-192 rows over two CTAs (2 + 1 groups) instead of splitting the keys further (fewer
// partials to merge): 1.5B shape, batch 32: k = 256 24.8 -> 17.8 us, k = 512 28.0 -> 25.2; with
// k = 2048 (33 tiles) the key split wins (52.3 vs 65.7 us at batch 32;
// benchmarks/results/sparse_groups_probe_h200.json).
constexpr int64_t kShortKeyTiles = 16;
int wgmma_groups_for(int rows, int64_t row_units, bool sparse, int64_t key_tiles) {
  const int need = (rows + 63) / 64;
  if (need == 3 && sparse && key_tiles <= kShortKeyTiles && row_units < sm_count()) return 2;
  if (need <= 3) return std::max(need, 2);
  return sparse && row_units * ((rows + 127) / 128) >= sm_count() ? 0 : 2;
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
                             const at::Tensor& v_cache) {
  const auto& d = p.dims;
  AttentionArgs a;
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
  // One wave of equal splits: one CTA per SM (the kernel fills an SM's shared memory; two for
  // narrow warpgroup CTAs). Wide CTAs (224 rows) when the key tiles can fill the GPU with them;
  // else narrow ones (64 rows), so a short key list (the sparse step at small batch) still
  // spreads over many SMs. On sm_90a builds both are the warpgroup (wgmma) kernel, with
  // 64-row groups.
  const int64_t key_tiles = std::max<int64_t>(1, (max_keys + kKeyTile - 1) / kKeyTile);
  const int groups =
      use_wgmma()
          ? wgmma_groups_for(a.rows, static_cast<int64_t>(a.batch) * a.hkv, sparse, key_tiles)
          : 0;
  const int wide_rows = groups > 0 ? 64 * groups : kRowsWide;
  const int64_t wide_ctas = key_tiles * a.batch * a.hkv * ((a.rows + wide_rows - 1) / wide_rows);
  // (Narrow also when the rows fit in one narrow CTA, e.g. SDAR's block 4: no idle m-tiles.)
  const bool wide = wide_ctas >= sm_count() && a.rows > kRowsNarrow;
  a.rows_per_cta = wide ? wide_rows : kRowsNarrow;
  // Narrow CTAs are one warpgroup on sm_90a: a 64-key tile takes a fraction of the 4 mma.sync
  // warps' time, which is most of a short split's critical path.
  a.wgmma_groups = wide ? groups : (use_wgmma() ? 1 : 0);
  const int64_t row_tiles = (a.rows + a.rows_per_cta - 1) / a.rows_per_cta;
  const int ctas_per_sm = a.wgmma_groups == 1 ? kNarrowWgmmaCtasPerSm : 1;
  // One key tile per split where the GPU has room: a split's time at batch 1 is mostly the
  // latency of its first tile (measured: each further tile of a split added ~1.6-3.6 us).
  plan_splits(max_keys, row_tiles * a.batch * a.hkv, sm_count() * ctas_per_sm, /*min_tiles=*/1,
              &a.num_splits, &a.keys_per_split);
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
  auto a = attention_args(p, k_cache, v_cache);
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
  auto a = attention_args(p, k_cache, v_cache);
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
  plan_splits(a.capacity, static_cast<int64_t>(a.batch) * a.hkv, sm_count(),
              /*min_tiles=*/s.wgmma ? 8 : 2, &s.num_splits, &s.keys_per_split);
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
  auto a = attention_args(p, k_cache, v_cache);
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
