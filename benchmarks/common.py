"""Shared pieces of the benchmarks: environment record, copy bandwidth, timing, results."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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


def time_us(fn, warmup_ms: float = 10, rep_ms: float = 40) -> float:
    """Median time of fn in microseconds, CUDA events around each call, L2 flushed between
    calls (triton.testing.do_bench), after warm-up."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    if not ms > 0:
        raise RuntimeError(f"timing returned {ms} ms: not a measurement")
    return ms * 1e3


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


def copy_bandwidth_tbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in TB/s."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), rep_ms=100)
    del src, dst
    return 2 * nbytes / (us * 1e-6) / 1e12


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1) + "\n")
    out = os.environ.get("OUT")  # the GPU machine's result folder, when set
    if out:
        Path(out, name).write_text(path.read_text())
    return path
