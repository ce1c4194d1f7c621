"""One block of MAGE decoding with the raw ops, on CPU or GPU.

First (all-[MASK]) step: exact attention + importance scores; select the top-k cache entries
per KV head; later steps: attention over those entries plus the block only.

    python examples/quickstart.py [--cache-len 16384] [--k 512] [--device cpu]
"""
import argparse
import time

import torch

import mage_ext


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache-len", type=int, default=16384)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--heads", type=int, default=12, help="query heads (Fast-dLLM v2 1.5B: 12)")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    n, d = args.cache_len, args.head_dim

    def randn(*shape):
        return torch.randn(*shape, device=args.device, dtype=dtype)

    k_cache, v_cache = randn(1, args.kv_heads, n, d), randn(1, args.kv_heads, n, d)
    # A few "relevant" cache entries that the block's queries will look at.
    hot = torch.randint(0, n, (64,))
    direction = 0.5 * randn(1, 1, 1, d)  # hot logits about 8 above the rest
    k_cache[:, :, hot] += 3 * direction
    cache_lens = torch.tensor([n], dtype=torch.int32, device=args.device)
    q = randn(1, args.heads, args.block, d) + direction
    k_block, v_block = randn(1, args.kv_heads, args.block, d), randn(1, args.kv_heads, args.block, d)

    t0 = time.perf_counter()
    out_first, _, scores = mage_ext.attention_with_scores(q, k_cache, v_cache, cache_lens,
                                                          k_block, v_block)
    indices, counts = mage_ext.topk_select(scores, cache_lens, args.k)
    t1 = time.perf_counter()
    q_later = q + 0.1 * randn(*q.shape)  # a later denoising step: similar queries
    out_sparse, _ = mage_ext.sparse_attention(q_later, k_cache, v_cache, indices, counts,
                                              k_block, v_block)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    out_exact, _ = mage_ext.dense_attention(q_later, k_cache, v_cache, cache_lens, k_block,
                                            v_block)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t3 = time.perf_counter()

    rel = ((out_sparse.float() - out_exact.float()).norm() / out_exact.float().norm()).item()
    hot_found = torch.isin(hot.to(args.device), indices[0, 0]).float().mean().item()
    print(f"device {args.device}, cache {n}, block {args.block}, k {args.k}, "
          f"Hq/Hkv {args.heads}/{args.kv_heads}, d {d}, {dtype}")
    print(f"first step (exact + scores + top-k): {1e3 * (t1 - t0):8.2f} ms")
    print(f"later step, sparse (k={args.k}):       {1e3 * (t2 - t1):8.2f} ms")
    print(f"later step, exact:                    {1e3 * (t3 - t2):8.2f} ms")
    print(f"KV read by the sparse step: {args.k / n:.2%} of the cache")
    print(f"relevant entries found by the all-[MASK] selection: {hot_found:.0%}")
    print(f"relative error of the sparse step vs exact: {rel:.2e}")


if __name__ == "__main__":
    main()
