"""Runs every CUDA op once on small shapes, for compute-sanitizer (not a pytest file):

    compute-sanitizer --tool memcheck  --kernel-name kns=mage python3 tests/sanitize_ops.py
    compute-sanitizer --tool racecheck --kernel-name kns=mage python3 tests/sanitize_ops.py
    compute-sanitizer --tool synccheck --kernel-name kns=mage python3 tests/sanitize_ops.py
(tests/run_gpu.sh runs all three and records the verdicts.)

Shapes cover: lengths not multiple of the tiles, a split cache (merge kernel), batch 2 with
unequal lengths, GQA, d 64 and 128, fp16 / bf16 / fp32, sparse with counts < k, top-k with
sinks and recents (1, 2 or 4, and 16 CTAs per row; re-read tiles), append; and a case with
enough rows and key tiles for the wide CTAs (the sm_90a warpgroup kernels on an sm_90a
build), with a part-filled warpgroup. Then the fused layer ops (fused_ops): RMSNorm rows that
torch sums with 32, 128 and 512 threads (the shared-memory tree), in place; qkv_rope with and
without q/k norms, d 64 / 128 / 256; silu_mul vectorised and at an odd offset. Then the error
paths (csrc/ops/device_errors.h): an append that does not fit, selected indices outside the cache (negative, past the capacity, far past),
counts outside [0, k], cache lengths past the capacity or negative, on every kernel that reads
them; memcheck must find no out-of-bounds access, and each must land in the error record.
"""
import torch

import mage_ext


def main():
    assert torch.cuda.is_available() and mage_ext.cuda_kernels_built(), "needs the CUDA kernels"
    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (64, 128):
            b, hq, hkv, blk, cap = 2, 6, 2, 5, 1500
            r = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
            q, kb, vb = r(b, hq, blk, d), r(b, hkv, blk, d), r(b, hkv, blk, d)
            kc, vc = r(b, hkv, cap, d), r(b, hkv, cap, d)
            lens = torch.tensor([1333, 77], dtype=torch.int32, device=dev)
            out, lse, scores = mage_ext.attention_with_scores(q, kc, vc, lens, kb, vb)
            mage_ext.dense_attention(q, kc, vc, lens, kb, vb)
            idx, cnt = mage_ext.topk_select(scores, lens, 100, n_sink=3, n_recent=5)
            mage_ext.sparse_attention(q, kc, vc, idx, cnt, kb, vb)
            mage_ext.append_kv(kc, vc, lens, kb, vb)
        # Wide CTAs: 5 x 32 = 160 rows per KV head (3 warpgroups, the last half full).
        b, hq, hkv, blk, cap, d = 2, 10, 2, 32, 9000, 128
        if dtype != torch.float32:
            r = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
            q, kb, vb = r(b, hq, blk, d), r(b, hkv, blk, d), r(b, hkv, blk, d)
            kc, vc = r(b, hkv, cap, d), r(b, hkv, cap, d)
            lens = torch.tensor([8999, 4001], dtype=torch.int32, device=dev)
            out, lse, scores = mage_ext.attention_with_scores(q, kc, vc, lens, kb, vb)
            idx, cnt = mage_ext.topk_select(scores, lens, 4000)
            mage_ext.sparse_attention(q, kc, vc, idx, cnt, kb, vb)
    # Top-k with a cluster per row (capacity 20000 > 16K: 2 CTAs, 4 where the rows fit at
    # once): the DSMEM histograms.
    scores = torch.randn(2, 2, 20000, device=dev)
    lens = torch.tensor([20000, 9000], dtype=torch.int32, device=dev)
    mage_ext.topk_select(scores, lens, 512, n_sink=4, n_recent=64)
    # 16-CTA clusters (non-portable size; 8 where the device has none): a batch-1 long row with
    # a length off the 32-position segments, and a 300000 row that re-reads 16K tiles.
    for cap, n in ((150000, 149989), (300000, 299999)):
        scores = torch.randn(1, 2, cap, device=dev)
        lens = torch.tensor([n], dtype=torch.int32, device=dev)
        mage_ext.topk_select(scores, lens, 512, n_sink=4, n_recent=64)
    fused_ops()
    torch.cuda.synchronize()
    mage_ext.check_errors()  # valid inputs: nothing recorded
    error_paths(dev)
    print("sanitize_ops: all ops ran")


