import os
import random
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import mage_ext  # noqa: E402

# Fresh random inputs every run; MAGE_TEST_SEED=<n> replays a run (the seed is in the header).
SESSION_SEED = int(os.environ.get("MAGE_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"mage: MAGE_TEST_SEED={SESSION_SEED}, CUDA kernels built: {mage_ext.cuda_kernels_built()}"


def cuda_ready() -> bool:
    return torch.cuda.is_available() and mage_ext.cuda_kernels_built()


DEVICES = ["cpu"] + (["cuda"] if cuda_ready() else [])
requires_cuda = pytest.mark.skipif(not cuda_ready(),
                                   reason="needs a CUDA GPU and a build with the CUDA kernels")


@pytest.fixture
def gen(request):
    """A generator seeded from the session seed and the test's id."""
    g = torch.Generator()
    g.manual_seed((SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) % (2**31))
    return g
