"""The `cpu` hash-grid backend: a C++/OpenMP kernel built on first use, called through ctypes.

The kernel (csrc/hashgrid_cpu.cpp) includes no torch headers and exposes a small C ABI, so
the cold build is a ~1 s compile of one file instead of the minute a torch extension needs.
It is built with `torch.utils.cpp_extension.load` (ninja, the system C++ compiler) into
`$TORCH_EXTENSIONS_DIR/hashgrid_cpu_<hash>` (torch's default root when unset), keyed by a
hash of the source and flags, and reused from there.

Semantics are the reference's (`hash_encode_torch`); what differs:
- Forward and backward run in the kernel, parallel over (point block, level) and over levels
  (one thread owns a level's table while scattering into it: no atomics with <= L threads).
- Gradients w.r.t. the table and, only when x requires grad, w.r.t. x (clamped coordinates get
  zero gradient outside [0, 1], boundaries included, as torch.clamp does).
- The table gradient is a dense tensor like the table (the optimizer expects that); its
  zero-fill (64 MB at L=16, T=19, F=2) is the fixed cost of a backward pass.
- Tables may be float32, float64, float16 or bfloat16: half tables are read as they are and
  interpolated in float32; their gradient is accumulated in float32 and returned in the
  table's dtype. Positions may be float32 or float64 (others are computed in float32); the
  output has the positions' dtype.
- Double backward (create_graph=True, e.g. a loss on normals taken by autograd w.r.t. x) is
  supported by recomputing that backward with the reference, at the reference's speed.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from kernels.hashgrid.backends import BackendStatus, BackendUnavailableError
from kernels.hashgrid.config import HashGridConfig
from kernels.hashgrid.reference import hash_encode_torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "hashgrid_cpu.cpp"
"""The kernel's C++ source."""
ABI_VERSION = 1
"""Must equal hg_abi_version() in the source."""
EXPECTED_BUILD_SECONDS = 10
"""Rough cold-build time, for the one log line printed before building."""

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def _cflags() -> list[str]:
    # -ffp-contract=off keeps x*R - floor(x*R) rounded as the reference rounds it (no FMA).
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    if sys.platform != "darwin":  # Apple clang has no -fopenmp: build serial there
        flags.append("-fopenmp")
    return flags


def _ldflags() -> list[str]:
    return ["-fopenmp"] if sys.platform != "darwin" else []


def extension_name() -> str:
    """Name of the built library: changes with the source and the flags."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_cflags() + _ldflags()).encode()).hexdigest()[:10]
    return f"hashgrid_cpu_{digest}"


def default_build_root() -> str:
    """torch's default extensions root, as ``cpp_extension.get_default_build_root`` computes it: importing
    cpp_extension (setuptools) costs 0.15 s of every run's start-up once the kernel is built."""
    import torch._appdirs

    return os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions"))


def build_directory() -> Path:
    """Where the kernel is built and cached: $TORCH_EXTENSIONS_DIR (or torch's default root)/<name>."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or default_build_root()
    return Path(root) / extension_name()


def _library_path() -> Path:
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return build_directory() / (extension_name() + suffix)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _ninja_bin_dir() -> str | None:
    """The pip `ninja` package's binary folder (on PATH or not), else a ninja on PATH."""
    try:
        import ninja  # the pip package, only to find its binary

        bin_dir = getattr(ninja, "BIN_DIR", None)
        if bin_dir and os.path.exists(os.path.join(bin_dir, "ninja")):
            return bin_dir
    except ImportError:
        pass
    found = shutil.which("ninja")
    return os.path.dirname(found) if found else None