def fused_ops():
    dev = "cuda"
    ops = mage_ext.ops
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        r = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
        for rows, n in ((32, 1536), (4, 1536), (1, 8192), (64, 8192), (3, 200), (5, 96)):
            x, res, w = r(rows, n), r(rows, n), r(n)
            ops.rms_norm(x, w, 1e-6, res)
            ops.rms_norm_out(x, w, 1e-6, res, x, res)  # in place
            ops.rms_norm(x, w, 1e-6)
        for batch, block, hq, hkv, d in ((2, 5, 6, 2, 64), (1, 32, 12, 2, 128), (2, 3, 4, 1, 256)):
            qkv = r(batch, block, (hq + 2 * hkv) * d)
            pos = torch.randint(0, 131072, (batch, block), device=dev)
            inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
            ops.qkv_rope(qkv, pos, inv_freq, hq, hkv, d)
            ops.qkv_rope(qkv, pos, inv_freq, hq, hkv, d, r(d), r(d), 1e-6)
        gate_up = r(3 * 7 * 2 * 136 + 1)
        ops.silu_mul(gate_up[:-1].view(3, 7, 272))
        ops.silu_mul(gate_up[1:].view(3, 7, 272))  # odd offset: the element-wise kernel


def expect_error(code):
    rec = mage_ext.ops.take_error("cuda")
    assert rec and rec[0] == code, f"expected error code {code}, got the record {rec}"


def error_paths(dev):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (64, 128):
            for b, hq, hkv, blk, cap, n in ((2, 6, 2, 5, 1500, 1333), (2, 10, 2, 32, 9000, 8999)):
                if dtype == torch.float32 and blk == 32:
                    continue
                r = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
                q, kb, vb = r(b, hq, blk, d), r(b, hkv, blk, d), r(b, hkv, blk, d)
                kc, vc = r(b, hkv, cap, d), r(b, hkv, cap, d)
                for bad_len in (cap + 1000, -7):
                    lens = torch.tensor([n, bad_len], dtype=torch.int32, device=dev)
                    mage_ext.attention_with_scores(q, kc, vc, lens, kb, vb)
                    expect_error(1)
                    mage_ext.dense_attention(q, kc, vc, lens, kb, vb)
                    expect_error(1)
                    mage_ext.topk_select(torch.rand(b, hkv, cap, device=dev), lens, 100)
                    expect_error(1)
                    mage_ext.append_kv(kc, vc, lens, kb, vb)
                    expect_error(2)
                lens = torch.tensor([cap - blk + 1, n], dtype=torch.int32, device=dev)
                mage_ext.append_kv(kc, vc, lens, kb, vb)
                expect_error(2)
                lens = torch.tensor([n, n // 3], dtype=torch.int32, device=dev)
                _, _, scores = mage_ext.attention_with_scores(q, kc, vc, lens, kb, vb)
                for k in (100, min(4000, cap)):
                    idx, cnt = mage_ext.topk_select(scores, lens, k)
                    for bad in (-5, cap, 10_000_000):
                        broken = idx.clone()
                        broken[1, 0, 3] = bad
                        broken[0, 1, int(cnt[0, 1]) - 1] = bad
                        mage_ext.sparse_attention(q, kc, vc, broken, cnt, kb, vb)
                        expect_error(3)
                    counts = cnt.clone()
                    counts[0, 0], counts[1, 1] = k + 50, -3
                    mage_ext.sparse_attention(q, kc, vc, idx, counts, kb, vb)
                    expect_error(4)
    torch.cuda.synchronize()
    mage_ext.check_errors()


if __name__ == "__main__":
    main()
