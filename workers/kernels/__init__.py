"""Native CPU kernels, compiled on first use with the system C compiler.

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

_SOURCE = Path(__file__).with_name("paged_attention.c")
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


def _compile(compiler: str, flags: list[str], target: Path) -> str | None:
    """Build the library at target; returns the compiler's complaint on failure."""
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(tmp), "-lm"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return result.stderr[-2000:]
    tmp.rename(target)
    return None


@lru_cache(maxsize=1)
def paged_decode_library() -> ctypes.CDLL | None:
    if os.environ.get("SHARDSERVE_ATTENTION") == "torch":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: decode attention uses the slower torch path")
        return None
    import torch  # noqa: F401 - loaded first, so that its OpenMP runtime is the one found

    flags = _FLAGS + _torch_openmp_flags()
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(flags).encode() + _cpu_model().encode())
    from ..loader import cache_dir

    target = cache_dir() / "kernels" / f"paged_attention-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                error = _compile(compiler, flags, target)
                if error and flags != _FLAGS:  # no OpenMP support: its own threads then
                    error = _compile(compiler, _FLAGS, target)
                if error:
                    log.warning("compiling the paged attention kernel failed; using the torch "
                                "path:\n%s", error)
                    return None
    lib = ctypes.CDLL(str(target))
    fn = lib.paged_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64,
                   ctypes.c_float, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib
