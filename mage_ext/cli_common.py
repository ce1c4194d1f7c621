"""What the command lines share (``python -m mage_ext.generate``, ``python -m mage_ext.eval``).

* ``Parser``: argparse with every default in ``--help`` and one-line usage errors (exit 2).
* ``run_cli``: runs a main function; any error becomes one line ``PROG: error: ...`` on stderr
  with exit status 1 (``--debug`` shows the traceback instead), warnings one line each.
* Argument types that validate their value (``positive_int``, ``probability`` ...), so a bad
  value is refused before any model is loaded.
* ``resolve_device`` / ``resolve_dtype``: "auto" means CUDA when a GPU and the CUDA kernels are
  there (then bfloat16), else the CPU (then float32): the C++ binary's defaults too.
* ``StatusLine``: a progress line on stderr, redrawn in place on a terminal.
* ``init_distributed``: under ``torchrun --nproc-per-node N`` one process group (NCCL on GPUs,
  gloo on the CPU) and one GPU per rank; only rank 0 prints output and warnings, errors name
  their rank.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Callable, Optional, Sequence

DTYPES = ("auto", "float32", "bfloat16", "float16")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` after each option's help, except where the help says the default
    itself (options whose default is None or a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``PROG: error: ... (see --help)``, exit 2)
    and which takes ``--debug`` (tracebacks instead of one-line errors; see ``run_cli``)."""

    def __init__(self, prog: str, description: str):
        super().__init__(prog=prog, description=description, formatter_class=Formatter)
        self.add_argument("--debug", action="store_true",
                          help="show the full traceback of an error (default: one line)")

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def run_cli(main: Callable[[Optional[Sequence[str]]], None], prog: str,
            argv: Optional[Sequence[str]] = None) -> None:
    """Runs ``main(argv)``: errors become ``PROG: error: MESSAGE`` and ``sys.exit(1)`` (Ctrl-C:
    exit 130); with ``--debug`` in argv they propagate with their traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    rank, world = launch_rank()
    where = f"[rank {rank}/{world}] " if rank else ""  # under torchrun: rank 0 speaks plainly
    try:
        with warnings.catch_warnings():  # one line each, restored afterwards
            warnings.showwarning = (lambda msg, *a, **k: sys.stderr.write(
                f"{prog}: warning: {msg}\n") if rank == 0 else None)
            main(args)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"\n{prog}: interrupted\n")
        sys.exit(130)
    except BrokenPipeError:  # the reader left (`... | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        sys.exit(1)
    except Exception as e:  # noqa: BLE001  (every error reaches the user as one line)
        if debug:
            raise
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: error: {where}{error_text(e)}\n")
        sys.exit(1)


def error_text(e: BaseException) -> str:
    """One line for an exception: its message (a KeyError's without the quotes), the type where
    the message alone would not say what went wrong."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split()) or type(e).__name__
    if not isinstance(e, (ValueError, TypeError, KeyError, FileNotFoundError, CliError)):
        msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
    return msg


class CliError(Exception):
    """An error the command line reports as it is (bad values found after parsing)."""


# -- argument types: each raises ArgumentTypeError, which the parser prints as one line -------

def _number(cast, text: str, what: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None


def positive_int(text: str) -> int:
    v = _number(int, text, "an integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonnegative_int(text: str) -> int:
    v = _number(int, text, "an integer")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def nonnegative_float(text: str) -> float:
    v = _number(float, text, "a number")
    if not v >= 0.0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def probability(text: str) -> float:
    """A share in (0, 1] (top-p)."""
    v = _number(float, text, "a number")
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return v


def unit_interval(text: str) -> float:
    """A value in [0, 1] (confidence thresholds, shares)."""
    v = _number(float, text, "a number")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return v


def positive_int_list(text: str) -> tuple:
    """Comma-separated integers >= 1: "4096,8192"."""
    return tuple(positive_int(x) for x in text.split(",") if x.strip()) or _empty(text)


def nonnegative_int_list(text: str) -> tuple:
    """Comma-separated integers >= 0: "0,1,2"."""
    return tuple(nonnegative_int(x) for x in text.split(",") if x.strip()) or _empty(text)


def unit_interval_list(text: str) -> tuple:
    return tuple(unit_interval(x) for x in text.split(",") if x.strip()) or _empty(text)


def name_list(choices: Sequence[str]) -> Callable[[str], tuple]:
    """Comma-separated names, each one of ``choices``."""
    def parse(text: str) -> tuple:
        names = tuple(x.strip() for x in text.split(",") if x.strip()) or _empty(text)
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; expected names from "
                                             f"{', '.join(choices)}")
        return names
    parse.__name__ = "name list"
    return parse


def _empty(text: str):
    raise argparse.ArgumentTypeError(f"expected a comma-separated list, got '{text}'")


# -- device and dtype -----------------------------------------------------------------------

def resolve_device(name: str):
    """"auto": CUDA when a GPU is visible and this build has the CUDA kernels, else the CPU."""
    import torch

    import mage_ext

    gpu = torch.cuda.is_available() and mage_ext.cuda_kernels_built()
    if name == "auto":
        return torch.device("cuda" if gpu else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device: expected cpu, cuda or cuda:N, got '{name}'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: no CUDA GPU is visible")
        if not mage_ext.cuda_kernels_built():
            raise CliError(f"--device {name}: this build of mage_ext has no CUDA kernels "
                           "(reinstall where a GPU is visible, or with MAGE_CUDA_ARCHS=9.0a)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise CliError(f"--device: expected cpu, cuda or cuda:N, got '{name}'")
    return dev


def launch_rank() -> tuple:
    """(rank, world size) of this process as torchrun set them ((0, 1) outside torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device, option: str = "--device", min_world: int = 2):
    """Under torchrun with at least ``min_world`` processes: initialises the default process
    group (NCCL for a GPU, gloo for the CPU) and returns this rank's device (a GPU means
    cuda:LOCAL_RANK). Returns ``device`` unchanged otherwise. Tensor parallelism then follows in
    ``generate`` (mage_ext/hf/tensor_parallel.py); MAGE-FT takes min_world=1, so that one
    process under torchrun resumes a sharded checkpoint."""
    import torch

    rank, world = launch_rank()
    if world < min_world or "WORLD_SIZE" not in os.environ:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        if device.index is not None:
            raise CliError(f"{option} {device}: under torchrun each rank takes its own GPU "
                           "(cuda:LOCAL_RANK); pass --device cuda")
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            raise CliError(f"torchrun: local rank {local} has no GPU (only "
                           f"{torch.cuda.device_count()} visible); use at most that many "
                           "processes per node, or --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def resolve_dtype(name: str, device):
    """"auto": bfloat16 on CUDA, float32 on the CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# -- progress ---------------------------------------------------------------------------------

class StatusLine:
    """One line of progress on stderr: redrawn in place (at most 10 times a second) on a
    terminal; elsewhere (logs, pipes) only ``done`` lines are written."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled, self.shown, self.last = enabled, False, 0.0

    def update(self, text: str, force: bool = False) -> None:
        if not self.tty or (not force and time.monotonic() - self.last < 0.1):
            return
        self.last = time.monotonic()
        self.stream.write("\r\033[K" + text)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False

    def stop(self) -> None:
        """Clears the line and draws no more (stdout now writes to the same terminal line)."""
        self.clear()
        self.tty = False

    def done(self, text: str) -> None:
        """Replaces the status with a permanent line."""
        if not self.enabled:
            return
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()


class PrefillProgress:
    """Counts a model's forwards (a forward pre-hook) to show the prefill of ``n_tokens`` prompt
    tokens in ``chunk``-token forwards on a StatusLine; later forwards (denoising) show as
    ``decoding``. Use as a context manager around ``generate``."""

    def __init__(self, model, status: StatusLine, n_tokens: int, chunk: int, label: str = ""):
        self.model, self.status, self.label = model, status, f"{label}: " if label else ""
        self.n_chunks, self.chunk, self.calls, self.handle = n_tokens // chunk, chunk, 0, None
        self.t0 = time.monotonic()

    def _hook(self, module, args):
        self.calls += 1
        if self.calls <= self.n_chunks:
            done = self.calls * self.chunk
            el = time.monotonic() - self.t0
            eta = el / self.calls * (self.n_chunks - self.calls)
            left = f", about {eta:.0f}s left" if self.calls >= 4 else ""
            self.status.update(f"{self.label}prefill {done}/{self.n_chunks * self.chunk} prompt "
                               f"tokens, {el:.0f}s{left}", force=self.calls == 1)
        else:
            self.status.update(f"{self.label}decoding, forward {self.calls - self.n_chunks}")

    def __enter__(self):
        self.t0 = time.monotonic()
        self.handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        self.status.clear()
        return False


# -- output files -----------------------------------------------------------------------------

def committed_files(path) -> list:
    """The files under ``path`` (a file or a folder) that git tracks: [] outside a checkout,
    without git, or where the folder does not exist yet."""
    import subprocess
    from pathlib import Path

    p = Path(path).resolve()
    folder, spec = (p, ".") if p.is_dir() else (p.parent, p.name)
    if not folder.is_dir():
        return []
    try:
        r = subprocess.run(["git", "ls-files", "--", spec], cwd=folder, capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return r.stdout.split() if r.returncode == 0 else []


def refuse_committed(path, force: bool, option: str) -> None:
    """Raises a CliError where writing ``path`` would replace files git tracks (committed
    results) and ``force`` is not set."""
    tracked = committed_files(path)
    if tracked and not force:
        raise CliError(f"{option} {path}: would overwrite committed file(s) "
                       f"({', '.join(tracked[:3])}{' ...' if len(tracked) > 3 else ''}); pass "
                       f"--force to replace them, or name another {option}")
