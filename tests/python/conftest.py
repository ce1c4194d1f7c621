import os
import random
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import mage_ext  # noqa: E402

# Under pytest-xdist every worker would start one intra-op thread per core: n workers x n cores
# threads spin against each other (float64 references crawled on the 16-core GPU machine with -n 8).
# Each worker takes its share of the cores instead.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Fresh random inputs every run; MAGE_TEST_SEED=<n> replays a run (the seed is in the header).
SESSION_SEED = int(os.environ.get("MAGE_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"mage: MAGE_TEST_SEED={SESSION_SEED}, CUDA kernels built: {mage_ext.cuda_kernels_built()}"


def cuda_ready() -> bool:
    return torch.cuda.is_available() and mage_ext.cuda_kernels_built()


DEVICES = ["cpu"] + (["cuda"] if cuda_ready() else [])
requires_cuda = pytest.mark.skipif(not cuda_ready(),
                                   reason="needs a CUDA GPU and a build with the CUDA kernels")


def capture(step):
    """A CUDA graph of step(), after one warm-up run on a side stream (outside the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@pytest.fixture
def gen(request):
    """A generator seeded from the session seed and the test's id."""
    g = torch.Generator()
    g.manual_seed((SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) % (2**31))
    return g


_CUDA_READY = cuda_ready()


@pytest.fixture(autouse=True)
def device_error_record_is_clean():
    """After every test on a CUDA machine: no kernel left an entry in a device's error record
    (csrc/ops/device_errors.h). Valid inputs must never report; tests that provoke an error
    read the record themselves (mage_ext.check_errors / ops.take_error)."""
    yield
    if _CUDA_READY:
        for i in range(torch.cuda.device_count()):
            record = mage_ext.ops.take_error(f"cuda:{i}")
            if record:
                pytest.fail(f"cuda:{i}: a kernel recorded an error the test did not read: "
                            f"{record} [code, op, sequence, head, slot, value, limit, 0]")