def probe() -> BackendStatus:
    """Cheap: never compiles. Available when built, or when a compiler and ninja can build it."""
    if _lib is not None:
        return BackendStatus(True, f"C++/OpenMP kernel ({_library_path()})", ("cpu",))
    if _load_error is not None:
        return BackendStatus(False, _load_error, ("cpu",))
    if _library_path().exists():
        return BackendStatus(True, f"C++/OpenMP kernel (built: {build_directory()})", ("cpu",))
    if _compiler() is None:
        return BackendStatus(False, f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH to build the kernel")
    if _ninja_bin_dir() is None:
        return BackendStatus(False, "ninja is not installed (pip install ninja) to build the kernel")
    return BackendStatus(True, "C++/OpenMP kernel (built on first use)", ("cpu",))


def _compile() -> None:
    from torch.utils.cpp_extension import load

    build_dir = build_directory()
    logger.info("building hash-grid CPU kernel (first use, ~%d s) in %s", EXPECTED_BUILD_SECONDS, build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    ninja_dir = _ninja_bin_dir()
    # cpp_extension runs `ninja` from PATH; the pip package's binary may not be on it (a venv
    # used without activating it).
    if ninja_dir and ninja_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja_dir + os.pathsep + os.environ.get("PATH", "")
    start = time.perf_counter()
    load(
        name=extension_name(),
        sources=[str(SOURCE)],
        extra_cflags=_cflags(),
        extra_ldflags=_ldflags(),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=logger.isEnabledFor(logging.DEBUG),
    )
    logger.debug("hash-grid CPU kernel built in %.1f s: %s", time.perf_counter() - start, _library_path())


def _build() -> ctypes.CDLL:
    """The kernel's library, built first when missing (its name changes with the source and the flags)."""
    library = _library_path()
    try:
        lib = ctypes.CDLL(str(library))
    except OSError:  # not built yet, or another process is linking it: build (cpp_extension waits on its lock)
        _compile()
        lib = ctypes.CDLL(str(library))
    if lib.hg_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{library} has ABI {lib.hg_abi_version()}, expected {ABI_VERSION}; delete it to rebuild")
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hg_forward.argtypes = [i32, i32, ptr, i64, ptr, i32, i32, i32, ptr, ptr, ptr, i32]
    lib.hg_forward.restype = i32
    lib.hg_backward.argtypes = [i32, i32, ptr, i64, ptr, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, i32]
    lib.hg_backward.restype = i32
    return lib


def _library() -> ctypes.CDLL:
    global _lib, _load_error
    with _lock:
        if _lib is None:
            if _load_error is not None:
                raise BackendUnavailableError(f"hash-grid backend 'cpu' is unavailable: {_load_error}")
            try:
                _lib = _build()
            except (RuntimeError, OSError, ImportError, AttributeError, subprocess.SubprocessError) as exc:
                # cpp_extension reports a failed build as RuntimeError with the log, a compiler
                # that cannot even report its version as CalledProcessError.
                tail = str(exc).strip().splitlines()[-12:]
                _load_error = f"building the C++ kernel in {build_directory()} failed: " + "\n".join(tail)
                raise BackendUnavailableError(f"hash-grid backend 'cpu' is unavailable: {_load_error}") from exc
        return _lib


def load():
    """Builds (first use) and loads the kernel; returns the encode function."""
    _library()
    return hash_encode_cpu


def _level_arrays(config: HashGridConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return _level_arrays_cached(config.resolutions, config.dense_levels)


@functools.lru_cache(maxsize=32)
def _level_arrays_cached(resolutions: tuple[int, ...], dense: tuple[bool, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(resolutions, dtype=torch.int64), torch.tensor(dense, dtype=torch.uint8)


MIN_POINT_LEVELS_PER_THREAD = 8192
"""Below this much work per thread the kernel runs on fewer threads (waking idle ones costs more)."""


def _threads(n: int, config: HashGridConfig) -> int:
    return max(1, min(torch.get_num_threads(), n * config.n_levels // MIN_POINT_LEVELS_PER_THREAD))


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"hash-grid CPU kernel {what} rejected its arguments (code {code})")


def _forward(x: torch.Tensor, table: torch.Tensor, config: HashGridConfig) -> torch.Tensor:
    res, dense = _level_arrays(config)
    out = torch.empty(x.shape[0], config.output_dim, dtype=x.dtype)
    code = _library().hg_forward(
        _DTYPE_CODES[x.dtype], _DTYPE_CODES[table.dtype], x.data_ptr(), x.shape[0], table.data_ptr(),
        config.n_levels, config.log2_table_size, config.n_features, res.data_ptr(), dense.data_ptr(),
        out.data_ptr(), _threads(x.shape[0], config),
    )  # fmt: skip
    _check(code, "forward")
    return out


def _backward(
    x: torch.Tensor, table: torch.Tensor, config: HashGridConfig, grad_out: torch.Tensor, need_table: bool, need_x: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    res, dense = _level_arrays(config)
    grad_out = grad_out.to(x.dtype).contiguous()
    acc_dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
    grad_table = torch.empty(table.shape, dtype=acc_dtype)  # zeroed by the kernel if need_table else None
    grad_x = torch.empty_like(x) if need_x else None
    code = _library().hg_backward(
        _DTYPE_CODES[x.dtype], _DTYPE_CODES[table.dtype], x.data_ptr(), x.shape[0], table.data_ptr(),
        config.n_levels, config.log2_table_size, config.n_features, res.data_ptr(), dense.data_ptr(),
        grad_out.data_ptr(), grad_table.data_ptr() if grad_table is not None else None,
        grad_x.data_ptr() if grad_x is not None else None, _threads(x.shape[0], config),
    )  # fmt: skip
    _check(code, "backward")
    if grad_table is not None and grad_table.dtype != table.dtype:
        grad_table = grad_table.to(table.dtype)
    return grad_table, grad_x


class _CpuHashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, config: HashGridConfig) -> torch.Tensor:
        ctx.config = config
        ctx.save_for_backward(x, table)
        return _forward(x, table, config)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, table = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            # create_graph=True: the gradient itself must be differentiable; recompute this
            # backward with the reference so autograd can differentiate it again.
            return _reference_backward(x, table, ctx.config, grad_out, need_x, need_table) + (None,)
        grad_table, grad_x = _backward(x, table, ctx.config, grad_out, need_table, need_x)
        return grad_x, grad_table, None


def _reference_backward(
    x: torch.Tensor, table: torch.Tensor, config: HashGridConfig, grad_out: torch.Tensor, need_x: bool, need_table: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    inputs = [t for t, need in ((x, need_x), (table, need_table)) if need]
    if not inputs:
        return None, None
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(hash_encode_torch(x, table, config), inputs, grad_out, create_graph=True))
    return (next(grads) if need_x else None), (next(grads) if need_table else None)


def hash_encode_cpu(x: torch.Tensor, table: torch.Tensor, config: HashGridConfig) -> torch.Tensor:
    """Encode points with the C++ kernel. x: (N, 3) on the CPU; table: (L, 2**T, F). Returns (N, L*F)."""
    if x.device.type != "cpu" or table.device.type != "cpu":
        raise ValueError(f"the 'cpu' hash-grid backend needs CPU tensors, got x on {x.device}, table on {table.device}")
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"hash-grid input must be (N, 3), got {tuple(x.shape)}")
    expected = (config.n_levels, config.table_size, config.n_features)
    if tuple(table.shape) != expected:
        raise ValueError(f"hash-grid table must be {expected} for this config, got {tuple(table.shape)}")
    if table.dtype not in _DTYPE_CODES:
        raise TypeError(f"hash-grid table dtype {table.dtype} is not supported by the 'cpu' backend")
    if not x.is_floating_point():
        raise TypeError(f"hash-grid input must be floating point, got {x.dtype}")
    if x.dtype not in (torch.float32, torch.float64):
        return _CpuHashEncode.apply(x.float().contiguous(), table.contiguous(), config).to(x.dtype)
    return _CpuHashEncode.apply(x.contiguous(), table.contiguous(), config)
