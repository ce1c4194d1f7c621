"""Shared pieces of the benchmarks: environment record, copy bandwidth, timing, results."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Per-layer attention shapes of the target models: (Hq, Hkv, head dim).
SHAPES = {"fdllm-1.5b": (12, 2, 128), "fdllm-7b": (28, 4, 128), "sdar-4b": (32, 8, 128)}


@contextmanager
def env_set(name: str, value: str):
    """Environment variable ``name`` = ``value`` inside the block (the ops read their switches
    per call), restored after it."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def commit() -> str:
    """The commit being measured (MAGE_COMMIT on machines without the git history)."""
    if os.environ.get("MAGE_COMMIT"):
        return os.environ["MAGE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str = "cuda") -> dict:
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name} ({props.multi_processor_count} SMs)"
    else:
        info["device"] = "cpu"
    return info


_FLUSH = []


def flush_l2() -> None:
    """Evicts the L2 cache by READING 512 MB (writing would leave dirty lines whose write-back
    the next measured kernel would pay for)."""
    if not _FLUSH:
        _FLUSH.append(torch.randn(128 << 20, device="cuda"))
    _FLUSH[0].sum()


def time_us(fn, reps: int = 40, warmup: int = 3) -> float:
    """Median device time of fn in microseconds: CUDA events around each call, after warm-up,
    with a cold L2 (flushed by a read before each call). The flush keeps the GPU busy while the
    host enqueues fn, so host overhead is not counted (see eager_us for that)."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush_l2()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    ms = times[len(times) // 2]
    if not ms > 0:
        raise RuntimeError(f"timing returned {ms} ms: not a measurement")
    return ms * 1e3


def eager_us(fn, reps: int = 50) -> float:
    """Mean time per call of fn called back to back from Python: includes the host's launch
    overhead when the host is the bottleneck (and a warm L2)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def graph_time_us(fn, **kw) -> float:
    """Like time_us, but fn is captured once in a CUDA graph and the replays are timed: the
    device time of its kernels without the host's launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_us(graph.replay, **kw)


def layers_graph_us(make_layer, layers: int = 28, **kw) -> float:
    """Per-layer time of `layers` calls captured in ONE graph, each call from make_layer() on its
    own inputs (its own KV cache, as the layers of a model): what a layer costs inside a
    decoding graph, where the graph's launch and the timing events are paid once, not per call."""
    fns = [make_layer() for _ in range(layers)]
    return graph_time_us(lambda: [f() for f in fns], **kw) / layers


def copy_bandwidth_tbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in TB/s."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (us * 1e-6) / 1e12


def matmul_tflops(n: int = 8192) -> float:
    """Dense bf16 matrix-multiply throughput measured here (torch.mm, n x n x n): the compute
    peak the compute floors use."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    us = time_us(lambda: torch.mm(a, b), reps=20)
    return 2 * n ** 3 / (us * 1e-6) / 1e12


def step_calls(shape: str, cache_len: int, k: int, batch: int = 1, block: int = 32) -> dict:
    """Random bf16 inputs of one layer and a call per MAGE step on them (dense, first, topk,
    sparse): what the profiling scripts run."""
    import mage_ext

    hq, hkv, d = SHAPES[shape]
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, kb, vb = rnd(batch, hq, block, d), rnd(batch, hkv, block, d), rnd(batch, hkv, block, d)
    kc, vc = rnd(batch, hkv, cache_len, d), rnd(batch, hkv, cache_len, d)
    lens = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
    _, _, scores = mage_ext.attention_with_scores(q, kc, vc, lens, kb, vb)
    idx, cnt = mage_ext.topk_select(scores, lens, k)
    return {
        "dense": lambda: mage_ext.dense_attention(q, kc, vc, lens, kb, vb),
        "first": lambda: mage_ext.attention_with_scores(q, kc, vc, lens, kb, vb),
        "topk": lambda: mage_ext.topk_select(scores, lens, k),
        "sparse": lambda: mage_ext.sparse_attention(q, kc, vc, idx, cnt, kb, vb),
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1) + "\n")
    out = os.environ.get("OUT")  # the GPU machine's result folder, when set
    if out:
        Path(out, name).write_text(path.read_text())
    return path


def write_result(path, payload) -> None:
    """Writes a result JSON to ``path`` and, where the device machine collects outputs ($OUT),
    a copy there."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    targets = [path] + ([os.path.join(os.environ["OUT"], os.path.basename(path))]
                        if os.environ.get("OUT") else [])
    for t in targets:
        with open(t, "w") as f:
            json.dump(payload, f, indent=1)
    print(f"wrote {path}")
