// Hopper warpgroup MMA (wgmma, sm_90a) helpers: shared-memory matrix descriptors for tiles
// stored with the 128-byte swizzle, the async fences, and the two MMA shapes the attention
// kernel uses (S = Q K^T from shared memory; O += P V with P in registers).
//
// Tile layout (sw128_offset): a tile of n rows x D 16-bit columns is stored as D / 64 column
// halves of [n rows][64 columns]; each 128-byte row's 16-byte chunk c sits at chunk c ^ (row % 8)
// (the hardware's 128-byte swizzle; 8-row atoms of 1024 bytes, tile bases 1024-byte aligned).
// The same layout serves K (K-major B operand of Q K^T) and V (MN-major B operand of P V).
#pragma once

#include "cuda/device_utils.cuh"

namespace mage::cuda {

// Byte offset of 16-byte chunk `chunk` (0 .. D/8-1) of row `row` in a tile of `n_rows` rows.
MAGE_DEVICE int sw128_offset(int row, int chunk, int n_rows) {
  return (chunk >> 3) * n_rows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// Matrix descriptor: start address, leading / stride byte offsets, 128-byte swizzle.
MAGE_DEVICE uint64_t wgmma_desc(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint32_t addr = smem_addr(smem);
  uint64_t d = static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo_bytes & 0x3FFFF) >> 4) << 16;
  d |= static_cast<uint64_t>((sbo_bytes & 0x3FFFF) >> 4) << 32;
  d |= 1ull << 62;  // layout type 1: 128-byte swizzle
  return d;
}

MAGE_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
MAGE_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
MAGE_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's view of shared memory (e.g. cp.async results it acquired through an
// mbarrier) visible to the async proxy that wgmma reads operands through.
MAGE_DEVICE void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accumulator reads / writes across the async MMAs.
template <int N>
MAGE_DEVICE void wgmma_fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define MAGE_WG_D32                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MAGE_WG_D64                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "  \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "  \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define MAGE_ACC8(b)                                                                       \
  "+f"(d[b + 0]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), "+f"(d[b + 4]),          \
      "+f"(d[b + 5]), "+f"(d[b + 6]), "+f"(d[b + 7])
#define MAGE_ACC32 MAGE_ACC8(0), MAGE_ACC8(8), MAGE_ACC8(16), MAGE_ACC8(24)
#define MAGE_ACC64 MAGE_ACC32, MAGE_ACC8(32), MAGE_ACC8(40), MAGE_ACC8(48), MAGE_ACC8(56)

template <typename T> struct WgmmaOps;

// TY: the PTX element type. SS: d (64 x 64, fp32) (+)= A (64 x 16, K-major, smem) x
// B (16 x 64, K-major, smem). RS: d (64 x N) += A (64 x 16, registers, the mma.sync A
// fragment layout per warp) x B (16 x N, MN-major smem).
#define MAGE_DEFINE_WGMMA_OPS(CT, TY)                                                        \
  template <>                                                                                \
  struct WgmmaOps<CT> {                                                                      \
    static MAGE_DEVICE void ss_n64(float (&d)[32], uint64_t da, uint64_t db, int accumulate) { \
      asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %34, 0;\n"                            \
                   " wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " MAGE_WG_D32    \
                   ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                          \
                   : MAGE_ACC32                                                              \
                   : "l"(da), "l"(db), "r"(accumulate));                                     \
    }                                                                                        \
    static MAGE_DEVICE void rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {    \
      asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"                            \
                   " wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " MAGE_WG_D32    \
                   ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                             \
                   : MAGE_ACC32                                                              \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));          \
    }                                                                                        \
    static MAGE_DEVICE void rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {   \
      asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %69, 0;\n"                            \
                   " wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " MAGE_WG_D64   \
                   ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                             \
                   : MAGE_ACC64                                                              \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));          \
    }                                                                                        \
  };

MAGE_DEFINE_WGMMA_OPS(__nv_bfloat16, "bf16")
MAGE_DEFINE_WGMMA_OPS(__half, "f16")

#undef MAGE_DEFINE_WGMMA_OPS

// O (64 x D) += P (64 x 16) V (16 x D) for D = 64 or 128.
template <typename T, int D>
MAGE_DEVICE void wgmma_pv(float (&o)[D / 2], const uint32_t (&a)[4], uint64_t db) {
  if constexpr (D == 128) {
    WgmmaOps<T>::rs_n128(o, a, db);
  } else {
    WgmmaOps<T>::rs_n64(o, a, db);
  }
}

}  // namespace mage::cuda
