// The QKV GEMM's output to the attention ops' layout, one CTA per token: q and k heads through
// shared memory, optionally RMSNorm'ed per head (Qwen3's q_norm / k_norm), rotated by RoPE and
// stored as q [batch, Hq, B, d] and k [batch, Hkv, B, d]; v heads copied to [batch, Hkv, B, d].
// The values of transformers on the GPU:
//   cos, sin = cat(freqs, freqs).cos() / .sin() cast to the dtype, freqs = position.float() *
//   inv_freq (fp32); out = (x * cos) + (rotate_half(x) * sin), each product and the sum rounded
//   to the dtype as three torch ops do. cosf / sinf are the functions torch's cos / sin kernels
//   call (no fast math), so the angles' cosines match bit for bit.
#include <algorithm>

#include "cuda/fused_common.cuh"

namespace mage::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename T, bool kNorm>
__global__ void __launch_bounds__(kThreads)
    qkv_rope_kernel(const __grid_constant__ QkvRopeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int E = kVec<T>;
  const int token = blockIdx.x;
  const int b = token / a.block, s = token % a.block;
  const int d = a.dim, half = d / 2;
  const int qk_heads = a.hq + a.hkv;
  T* qk = reinterpret_cast<T*>(smem);                           // [qk_heads, d]
  float* cos_sin = reinterpret_cast<float*>(qk + qk_heads * d);  // cos [half], sin [half]
  float* inv = cos_sin + d;                                      // [qk_heads]
  float* scratch = inv + qk_heads;  // per warp, when torch sums a head's row with > 32 threads
  const T* src =
      static_cast<const T*>(a.qkv) + static_cast<int64_t>(token) * (qk_heads + a.hkv) * d;

  // q and k heads to shared memory, v heads straight to their layout; kUnroll chunks a thread
  // at a time, loads first (the stores could alias later loads for all the compiler knows).
  const int chunks_per_head = d / E;
  const int qk_chunks = qk_heads * chunks_per_head;
  const int all_chunks = qk_chunks + a.hkv * chunks_per_head;
  for (int base = threadIdx.x; base < all_chunks; base += kUnroll * kThreads) {
    Vec<T> buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * kThreads;
      if (c < all_chunks) buf[u] = load_vec(src + c * E);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * kThreads;
      if (c >= all_chunks) break;
      if (c < qk_chunks) {
        store_vec(qk + c * E, buf[u]);
      } else {
        const int h = (c - qk_chunks) / chunks_per_head, e = (c % chunks_per_head) * E;
        store_vec(static_cast<T*>(a.v) +
                      ((static_cast<int64_t>(b) * a.hkv + h) * a.block + s) * d + e,
                  buf[u]);
      }
    }
  }
  // The norm weights of this thread's first rotation item, loaded with the row.
  const int items_per_head = half / E;
  Vec<T> w1_first, w2_first;
  if constexpr (kNorm) {
    const int h = threadIdx.x / items_per_head, i0 = (threadIdx.x % items_per_head) * E;
    if (h < qk_heads) {
      const T* w = static_cast<const T*>(h < a.hq ? a.q_norm_weight : a.k_norm_weight);
      w1_first = load_vec(w + i0);
      w2_first = load_vec(w + half + i0);
    }
  }
  const float position = __ll2float_rn(a.positions[token]);
  for (int i = threadIdx.x; i < half; i += kThreads) {
    const float angle = __fmul_rn(position, a.inv_freq[i]);
    cos_sin[i] = round_to<T>(cosf(angle));
    cos_sin[half + i] = round_to<T>(sinf(angle));
  }
  __syncthreads();

  if constexpr (kNorm) {
    const int warp = threadIdx.x / 32;
    const int scratch_per_warp = max(a.q_order.threads, a.k_order.threads);
    for (int h = warp; h < qk_heads; h += kThreads / 32) {
      const bool is_q = h < a.hq;
      const float sum = torch_row_sum_sq(qk + h * d, d, is_q ? a.q_order : a.k_order,
                                         scratch + warp * scratch_per_warp);
      if ((threadIdx.x & 31) == 0) {
        inv[h] = rms_inverse(sum, is_q ? a.q_mean_factor : a.k_mean_factor, a.eps);
      }
    }
    __syncthreads();
  }

  // Rotation: each item is E pairs (i, i + d/2) of one head.
  for (int it = threadIdx.x; it < qk_heads * items_per_head; it += kThreads) {
    const int h = it / items_per_head, i0 = (it % items_per_head) * E;
    const bool is_q = h < a.hq;
    const Vec<T> x1 = load_vec(qk + h * d + i0);
    const Vec<T> x2 = load_vec(qk + h * d + half + i0);
    float f1[E], f2[E];
#pragma unroll
    for (int j = 0; j < E; ++j) {
      f1[j] = to_float(x1.v[j]);
      f2[j] = to_float(x2.v[j]);
    }
    if constexpr (kNorm) {
      Vec<T> w1 = w1_first, w2 = w2_first;
      if (it != threadIdx.x) {
        const T* w = static_cast<const T*>(is_q ? a.q_norm_weight : a.k_norm_weight);
        w1 = load_vec(w + i0);
        w2 = load_vec(w + half + i0);
      }
#pragma unroll
      for (int j = 0; j < E; ++j) {
        f1[j] = rms_apply<T>(f1[j], inv[h], to_float(w1.v[j]));
        f2[j] = rms_apply<T>(f2[j], inv[h], to_float(w2.v[j]));
      }
    }
    Vec<T> o1, o2;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const float c = cos_sin[i0 + j], sn = cos_sin[half + i0 + j];
      o1.v[j] = from_float<T>(__fadd_rn(round_to<T>(__fmul_rn(f1[j], c)),
                                        round_to<T>(__fmul_rn(-f2[j], sn))));
      o2.v[j] = from_float<T>(__fadd_rn(round_to<T>(__fmul_rn(f2[j], c)),
                                        round_to<T>(__fmul_rn(f1[j], sn))));
    }
    T* dst = is_q ? static_cast<T*>(a.q) +
                        ((static_cast<int64_t>(b) * a.hq + h) * a.block + s) * d
                  : static_cast<T*>(a.k) +
                        ((static_cast<int64_t>(b) * a.hkv + (h - a.hq)) * a.block + s) * d;
    store_vec(dst + i0, o1);
    store_vec(dst + half + i0, o2);
  }
}

template <typename T>
cudaError_t launch_typed(const QkvRopeArgs& a, cudaStream_t stream) {
  const bool norm = a.q_norm_weight != nullptr;
  const int qk_heads = a.hq + a.hkv;
  const int max_threads = std::max(a.q_order.threads, a.k_order.threads);
  const int64_t smem = static_cast<int64_t>(qk_heads) * a.dim * sizeof(T) +
                       (a.dim + qk_heads) * sizeof(float) +
                       (norm && max_threads > 32 ? (kThreads / 32) * max_threads * 4 : 0);
  const auto kernel = norm ? qkv_rope_kernel<T, true> : qkv_rope_kernel<T, false>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<a.batch * a.block, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_qkv_rope(Dtype dtype, const QkvRopeArgs& a, cudaStream_t stream) {
  return with_element_type(dtype,
                           [&](auto t) { return launch_typed<decltype(t)>(a, stream); });
}

}  // namespace mage::cuda
