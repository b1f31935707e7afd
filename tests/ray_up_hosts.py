"""Hosts that `ray up` can reach: network namespaces (tests/netns.py), each running its own sshd,
and a cluster YAML for Ray's local provider (`provider: {type: local, head_ip, worker_ips}`).

Each sshd runs in a private mount namespace that makes the namespace look like a machine of its
own without changing anything outside it:
- /etc/passwd is a copy whose root home is a temp dir. `ray up` copies the cluster config and
  the ssh key to `~/ray_bootstrap_*` on the head (the remote shell expands `~` from $HOME), and
  the head's autoscaler then runs `ssh -i ~/ray_bootstrap_key.pem` (ssh expands `~` from the
  passwd entry, not $HOME); both must agree, and neither may land in the real /root.
- /run is a temp dir (sshd needs its privilege separation dir /run/sshd), and the login
  records (/var/log/wtmp, lastlog, btmp) are empty temp files: logins leave no trace here.
- sshd's `SetEnv` gives every session this host's own RAY_TMPDIR (hosts share one filesystem,
  real machines do not), the cluster's Ray auth token, and RAY_USAGE_STATS_ENABLED=0.

Never `ray stop` / `ray down` here: the PID namespace is shared, and `ray stop` kills every Ray
process on the machine. `SshHosts.close()` ends everything by namespace (`ip netns pids`).
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from netns import Hosts, namespaces_supported

SSHD = "/usr/sbin/sshd"
VENV_BIN = os.path.dirname(sys.executable)  # the venv's bin: `ray` and `python` live here
LOGIN_RECORDS = ("/var/log/wtmp", "/var/log/btmp", "/var/log/lastlog")


def ssh_hosts_unsupported() -> str | None:
    """None when sshd-backed hosts can be made here, else the reason why not."""
    reason = namespaces_supported()
    if reason:
        return reason
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is missing (Debian: apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen", "rsync", "unshare", "mount"):
        if not shutil.which(tool):
            return f"{tool} is missing (Debian: apt-get install openssh-client rsync)"
    return None


class SshHosts:
    """Network namespaces `names`; those in `ssh_names` run sshd (root login with a throwaway
    key). Run `ray up` etc. from a namespace without sshd (the "local machine")."""

    def __init__(self, names: list[str], ssh_names: list[str]):
        # Short: Ray's unix socket paths under RAY_TMPDIR must stay within 107 bytes.
        self.root = Path(f"/tmp/ssru{os.getpid()}")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(mode=0o700)
        self.key = self.root / "id"
        self.token = os.urandom(32).hex()
        self.cluster_name = f"ssru{os.getpid()}"
        self.hosts: Hosts | None = None
        try:
            self._keys()
            self.hosts = Hosts(names)
            for name in names:
                (self.tmpdir(name) / "home").mkdir(parents=True)
                (self.tmpdir(name) / "home" / ".bashrc").write_text("")
            for name in ssh_names:
                self._start_sshd(name)
            for name in ssh_names:
                self._wait_for_sshd(name, from_host=next(n for n in names
                                                         if n not in ssh_names))
        except Exception:
            self.close()
            raise

    def __getitem__(self, name: str):
        return self.hosts[name]

    def tmpdir(self, name: str) -> Path:
        return self.root / name

    def _keys(self) -> None:
        for path in (self.key, self.root / "hostkey"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f",
                            str(path)], check=True, capture_output=True)
        (self.root / "id.pub").rename(self.root / "authorized_keys")

    def _start_sshd(self, name: str) -> None:
        host, d = self.hosts[name], self.tmpdir(name)
        passwd = d / "passwd"
        passwd.write_text("".join(
            line.replace(":0:0:root:/root:", f":0:0:root:{d / 'home'}:")
            for line in open("/etc/passwd")))
        run = d / "run"
        (run / "sshd").mkdir(parents=True, mode=0o755)
        (run / "shm").symlink_to("/dev/shm")
        config = d / "sshd_config"
        config.write_text(f"""\
