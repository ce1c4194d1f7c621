// SwiGLU's elementwise part: out = silu(gate) * up from the gate_up GEMM's output [rows, 2I]
// (gate columns first). The values of transformers' act_fn(gate) * up on the GPU: torch's silu
// computes x / (1 + expf(-x)) in fp32 and rounds once to the dtype, then the product is rounded.
#include <algorithm>

#include "cuda/fused_common.cuh"

namespace mage::cuda {
namespace {

constexpr int kThreads = 64;  // small CTAs: a few rows spread over many SMs

template <typename T>
MAGE_DEVICE T silu_mul(T gate, T up) {
  const float g = to_float(gate);
  const float silu = round_to<T>(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))));
  return from_float<T>(__fmul_rn(silu, to_float(up)));
}

// kE elements per thread: a 16-byte vector, or 1 where rows or pointers are not 16-byte aligned.
template <typename T, int kE>
__global__ void __launch_bounds__(kThreads)
    silu_mul_kernel(const __grid_constant__ SiluMulArgs a) {
  const int64_t per_row = a.inter / kE;
  const int64_t items = a.rows * per_row;
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; it < items;
       it += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = it / per_row, col = (it % per_row) * kE;
    const T* gate = static_cast<const T*>(a.gate_up) + row * 2 * a.inter + col;
    T* out = static_cast<T*>(a.out) + row * a.inter + col;
    if constexpr (kE == 1) {
      *out = silu_mul(gate[0], gate[a.inter]);
    } else {
      const Vec<T> g = load_vec(gate), u = load_vec(gate + a.inter);
      Vec<T> o;
#pragma unroll
      for (int j = 0; j < kE; ++j) o.v[j] = silu_mul(g.v[j], u.v[j]);
      store_vec(out, o);
    }
  }
}

template <typename T>
cudaError_t launch_typed(const SiluMulArgs& a, cudaStream_t stream) {
  constexpr int E = kVec<T>;
  const bool vec = a.vec16 && a.inter % E == 0;
  const int64_t items = a.rows * (vec ? a.inter / E : a.inter);
  const int64_t ctas = std::min<int64_t>((items + kThreads - 1) / kThreads, 1 << 20);
  if (vec) {
    silu_mul_kernel<T, E><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(a);
  } else {
    silu_mul_kernel<T, 1><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_silu_mul(Dtype dtype, const SiluMulArgs& a, cudaStream_t stream) {
  return with_element_type(dtype,
                           [&](auto t) { return launch_typed<decltype(t)>(a, stream); });
}

}  // namespace mage::cuda
