// TMA descriptors (Hopper's tensor memory accelerator) of the K / V caches, read by the dense
// warpgroup kernel's producer warp: one bulk copy instruction per 64-row x 64-column box instead
// of 16-byte cp.async per lane (with cp.async the producer alone could not stream the cache at
// HBM speed: the loads-only variant of the kernel measured 1.3-1.7x the byte floor).
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: the encoder is found through the runtime)

#include <cstdint>

namespace mage::cuda {

// Encodes `map` for a cache of 16-bit elements viewed as [batch][hkv][capacity][dim] (rows
// contiguous; batch / head strides in elements) at `base`, read in boxes of kKeyTile rows x 64
// columns with the 128-byte swizzle, the tile layout wgmma reads (wgmma.cuh). Returns false
// when the driver has no encoder or rejects the layout; the kernel then copies with cp.async.
bool encode_cache_map(CUtensorMap* map, const void* base, int64_t batch, int64_t hkv,
                      int64_t capacity, int64_t dim, int64_t stride_b, int64_t stride_h);

}  // namespace mage::cuda