ListenAddress {host.ip}:22
HostKey {self.root / 'hostkey'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {self.root / 'authorized_keys'}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
PrintMotd no
PrintLastLog no
UseDNS no
SetEnv RAY_TMPDIR={d} RAY_AUTH_MODE=token RAY_AUTH_TOKEN={self.token} \
RAY_USAGE_STATS_ENABLED=0 GLOO_SOCKET_IFNAME=eth0
""")
        mounts = [f"mount --bind {passwd} /etc/passwd", f"mount --bind {run} /run"]
        for record in LOGIN_RECORDS:  # sshd appends to these; give it empty files of our own
            if os.path.isfile(record):
                (d / os.path.basename(record)).write_bytes(b"")
                mounts.append(f"mount --bind {d / os.path.basename(record)} {record}")
        script = " && ".join(mounts + [f"exec {SSHD} -D -e -f {config}"])
        host.popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                   str(d / "sshd.log"))

    def _wait_for_sshd(self, name: str, from_host: str, timeout: float = 15) -> None:
        deadline = time.time() + timeout
        while True:
            result = self.ssh(from_host, name, "echo ok $HOME")
            if result.returncode == 0 and result.stdout.split() == [
                    "ok", str(self.tmpdir(name) / "home")]:
                return
            proc = self.hosts[name].processes[-1]
            if proc.poll() is not None or time.time() > deadline:
                log = (self.tmpdir(name) / "sshd.log").read_text()
                raise SshdUnavailable(f"sshd on {name} did not accept a login: "
                                      f"{result.stderr.strip()[-500:]} / sshd log: {log[-800:]}")
            time.sleep(0.3)

    def ssh(self, from_host: str, to_host: str, command: str,
            timeout: float = 30) -> subprocess.CompletedProcess:
        return self.hosts[from_host].run(
            ["ssh", "-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o",
             "ConnectTimeout=5", f"root@{self.hosts[to_host].ip}", command], timeout=timeout)

    def local_env(self, name: str) -> dict:
        """Environment for Ray's cluster launcher run in namespace `name`."""
        d = self.tmpdir(name)
        return {**os.environ, "RAY_TMPDIR": str(d), "TMPDIR": str(d), "HOME": str(d / "home"),
                "RAY_UP_enable_autoscaler_v2": "0", "RAY_USAGE_STATS_ENABLED": "0"}

    def close(self) -> None:
        """Every process in the namespaces (sshd, Ray, ssh masters), the namespaces, the temp
        files and the ssh control sockets of this cluster."""
        if self.hosts is not None:
            self.hosts.close()
            self.hosts = None
        control = Path(ray_ssh_control_path(self.cluster_name))
        shutil.rmtree(control, ignore_errors=True)
        try:
            control.parent.rmdir()  # only if no other cluster's sockets are in it
        except OSError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class SshdUnavailable(RuntimeError):
    pass


def ray_ssh_control_path(cluster_name: str) -> str:
    """Where Ray's SSHCommandRunner keeps ssh ControlMaster sockets for a cluster."""
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    cluster = hashlib.sha256(cluster_name.encode()).hexdigest()[:10]
    return f"/tmp/ray_ssh_{user}/{cluster}"


def cluster_config(hosts: SshHosts, head: str, workers: list[str], head_cpus: int = 1,
                   worker_cpus: int = 1, object_store: int = 150 * 1024 ** 2) -> dict:
    """A local-provider cluster: no `ray stop` anywhere, no setup commands, no file mounts."""
    ray = shlex.quote(os.path.join(VENV_BIN, "ray"))
    common = f"--object-store-memory={object_store} --disable-usage-stats"
    head_ip = hosts[head].ip
    return {
        "cluster_name": hosts.cluster_name,
        "provider": {"type": "local", "head_ip": head_ip,
                     "worker_ips": [hosts[w].ip for w in workers]},
        "auth": {"ssh_user": "root", "ssh_private_key": str(hosts.key)},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "file_mounts": {},
        "head_start_ray_commands": [
            f"{ray} start --head --port=6379 --node-ip-address={head_ip} "
            f"--num-cpus={head_cpus} --include-dashboard=false {common} "
            "--autoscaling-config=~/ray_bootstrap_config.yaml"],
        # The local provider passes a worker only $RAY_HEAD_IP; its own address is the one
        # address of its namespace (without --node-ip-address Ray would pick 127.0.0.1).
        "worker_start_ray_commands": [
            f"{ray} start --address=$RAY_HEAD_IP:6379 "
            "--node-ip-address=$(hostname -I | cut -d' ' -f1) "
            f"--num-cpus={worker_cpus} --temp-dir=$RAY_TMPDIR/ray {common}"],
    }


def write_cluster_config(config: dict, path: Path) -> Path:
    """Write the YAML and check it as `ray up` would (offline), plus the provider keys that
    the schema does not check."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    validate_config(prepare_config(yaml.safe_load(path.read_text())))
    assert set(config["provider"]) == {"type", "head_ip", "worker_ips"}, config["provider"]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray stop" not in command, command
    return path
