"""The sparse int8 C kernel (``sparse_int8.c`` beside this file): compiled on first use, loaded with ctypes.

Like numba, it is compiled for the machine it runs on (``-march=native``: AVX-512 VNNI, AVX2 or portable C, see
the source), once, and cached in ``$POFA_CACHE/kernels`` (default ``~/.cache/pofa/kernels``) under a key of the
source, the compiler, the flags and the CPU's feature flags, so a cache shared between different machines never
hands one a binary it cannot run. It needs a C compiler: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH.
OpenMP (``-fopenmp``) is used when the compiler supports it; the library then shares the OpenMP runtime that torch
loaded (same ``libgomp.so.1``), hence torch's thread count (``torch.set_num_threads``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch  # noqa: F401  (loaded first on purpose: the kernel then binds to torch's OpenMP runtime)

__all__ = ["NativeKernelError", "LinearParams", "SparseInt8Kernel", "sparse_int8_kernel", "compiler_available"]

SOURCE = Path(__file__).with_name("sparse_int8.c")
_ABI = 3
# -fno-trapping-math: no FP exception is ever unmasked here, and without it GCC does not if-convert (so does not
# vectorize) the branch-free clamps of the GELU epilogue; results are unchanged.
_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11", "-fno-trapping-math")


class LinearParams(ctypes.Structure):
    """Mirror of ``pofa_linear_t`` in the C source: one Linear's packed weights (pointers into tensors that the
    owner keeps alive), its row count, input width, activation quantization and fused activation (0 none, 1 GELU)."""

    _fields_ = [
        ("row_ptr", ctypes.c_void_p), ("group", ctypes.c_void_p), ("word", ctypes.c_void_p),
        ("out_scale", ctypes.c_void_p), ("out_offset", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("rows", ctypes.c_int64), ("in_features", ctypes.c_int64),
        ("scale", ctypes.c_float), ("zero_point", ctypes.c_float), ("qmax", ctypes.c_float),
        ("activation", ctypes.c_int32),
    ]


class NativeKernelError(RuntimeError):
    """The C kernel cannot be built or loaded here; the message says what to install or set."""


@dataclass(frozen=True)
class SparseInt8Kernel:
    """The loaded library: its ``linear`` entry point, the instruction set it was built for and its token block."""

    linear: ctypes._CFuncPtr
    isa: str
    token_block: int
    path: Path
    arch: str = "native"

    def __deepcopy__(self, memo: dict) -> SparseInt8Kernel:
        return self  # the library loaded in this process: shared, never copied

    def __reduce__(self) -> tuple:
        return sparse_int8_kernel, (self.arch,)  # a pickled model loads (or builds) the kernel where it is unpickled


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        found = shutil.which(name)
        if found:
            return found
    return None


def compiler_available() -> bool:
    """Whether a C compiler is on the PATH (``$CC``, cc, gcc or clang)."""
    return _compiler() is not None


def _cpu_flags() -> str:
    # Part of the cache key: -march=native code for one CPU may not run on another.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("POFA_CACHE", Path.home() / ".cache" / "pofa")) / "kernels"


def _build(compiler: str, arch: str, output: Path) -> None:
    """Compile the source to ``output`` atomically: with OpenMP when the compiler has it, else without."""
    output.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for openmp in (("-fopenmp",), ()):
        with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
            partial = Path(tmp) / output.name
            cmd = [compiler, *_FLAGS, f"-march={arch}", *openmp, str(SOURCE), "-o", str(partial), "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(partial, output)  # a concurrent build writes the same bytes; the last one wins
                return
            errors.append(f"$ {' '.join(cmd)}\n{result.stderr.strip()}")
    raise NativeKernelError("could not compile pofa's sparse int8 kernel:\n" + "\n".join(errors))


@functools.cache  # build and load once per process and architecture
def sparse_int8_kernel(arch: str = "native") -> SparseInt8Kernel:
    """The compiled kernel, built now if the cache does not hold it yet (a few seconds).

    ``arch`` is the compiler's ``-march``: ``"native"`` (this CPU's best path) or another architecture this CPU can
    run, e.g. ``"haswell"`` for the AVX2 path or ``"x86-64"`` for the portable one (the tests check all three).

    Raises:
        NativeKernelError: no C compiler, a failed compilation, or a library that does not load.
    """
    compiler = _compiler()
    if compiler is None:
        raise NativeKernelError(
            "pofa's sparse int8 runtime compiles a small C kernel on first use and found no C compiler (set $CC, or "
            "install gcc or clang, e.g. apt-get install gcc); the sparse fp32 runtime (pofa.runtime.sparsify_) "
            "needs none"
        )
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, version, " ".join(_FLAGS), arch, _cpu_flags()]).encode()
    ).hexdigest()[:16]
    path = _cache_dir() / key / "pofa_sparse_int8.so"
    if not path.is_file():
        _build(compiler, arch, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeKernelError(f"could not load the compiled kernel {path}: {exc}") from exc
    if lib.pofa_sparse_int8_abi() != _ABI:
        raise NativeKernelError(f"{path} is not the kernel this pofa expects (ABI); delete it to rebuild")
    lib.pofa_sparse_int8_isa.restype = ctypes.c_char_p
    linear = lib.pofa_sparse_int8_linear
    linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(LinearParams), ctypes.c_void_p,
                       ctypes.c_void_p]
    linear.restype = ctypes.c_int
    return SparseInt8Kernel(linear, lib.pofa_sparse_int8_isa().decode(), lib.pofa_sparse_int8_token_block(), path,
                            arch)
