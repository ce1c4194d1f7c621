// Small device helpers: async copies, ldmatrix, the m16n8k16 tensor-core MMA, packing,
// the shared-memory swizzle, and the element-type traits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/kernel_args.h"

#define MAGE_DEVICE __device__ __forceinline__

namespace mage::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <Dtype> struct ElementOf;
template <> struct ElementOf<Dtype::kFloat16> { using type = __half; };
template <> struct ElementOf<Dtype::kBFloat16> { using type = __nv_bfloat16; };
template <> struct ElementOf<Dtype::kFloat32> { using type = float; };

MAGE_DEVICE float to_float(float x) { return x; }
MAGE_DEVICE float to_float(__half x) { return __half2float(x); }
MAGE_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> MAGE_DEVICE T from_float(float x);
template <> MAGE_DEVICE float from_float<float>(float x) { return x; }
template <> MAGE_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> MAGE_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats -> one 32-bit register of two 16-bit values (first in the low half).
template <typename T> MAGE_DEVICE uint32_t pack2(float lo, float hi);
template <> MAGE_DEVICE uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> MAGE_DEVICE uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 16-byte global -> shared copy; a false `valid` writes zeros (src is then not read).
MAGE_DEVICE void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
}
MAGE_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> MAGE_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Shared-memory barriers (mbarrier) of the producer / consumer pipelines.
MAGE_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
MAGE_DEVICE void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
MAGE_DEVICE void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Arrives once every cp.async this thread issued before has landed (count it in the init).
MAGE_DEVICE void mbar_arrive_on_copies(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar))
               : "memory");
}
// Arrives and adds `bytes` to the transaction count the phase waits for (TMA copies below).
MAGE_DEVICE void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
#endif
}
// One TMA box of a 4-D tensor map (coordinates innermost first) into shared memory; its bytes
// count against `bar`'s transaction count. The map lives in kernel parameter space.
MAGE_DEVICE void tma_load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                             uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(smem_addr(bar))
      : "memory");
#endif
}
// Named barriers (bar.sync / bar.arrive; id 0 is __syncthreads): `threads` of the CTA meet,
// some waiting (sync), some only signalling (arrive).
MAGE_DEVICE void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
MAGE_DEVICE void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
MAGE_DEVICE void mbar_wait(uint64_t* bar, int parity) {
  const uint32_t addr = smem_addr(bar);
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  }
}

MAGE_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
MAGE_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D(16x8, fp32) += A(16x16, row) * B(16x8, col).
template <typename T>
MAGE_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
MAGE_DEVICE void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
MAGE_DEVICE void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                   uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-memory tiles are [rows][D] of 16-byte chunks; chunk c of row r is stored at chunk
// c ^ (r % 8), so the 8 rows one ldmatrix reads fall in 8 different bank groups.
template <int D>
MAGE_DEVICE int swizzled(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// 2^x on the special-function unit, denormal results flushed to zero (exp2f adds range
// handling around the same instruction; softmax weights below 2^-126 do not matter).
MAGE_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

MAGE_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

MAGE_DEVICE int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Records a bad input value in the device's error record (ops/device_errors.h) unless an earlier
// error holds it: one atomicCAS claims the record, then the claimant fills in the fields (the
// reader synchronises the stream first, so it sees them). Only error paths call this.
MAGE_DEVICE void report_error(const ErrorSink& sink, DeviceError code, int seq, int head,
                              int slot, int value, int limit) {
  int32_t* r = sink.record;
  if (atomicCAS(r + kErrCode, 0, static_cast<int32_t>(code)) != 0) return;
  r[kErrOp] = sink.op;
  r[kErrSeq] = seq;
  r[kErrHead] = head;
  r[kErrSlot] = slot;
  r[kErrValue] = value;
  r[kErrLimit] = limit;
}

// Programmatic dependent launch (sm_90). A kernel launched by launch_dependent() may be placed
// on the GPU while the kernel before it in the stream still runs, so its launch latency
// overlaps that kernel's tail; it must call pdl_wait() before it touches global memory (the
// wait returns once the previous kernel has finished and its writes are visible; at once when
// the launch was an ordinary one). Kernels that usually have such a successor call
// pdl_release() when their main loop is done: the successor's CTAs may then take free SM
// slots and wait there.
MAGE_DEVICE void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
MAGE_DEVICE void pdl_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Launches kernel(args) after the previous kernel in the stream: programmatically (see above)
// when `pdl`, else as an ordinary launch.
template <typename Args>
cudaError_t launch_dependent(bool pdl, void (*kernel)(Args), dim3 grid, int threads, int smem,
                             cudaStream_t stream, const Args& args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, args);
}

}  // namespace mage::cuda
