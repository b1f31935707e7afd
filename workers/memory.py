"""How much host memory this process may still use, container limits included.

A KV cache on CPU is sized from free memory. /proc/meminfo's MemAvailable describes the whole
host, so inside a container (a Kubernetes pod with an 8 GiB limit on a 512 GiB node) it
overstates what this process may take, and the kernel OOM-kills the shard. The memory limit of
this process's cgroup and of every ancestor cgroup applies as well; the smallest headroom wins.

Usage is counted as the kubelet counts a pod's working set (usage minus inactive file cache):
the kernel reclaims that cache before it OOM-kills, so it is memory we may still use.

Only /proc/meminfo is required. A cgroup file that is missing, empty or garbled is ignored, since
a wrong guess at a limit would refuse to start a shard that fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value
# (9223372036854771712, its exact value depends on the page size); no real limit is this large.
_UNLIMITED = 2 ** 60


@dataclass(frozen=True)
class MemoryReport:
    """Host memory this process may still allocate, and which bound decided it."""

    available_bytes: int  # the smaller of MemAvailable and the cgroup headroom, never negative
    meminfo_available_bytes: int  # /proc/meminfo MemAvailable
    cgroup_limit_bytes: int | None  # the limit of the cgroup with the least headroom; None: none
    cgroup_usage_bytes: int | None  # that cgroup's usage, less its inactive file cache
    source: str  # the bound that decided available_bytes: "MemAvailable" or the cgroup

    def describe(self) -> str:
        """One line for logs and for errors that say a model does not fit."""
        details = [self.source]
        if self.source != "MemAvailable":
            details.append(f"MemAvailable {human_bytes(self.meminfo_available_bytes)}")
        elif self.cgroup_limit_bytes is not None and self.cgroup_usage_bytes is not None:
            details.append(f"cgroup limit {human_bytes(self.cgroup_limit_bytes)}, "
                           f"used {human_bytes(self.cgroup_usage_bytes)}")
        return f"{human_bytes(self.available_bytes)} of host memory available ({'; '.join(details)})"


def host_memory(proc_root: str | Path = "/proc",
                cgroup_root: str | Path = "/sys/fs/cgroup") -> MemoryReport:
    """What this process may still allocate: MemAvailable, capped by its cgroup limits.

    The roots are parameters so tests can point them at fake trees.
    """
    proc_root, cgroup_root = Path(proc_root), Path(cgroup_root)
    meminfo = _meminfo_available(proc_root / "meminfo")
    levels = [level
              for hierarchy, mount, path in _memory_cgroups(proc_root / "self" / "cgroup",
                                                            cgroup_root)
              for level in _limited_levels(hierarchy, mount, path)]
    if not levels:
        return MemoryReport(meminfo, meminfo, None, None, "MemAvailable")
    tightest = min(levels, key=lambda level: level.limit - level.usage)
    headroom = max(0, tightest.limit - tightest.usage)
    source = tightest.describe() if headroom < meminfo else "MemAvailable"
    return MemoryReport(min(meminfo, headroom), meminfo, tightest.limit, tightest.usage, source)


@dataclass(frozen=True)
class _Hierarchy:
    """Where one cgroup version keeps its memory accounting, and how it names the files."""

    version: str
    limit_file: str
    usage_file: str
    inactive_keys: tuple[str, ...]  # memory.stat keys for inactive file cache, preferred first


_V2 = _Hierarchy("v2", "memory.max", "memory.current", ("inactive_file",))
# v1's total_inactive_file includes child cgroups, as its usage does; old kernels lack it.
_V1 = _Hierarchy("v1", "memory.limit_in_bytes", "memory.usage_in_bytes",
                 ("total_inactive_file", "inactive_file"))


@dataclass(frozen=True)
class _Level:
    """One cgroup directory that has a memory limit."""

    hierarchy: _Hierarchy
    path: str  # as /proc/self/cgroup would name it, e.g. "/kubepods/pod123"
    limit: int
    usage: int  # less inactive file cache

    def describe(self) -> str:
        return (f"cgroup {self.hierarchy.version} {self.path} "
                f"(limit {human_bytes(self.limit)}, used {human_bytes(self.usage)})")


def _meminfo_available(path: Path) -> int:
    for line in (_read(path) or "").splitlines():
        fields = line.split()
        if fields[:1] == ["MemAvailable:"] and len(fields) >= 2 and fields[1].isdecimal():
            return int(fields[1]) * 1024  # /proc/meminfo counts in kB
    raise RuntimeError(f"cannot read MemAvailable from {path}: host memory can only be sized "
                       "on Linux 3.14 or later with /proc mounted")


def _memory_cgroups(cgroup_file: Path, cgroup_root: Path) -> list[tuple[_Hierarchy, Path, str]]:
    """(hierarchy, its mount directory, this process's path in it) for each memory hierarchy.

    A hybrid host lists both a v1 memory line and a v2 "0::" line; both are returned, and the
    v2 one finds no memory files unless the memory controller really is on v2.
    """
    found = []
    for line in (_read(cgroup_file) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy_id, controllers, path = fields
        if hierarchy_id == "0" and controllers == "":
            found.append((_V2, cgroup_root, path))
        elif "memory" in controllers.split(","):
            found.append((_V1, cgroup_root / "memory", path))
    return found


def _limited_levels(hierarchy: _Hierarchy, mount: Path, path: str) -> list[_Level]:
    """The cgroup at `path` and each ancestor up to the mount, those with a readable limit."""
    parts = [part for part in path.strip().split("/") if part]
    directory = mount.joinpath(*parts)
    # A path that is not under this mount (another cgroup namespace, "/.." escapes) means the
    # mount shows our own cgroup at its root, as a container with a cgroup namespace does.
    if ".." in parts or not directory.is_dir():
        directory = mount
    levels = []
    while True:
        level = _read_level(hierarchy, mount, directory)
        if level is not None:
            levels.append(level)
        if directory == mount:
            return levels
        directory = directory.parent


def _read_level(hierarchy: _Hierarchy, mount: Path, directory: Path) -> _Level | None:
    limit = _read_int(directory / hierarchy.limit_file)  # v2's "max" reads as None
    if limit is None or limit >= _UNLIMITED:
        return None
    usage = _read_int(directory / hierarchy.usage_file)
    if usage is None:
        return None
    inactive = _stat_value(directory / "memory.stat", hierarchy.inactive_keys) or 0
    path = "/" + "/".join(directory.relative_to(mount).parts)
    return _Level(hierarchy, path, limit, max(0, usage - inactive))


def _stat_value(path: Path, keys: tuple[str, ...]) -> int | None:
    stats = {}
    for line in (_read(path) or "").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdecimal():
            stats[fields[0]] = int(fields[1])
    return next((stats[key] for key in keys if key in stats), None)


def _read_int(path: Path) -> int | None:
    text = (_read(path) or "").strip()
    return int(text) if text.isdecimal() else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def human_bytes(n: float) -> str:
    """1536 -> "1.50 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
