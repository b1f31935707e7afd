"""Native CPU kernels, compiled on first use with the system C compiler.

- paged_attention.c: decode attention over the paged KV cache;
- gemm.c: float32 x float32 or int8 weights, dense or 2:4 sparse, packed in panels;
- gemm_int8.c: int8 x int8 (W8A8) with activations quantized per row, VNNI where the CPU has it;
- fused.c: a decoder layer's element-wise steps (RMSNorm with the residual add, SiLU-and-mul,
  rotary with the cache write), built with -ffp-contract=off so they round as torch does;
- decode_layers.c: a stage's decoder layers for a decode-only step in one call, from the
  kernels above compiled in (workers/layers/decode_layers.py);
- vector_math.h: the vector types and exp they share.

The library is built with -march=native for the machine it runs on and cached under
<cache>/kernels/<digest>, the digest covering the source, the flags and the CPU model, so a
cache shared between different machines never serves a wrong binary. Where torch runs on
libgomp, the kernel is built with OpenMP and runs on torch's own worker threads. Without a
compiler the callers fall back to their torch implementations (and say so once in the log).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-fno-math-errno",
          "-fno-trapping-math"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("model name", "flags"))), "")
    except OSError:
        return platform.processor()


def _torch_openmp_flags() -> list[str]:
    """-fopenmp when torch runs on libgomp: the kernel then links to the libgomp.so.1 already
    loaded in this process and shares torch's worker threads. Otherwise (another OpenMP, or
    none) the kernel starts its own threads."""
    try:
        with open("/proc/self/maps") as f:
            loaded = any(line.rstrip().endswith("/libgomp.so.1") for line in f)
    except OSError:
        return []
    return ["-fopenmp"] if loaded else []


def _compile(compiler: str, flags: list[str], source: Path, target: Path) -> str | None:
    """Build the library at target; returns the compiler's complaint on failure."""
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run([compiler, *flags, str(source), "-o", str(tmp), "-lm"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return result.stderr[-2000:]
    tmp.rename(target)
    return None


@lru_cache(maxsize=None)
def _library(name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """workers/kernels/<name>.c built (once per source, flags and CPU) and loaded, or None."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the torch paths run instead of the C kernels")
        return None
    import torch  # noqa: F401 - loaded first, so that its OpenMP runtime is the one found

    source_path = _HERE / f"{name}.c"
    base_flags = _FLAGS + list(extra_flags)
    flags = base_flags + _torch_openmp_flags()
    # The digest covers every source here: headers, and the kernels decode_layers.c includes.
    source = source_path.read_bytes() + b"".join(
        other.read_bytes() for other in sorted([*_HERE.glob("*.h"), *_HERE.glob("*.c")]))
    digest = hashlib.sha256(source + " ".join(flags).encode() + _cpu_model().encode())
    from ..loader import cache_dir

    target = cache_dir() / "kernels" / f"{name}-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                error = _compile(compiler, flags, source_path, target)
                if error and flags != base_flags:  # no OpenMP support: its own threads then
                    error = _compile(compiler, base_flags, source_path, target)
                if error:
                    log.warning("compiling %s.c failed; using the torch path:\n%s", name, error)
                    return None
    return ctypes.CDLL(str(target))


i64, ptr = ctypes.c_int64, ctypes.c_void_p


def paged_decode_library() -> ctypes.CDLL | None:
    if os.environ.get("SHARDSERVE_ATTENTION") == "torch":
        return None
    lib = _library("paged_attention")
    if lib is not None and not lib.paged_decode_attention.argtypes:
        fn = lib.paged_decode_attention
        fn.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64,
                       i64, i64, i64, ctypes.c_float, i64, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib


def fused_library() -> ctypes.CDLL | None:
    """SHARDSERVE_FUSED=torch keeps the torch reference code (for comparisons)."""
    if os.environ.get("SHARDSERVE_FUSED") == "torch":
        return None
    lib = _library("fused", ("-ffp-contract=off",))
    if lib is not None and not lib.rotary_and_cache_f32.argtypes:
        lib.add_rms_norm_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float]
        lib.add_rms_norm_f32.restype = None
        lib.silu_and_mul_f32.argtypes = [ptr, ptr, i64, i64]
        lib.silu_and_mul_f32.restype = None
        lib.rotary_and_cache_f32.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr,
                                             ptr, ptr, ptr, i64, ctypes.c_int]
        lib.rotary_and_cache_f32.restype = ctypes.c_int
    return lib


def gemm_int8_library() -> ctypes.CDLL | None:
    lib = _library("gemm_int8")
    if lib is not None and not lib.linear_w8a8.argtypes:
        lib.linear_w8a8.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr,
                                    i64, ctypes.c_int]
        lib.linear_w8a8.restype = ctypes.c_int
        lib.gemm_int8_panel_width.restype = i64
    return lib


def gemm_library() -> ctypes.CDLL | None:
    lib = _library("gemm")
    if lib is not None and not lib.linear_panels.argtypes:
        lib.linear_panels.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int, ptr, i64, i64,
                                      ptr, ptr, i64, ctypes.c_int]
        lib.linear_panels.restype = None
        lib.gemm_panel_width.restype = i64
    return lib


def decode_layers_library() -> ctypes.CDLL | None:
    lib = _library("decode_layers")
    if lib is not None and not lib.decode_layers_f32.argtypes:
        lib.decode_layers_f32.argtypes = [ptr, i64, ptr, ctypes.c_int]
        lib.decode_layers_f32.restype = ctypes.c_int
        lib.decode_layers_threaded.restype = ctypes.c_int
    return lib
