"""Network namespaces as hosts: each gets a veth into one bridge, its own address, loopback,
and no route anywhere else. Everything made here is removed by `Hosts.close()`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

SUBNET = "10.77.{net}.{host}"


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def namespaces_supported() -> str | None:
    """None when hosts can be made here, else the reason why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "the ip command (iproute2) is missing"
    probe = f"ssprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"ip netns add failed: {e.stderr.strip()}"
    _run("ip", "netns", "del", probe)
    return None


@dataclass
class Host:
    name: str  # short name, also the Ray resource that pins actors here
    netns: str
    ip: str
    veth: str  # the bridge-side end, in the test's namespace
    processes: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, cmd: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *cmd], env=full_env,
                                stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes.append(proc)
        return proc

    def run(self, cmd: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *cmd], capture_output=True,
                              text=True, timeout=timeout, **kwargs)

    def cut_off(self) -> None:
        _run("ip", "link", "set", self.veth, "down")

    def reconnect(self) -> None:
        _run("ip", "link", "set", self.veth, "up")

    def kill_all(self) -> None:
        """Every process in this namespace, whoever started it (Ray daemons detach)."""
        pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                              text=True).stdout.split()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(int(pid), sig)
                except (ProcessLookupError, ValueError):
                    pass
            if sig == signal.SIGTERM:
                deadline = time.time() + 5
                while time.time() < deadline and any(_alive(int(p)) for p in pids):
                    time.sleep(0.2)
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Hosts:
    def __init__(self, names: list[str]):
        tag = f"ss{os.getpid() % 100000}"
        self.bridge = f"{tag}br"
        self.net = os.getpid() % 200 + 20
        self.hosts: dict[str, Host] = {}
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", SUBNET.format(net=self.net, host=1) + "/24", "dev",
                 self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for i, name in enumerate(names):
                self._add(name, f"{tag}{name}", SUBNET.format(net=self.net, host=10 + i))
        except Exception:
            self.close()
            raise

    def _add(self, name: str, netns: str, ip: str) -> None:
        veth = f"{netns}v"[:15]
        _run("ip", "netns", "add", netns)
        host = Host(name, netns, ip, veth)
        self.hosts[name] = host
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "link", "set", veth, "master", self.bridge)
        _run("ip", "link", "set", veth, "up")
        for cmd in (["ip", "addr", "add", f"{ip}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"]):
            _run("ip", "netns", "exec", netns, *cmd)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        for host in self.hosts.values():
            host.kill_all()
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        self.hosts.clear()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
