// Plain argument structs shared by the host launchers (csrc/cuda/*.cpp, compiled by the host
// compiler) and the kernels (*.cu). Pointers are raw device pointers; strides in elements.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime_api.h>

#include <cstdint>

#include "ops/device_errors.h"  // ErrorSink: where kernels report bad input values
#include "ops/launch_plan.h"    // kKeyTile and the CTA shapes

namespace mage::cuda {

enum class Dtype { kFloat16, kBFloat16, kFloat32 };

// One attention launch: the G*B query rows of each (sequence, KV head) attend to a list of
// keys = cache keys (a dense prefix [0, cache_lens[b]) or the selected indices[b, h, :counts])
// followed by the B block keys. The key list is cut into num_splits ranges of keys_per_split
// keys; each (row tile, split, sequence x KV head) is one CTA (flash-decoding).
struct AttentionArgs {
  const void* q;        // [batch, Hq, B, D] contiguous
  const void* k_cache;  // [batch, Hkv, capacity, D], rows contiguous
  const void* v_cache;
  const void* k_block;  // [batch, Hkv, B, D] contiguous
  const void* v_block;
  const int32_t* cache_lens;  // dense: [batch]
  const int32_t* indices;     // sparse: [batch, Hkv, kmax]
  const int32_t* counts;      // sparse: [batch, Hkv]
  int64_t cache_stride_b = 0;
  int64_t cache_stride_h = 0;
  int capacity = 0;
  int kmax = 0;
  int batch = 0, hq = 0, hkv = 0, group = 0, block = 0, dim = 0;
  int rows = 0;  // group * block: query rows per KV head
  float scale_log2 = 0.f;  // softmax scale * log2(e)
  int rows_per_cta = 224;  // tensor-core CTA shape: kRowsWide or kRowsNarrow, or 64 * wgmma_groups
  int wgmma_groups = 0;    // > 0: the sm_90a warpgroup kernel with this many 64-row groups per CTA
  int keys_per_split = 0;
  int num_splits = 1;
  float* o_part = nullptr;    // [num_splits, batch*Hq*B, D] when num_splits > 1
  float* lse_part = nullptr;  // [num_splits, batch*Hq*B]
  void* out = nullptr;        // [batch, Hq, B, D] when num_splits == 1
  float* lse = nullptr;       // [batch, Hq, B]
  // Dense warpgroup kernel: TMA descriptors of the K / V caches (tma_maps.h); use_tma = 0: the
  // producer copies every tile with cp.async.
  CUtensorMap k_map, v_map;
  int use_tma = 0;
  ErrorSink err;  // a length / count / selected index out of range (device_errors.h)
};

// Importance scores (second pass): needs the final lse of every row.
struct ScoresArgs {
  const void* q;
  const void* k_cache;
  const int32_t* cache_lens;
  const float* lse;  // [batch, Hq, B] natural log
  float* scores;     // [batch, Hkv, capacity]
  int64_t cache_stride_b = 0;
  int64_t cache_stride_h = 0;
  int capacity = 0;
  int batch = 0, hq = 0, hkv = 0, group = 0, block = 0, dim = 0, rows = 0;
  float scale_log2 = 0.f;
  int keys_per_split = 0;
  int num_splits = 1;
  bool wgmma = false;  // the sm_90a kernel (rows <= 256)
  // The sm_90a kernel: TMA descriptor of the K cache (as AttentionArgs::k_map).
  CUtensorMap k_map;
  int use_tma = 0;
};

struct MergeArgs {
  const float* o_part;
  const float* lse_part;
  int num_splits = 1;
  int total_rows = 0;  // batch * Hq * B
  int dim = 0;
  void* out = nullptr;
  float* lse = nullptr;
  bool pdl = false;  // programmatic dependent launch (device_utils.cuh)
};

struct TopkArgs {
  const float* scores;  // [batch, Hkv, capacity]
  const int32_t* cache_lens;
  int32_t* indices;  // [batch, Hkv, k]
  int32_t* counts;   // [batch, Hkv]
  int batch = 0, hkv = 0, capacity = 0, k = 0, n_sink = 0, n_recent = 0;
  ErrorSink err;  // a length out of range
};

struct AppendArgs {
  void* k_cache;
  void* v_cache;
  const void* k_block;  // [batch, Hkv, B, D] contiguous
  const void* v_block;
  const int32_t* cache_lens;
  int64_t cache_stride_b_bytes = 0;
  int64_t cache_stride_h_bytes = 0;
  int capacity = 0;
  int batch = 0, hkv = 0, block = 0;
  int row_bytes = 0;    // D * element size (a multiple of 2)
  bool vec16 = false;   // every row start is 16-byte aligned: copy 16-byte vectors
  ErrorSink err;        // a block that does not fit
};

// The current device's error record (device_error_reader.cpp; the address of a __device__ array in
// device_errors.cu, looked up once per device) and that lookup.
int32_t* device_error_record();
cudaError_t error_record_address(int32_t** address);

// Launchers (implemented in the .cu files); they return the launch's error code.
cudaError_t launch_attention(Dtype dtype, bool sparse, const AttentionArgs& args,
                             cudaStream_t stream);
cudaError_t launch_scores(Dtype dtype, const ScoresArgs& args, cudaStream_t stream);
cudaError_t launch_merge(Dtype dtype, const MergeArgs& args, cudaStream_t stream);
cudaError_t launch_topk(const TopkArgs& args, cudaStream_t stream);
cudaError_t launch_append(const AppendArgs& args, cudaStream_t stream);

// Per-dtype launchers behind launch_attention / launch_scores / launch_merge.
cudaError_t launch_attention_f16(bool sparse, const AttentionArgs& args, cudaStream_t stream);
cudaError_t launch_attention_bf16(bool sparse, const AttentionArgs& args, cudaStream_t stream);
cudaError_t launch_attention_f32(bool sparse, const AttentionArgs& args, cudaStream_t stream);
cudaError_t launch_scores_f16(const ScoresArgs& args, cudaStream_t stream);
cudaError_t launch_scores_bf16(const ScoresArgs& args, cudaStream_t stream);
cudaError_t launch_scores_f32(const ScoresArgs& args, cudaStream_t stream);
cudaError_t launch_merge_f16(const MergeArgs& args, cudaStream_t stream);
cudaError_t launch_merge_bf16(const MergeArgs& args, cudaStream_t stream);
cudaError_t launch_merge_f32(const MergeArgs& args, cudaStream_t stream);

}  // namespace mage::cuda
