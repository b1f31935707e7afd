"""Host memory for a CPU KV cache: MemAvailable, capped by the cgroup limits of a container."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from shardserve.workers.memory import MemoryReport, host_memory

GIB = 1024 ** 3
MIB = 1024 ** 2
MEMINFO_KB = 64 * 1024 * 1024  # a 64 GiB MemAvailable
MEMINFO = MEMINFO_KB * 1024
V1_UNLIMITED = "9223372036854771712"


def fake_tree(tmp_path, cgroup_lines: str | None, files: dict[str, str]):
    """A proc root with meminfo and self/cgroup, and a cgroup root holding `files`."""
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       {2 * MEMINFO_KB} kB\n"
                                  f"MemFree:        1000 kB\n"
                                  f"MemAvailable:   {MEMINFO_KB} kB\n")
    if cgroup_lines is not None:
        (proc / "self" / "cgroup").write_text(cgroup_lines)
    cgroup.mkdir()
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text)
    return proc, cgroup


def test_no_cgroup_file_is_meminfo(tmp_path):
    report = host_memory(*fake_tree(tmp_path, None, {}))
    assert report == MemoryReport(MEMINFO, MEMINFO, None, None, "MemAvailable")
    assert report.describe() == "64.00 GiB of host memory available (MemAvailable)"


def test_v2_pod_limit_below_meminfo(tmp_path):
    pod = "kubepods/pod123"
    report = host_memory(*fake_tree(tmp_path, "0::/kubepods/pod123\n", {
        f"{pod}/memory.max": f"{8 * GIB}\n",
        f"{pod}/memory.current": f"{2 * GIB}\n",
        f"{pod}/memory.stat": f"anon {GIB}\nfile {GIB}\ninactive_file {800 * MIB}\n",
    }))
    used = 2 * GIB - 800 * MIB
    assert report.available_bytes == 8 * GIB - used
    assert report.meminfo_available_bytes == MEMINFO
    assert (report.cgroup_limit_bytes, report.cgroup_usage_bytes) == (8 * GIB, used)
    assert report.source == "cgroup v2 /kubepods/pod123 (limit 8.00 GiB, used 1.22 GiB)"
    assert report.describe() == ("6.78 GiB of host memory available (cgroup v2 /kubepods/pod123 "
                                 "(limit 8.00 GiB, used 1.22 GiB); MemAvailable 64.00 GiB)")


def test_v2_limit_above_meminfo_reports_limit_but_meminfo_decides(tmp_path):
    report = host_memory(*fake_tree(tmp_path, "0::/big\n", {
        "big/memory.max": f"{100 * GIB}", "big/memory.current": f"{GIB}"}))
    assert report == MemoryReport(MEMINFO, MEMINFO, 100 * GIB, GIB, "MemAvailable")
    assert report.describe() == ("64.00 GiB of host memory available "
                                 "(MemAvailable; cgroup limit 100.00 GiB, used 1.00 GiB)")


def test_v2_max_is_unlimited(tmp_path):
    report = host_memory(*fake_tree(tmp_path, "0::/svc\n", {
        "svc/memory.max": "max\n", "svc/memory.current": f"{GIB}\n"}))
    assert report == MemoryReport(MEMINFO, MEMINFO, None, None, "MemAvailable")


def test_v2_parent_has_the_tighter_limit(tmp_path):
    report = host_memory(*fake_tree(tmp_path, "0::/kubepods/burstable/pod9/ctr\n", {
        "kubepods/memory.max": f"{32 * GIB}", "kubepods/memory.current": f"{10 * GIB}",
        "kubepods/burstable/pod9/memory.max": f"{4 * GIB}",
        "kubepods/burstable/pod9/memory.current": f"{3 * GIB}",
        "kubepods/burstable/pod9/ctr/memory.max": f"{6 * GIB}",
        "kubepods/burstable/pod9/ctr/memory.current": f"{GIB}",
        "kubepods/burstable/pod9/ctr/memory.stat": f"inactive_file {GIB}\n",
    }))
    assert report.available_bytes == GIB  # the pod's 4 - 3, not the container's 6 - 0
    assert (report.cgroup_limit_bytes, report.cgroup_usage_bytes) == (4 * GIB, 3 * GIB)
    assert report.source == "cgroup v2 /kubepods/burstable/pod9 (limit 4.00 GiB, used 3.00 GiB)"


def test_v2_namespace_root(tmp_path):
    report = host_memory(*fake_tree(tmp_path, "0::/\n", {
        "memory.max": f"{8 * GIB}", "memory.current": f"{3 * GIB}",
        "memory.stat": f"inactive_file {GIB}\nactive_file {GIB}\n"}))
    assert report.available_bytes == 6 * GIB
    assert report.source == "cgroup v2 / (limit 8.00 GiB, used 2.00 GiB)"


def test_v2_missing_path_falls_back_to_root(tmp_path):
    # Another namespace's path: system.slice here is some other cgroup, not our ancestor.
    report = host_memory(*fake_tree(tmp_path, "0::/system.slice/docker-abc.scope\n", {
        "memory.max": f"{2 * GIB}", "memory.current": f"{GIB // 2}",
        "system.slice/memory.max": f"{GIB}", "system.slice/memory.current": f"{GIB}"}))
    assert report.available_bytes == 2 * GIB - GIB // 2
    assert report.source == "cgroup v2 / (limit 2.00 GiB, used 512.00 MiB)"


def test_v1_limit(tmp_path):
    cg = "memory/docker/abc"
    report = host_memory(*fake_tree(tmp_path, "12:pids:/docker/abc\n"
                                              "9:memory:/docker/abc\n"
                                              "4:cpu,cpuacct:/docker/abc\n"
                                              "0::/docker/abc\n", {
        "memory/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/memory.usage_in_bytes": f"{40 * GIB}",
        f"{cg}/memory.limit_in_bytes": f"{8 * GIB}\n",
        f"{cg}/memory.usage_in_bytes": f"{5 * GIB}\n",
        f"{cg}/memory.stat": f"inactive_file {GIB}\ntotal_inactive_file {2 * GIB}\n",
    }))
    assert report.available_bytes == 5 * GIB  # 8 - (5 - 2): total_inactive_file wins
    assert (report.cgroup_limit_bytes, report.cgroup_usage_bytes) == (8 * GIB, 3 * GIB)
    assert report.source == "cgroup v1 /docker/abc (limit 8.00 GiB, used 3.00 GiB)"


def test_v1_inactive_file_when_no_total(tmp_path):
    report = host_memory(*fake_tree(tmp_path, "3:cpuset,memory:/job\n", {
        "memory/job/memory.limit_in_bytes": f"{8 * GIB}",
        "memory/job/memory.usage_in_bytes": f"{5 * GIB}",
        "memory/job/memory.stat": f"inactive_file {GIB}\n"}))
    assert report.available_bytes == 4 * GIB


def test_v1_missing_path_falls_back_to_memory_root(tmp_path):
    report = host_memory(*fake_tree(tmp_path, "9:memory:/docker/gone\n", {
        "memory/memory.limit_in_bytes": f"{3 * GIB}",
        "memory/memory.usage_in_bytes": f"{GIB}"}))
    assert report.available_bytes == 2 * GIB
    assert report.source == "cgroup v1 / (limit 3.00 GiB, used 1.00 GiB)"


def test_v1_huge_value_is_unlimited(tmp_path):
    report = host_memory(*fake_tree(tmp_path, "9:memory:/docker/abc\n", {
        "memory/docker/abc/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/docker/abc/memory.usage_in_bytes": f"{GIB}"}))
    assert report == MemoryReport(MEMINFO, MEMINFO, None, None, "MemAvailable")


def test_usage_above_limit_leaves_nothing(tmp_path):
    report = host_memory(*fake_tree(tmp_path, "0::/pod\n", {
        "pod/memory.max": f"{GIB}", "pod/memory.current": f"{3 * GIB}"}))
    assert report.available_bytes == 0
    assert (report.cgroup_limit_bytes, report.cgroup_usage_bytes) == (GIB, 3 * GIB)


@pytest.mark.parametrize("limit, usage, stat", [
    ("", f"{GIB}", ""),                    # empty limit
    ("lots", f"{GIB}", ""),                # garbage limit
    (f"{GIB}", "", ""),                    # empty usage
    (f"{GIB}", "-5", ""),                  # negative usage
    ("-1", f"{GIB}", ""),                  # negative limit
    (f"{GIB}", "\xb2", ""),                # a digit int() refuses
])
def test_garbage_cgroup_files_are_ignored(tmp_path, limit, usage, stat):
    report = host_memory(*fake_tree(tmp_path, "0::/pod\n", {
        "pod/memory.max": limit, "pod/memory.current": usage, "pod/memory.stat": stat}))
    assert report == MemoryReport(MEMINFO, MEMINFO, None, None, "MemAvailable")


def test_garbage_stat_and_cgroup_lines(tmp_path):
    proc, cgroup = fake_tree(tmp_path, "nonsense\n\n::\n7:memory\n0::/pod\n", {
        "pod/memory.max": f"{4 * GIB}", "pod/memory.current": f"{2 * GIB}",
        "pod/memory.stat": "inactive_file lots\ninactive_file\n\x00\x01\n"})
    report = host_memory(proc, cgroup)
    assert report.available_bytes == 2 * GIB  # raw usage: the stat gave nothing usable
    (proc / "self" / "cgroup").write_bytes(b"\xff\xfe0::/pod\n")
    assert host_memory(proc, cgroup).available_bytes == MEMINFO


@pytest.mark.parametrize("meminfo", [None, "", "MemTotal: 100 kB\n", "MemAvailable: lots kB\n"])
def test_unreadable_meminfo_raises(tmp_path, meminfo):
    proc, cgroup = fake_tree(tmp_path, None, {})
    if meminfo is None:
        (proc / "meminfo").unlink()
    else:
        (proc / "meminfo").write_text(meminfo)
    with pytest.raises(RuntimeError, match="cannot read MemAvailable from .*meminfo"):
        host_memory(proc, cgroup)


def test_this_machine():
    report = host_memory()
    assert 0 < report.available_bytes <= report.meminfo_available_bytes
    assert report.describe().endswith(")")


# --- the KV sizing decision a shard makes from these numbers ---------------------------------

def _limited_host(tmp_path: Path, limit: int, used: int):
    """host_memory reading a fake pod: MemAvailable 64 GiB, a cgroup v2 limit and usage."""
    proc, cgroup = fake_tree(tmp_path, "0::/pod\n", {
        "pod/memory.max": f"{limit}\n", "pod/memory.current": f"{used}\n"})
    return functools.partial(host_memory, proc, cgroup)


def test_kv_cache_is_sized_from_the_cgroup_headroom(tmp_path, tiny_model, monkeypatch):
    from shardserve import LLM
    from shardserve.workers import shard

    monkeypatch.setattr(shard, "host_memory", _limited_host(tmp_path, 2 * GIB, GIB + 1000))
    llm = LLM(str(tiny_model("llama-gqa")), dtype="float32", block_size=16,
              kv_memory_fraction=0.5, max_num_seqs=10 ** 6)
    per_block = llm.engine.executor.shard.kv_block_bytes(16)
    # Half of the pod's headroom (limit - usage), not of the host's 64 GiB MemAvailable.
    assert llm.engine.kv.num_blocks == int((GIB - 1000) * 0.5) // per_block


def test_a_kv_budget_past_the_cgroup_limit_fails_at_start_with_the_numbers(
        tmp_path, tiny_model, monkeypatch):
    from shardserve import LLM
    from shardserve.workers import shard

    monkeypatch.setattr(shard, "host_memory", _limited_host(tmp_path, 2 * GIB, GIB))
    with pytest.raises(ValueError) as err:
        LLM(str(tiny_model("llama-gqa")), dtype="float32", kv_cache_memory="4GiB")
    message = str(err.value)
    assert "kv_cache.kv_cache_memory asks for 4.00 GiB" in message
    assert "its weights take" in message
    assert "1.00 GiB of host memory available (cgroup v2 /pod (limit 2.00 GiB" in message
    with pytest.raises(ValueError, match=r"1000000 KV blocks of 16 tokens need .* lower "
                                         r"kv_cache.num_kv_blocks"):
        LLM(str(tiny_model("llama-gqa")), dtype="float32", num_kv_blocks=10 ** 6,
            max_num_seqs=10 ** 6)
