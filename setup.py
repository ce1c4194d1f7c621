"""Builds mage_ext._C: the MAGE ops registered with the torch dispatcher.

Environment switches:
  MAGE_FORCE_CPU=1       build the CPU kernels only, even where a GPU and nvcc are present.
  MAGE_REQUIRE_CUDA=1    fail unless the CUDA kernels can be built (CI's compile check); builds
                         them without a GPU.
  MAGE_CUDA_ARCHS="9.0a" CUDA architectures, sm_90 or newer (the kernels use mbarriers and
                         thread-block clusters); semicolon or space separated. 9.0a (Hopper's
                         arch-specific target) adds the wgmma attention and scores kernels;
                         plain 9.0 builds only the portable mma.sync ones. Setting it builds the
                         CUDA kernels without a GPU (default when a GPU is visible: 9.0a).
  DEBUG=1                -O0 -g host and device code.
CUDA kernels are compiled when torch is a CUDA build, a CUDA toolkit (nvcc) is found, and a GPU
is visible or MAGE_CUDA_ARCHS / MAGE_REQUIRE_CUDA asks for them; otherwise the build is CPU-only
without error (a CPU-only build takes about a minute on 2 cores, the CUDA kernels several more).
"""
import glob
import os
import shutil
import subprocess

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def library_sources(with_cuda: bool) -> list:
    """Sources from csrc/sources.txt, the list CMakeLists.txt reads too (paths relative to ROOT)."""
    sources = []
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            kind, pattern = (part.strip() for part in line.split(":", 1))
            if kind == "cpu" or (kind == "cuda" and with_cuda):
                found = glob.glob(os.path.join(ROOT, pattern))
                sources += sorted(os.path.relpath(p, ROOT) for p in found)
    return sources


def cuda_wanted() -> bool:
    if os.getenv("MAGE_FORCE_CPU", "0") == "1":
        return False
    if os.getenv("MAGE_REQUIRE_CUDA", "0") == "1":
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError("MAGE_REQUIRE_CUDA=1 but torch is a CPU build or no CUDA toolkit "
                               f"was found (torch.version.cuda={torch.version.cuda}, "
                               f"CUDA_HOME={CUDA_HOME})")
        return True
    if torch.version.cuda is None:
        print("mage: torch is a CPU build; building CPU kernels only")
        return False
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        print("mage: no CUDA toolkit (nvcc) found; building CPU kernels only")
        return False
    if os.getenv("MAGE_CUDA_ARCHS"):
        return True
    if not gpu_visible():
        print("mage: no GPU visible; building CPU kernels only (set MAGE_CUDA_ARCHS=9.0a to "
              "compile the CUDA kernels anyway)")
        return False
    return True


def gpu_visible() -> bool:
    """Whether this machine shows a GPU, asked without creating a CUDA context in the build:
    nvidia-smi where it exists, else the CUDA driver's device count through torch."""
    if os.getenv("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
            return r.returncode == 0 and "GPU" in r.stdout
        except (OSError, subprocess.SubprocessError):
            return False
    try:
        return torch.cuda.device_count() > 0
    except Exception:  # a broken driver install: build for the CPU
        return False


def gencode_flags(archs: str) -> list:
    flags = []
    for arch in archs.replace(";", " ").split():
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def wgmma_wanted(archs: str) -> bool:
    """The warpgroup (wgmma) kernels need the arch-specific Hopper target sm_90a."""
    return any(a.removesuffix("+PTX").replace(".", "") == "90a"
               for a in archs.replace(";", " ").split())


def extensions():
    debug = os.getenv("DEBUG", "0") == "1"
    use_cuda = cuda_wanted()
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # Python's own CFLAGS carry -g: debug info more than doubles the compile time of these
    # torch-header-heavy files (31 s -> 13 s of CPU for csrc/ops/checks.cpp) and the .so's size.
    cxx = opt + ["-std=c++17"] + ([] if debug else ["-g0"])
    args = {"cxx": cxx}
    sources = library_sources(use_cuda)
    sources.append("csrc/python_module.cpp")
    if use_cuda:
        archs = os.getenv("MAGE_CUDA_ARCHS", "9.0a")
        defines = ["-DMAGE_WITH_CUDA"] + (["-DMAGE_WGMMA"] if wgmma_wanted(archs) else [])
        args["cxx"] = cxx + defines
        args["nvcc"] = opt + [
            "-std=c++17",
            *defines,
            "--expt-relaxed-constexpr",
            "-lineinfo",
        ] + gencode_flags(archs) + (["-G"] if debug else [])
        ext = CUDAExtension
        print(f"mage: building CPU + CUDA kernels for archs {archs}")
    else:
        ext = CppExtension
    return [
        ext(
            "mage_ext._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
            extra_compile_args=args,
            # Limited Python API: the library uses torch/library.h only, so one abi3 binary
            # serves every Python >= 3.9 built against the same torch.
            py_limited_api=True,
        )
    ]


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )
