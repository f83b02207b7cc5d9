"""`ray up` of cluster.yaml, for real, on this machine: the rehearsal of docs/tuning.md.

Ray's local provider reaches the head "node" over SSH at 127.0.0.1: an sshd in PID, mount and
network namespaces of its own, so the node has its own processes (the file's `ray stop` stops
only the node's Ray), its own /tmp and home, and its own 127.0.0.1 (its Ray's ports meet no other
Ray on this machine).  Ray's ssh reaches it through a ProxyCommand that enters that network
namespace.  The cluster file is cluster.yaml with its provider, auth and node types swapped; its
file mounts, setup and start commands are the file's own.  A `simdiffrec tune` goes in through
`ray job submit` over `ray dashboard`'s tunnel, as on AWS.

Where this differs from AWS: the node's home starts with ~/venv seeing this environment's
packages, as a machine image would (on AWS the setup commands download Ray and torch), and with
the few wheels the setup's pip install fetches besides (the node has no network); the node's own
environment names a folder for SIMDIFFREC_STORAGE (the file's default is S3) and keeps Ray on
127.0.0.1.  Needs root, sshd, rsync, iproute2 and ray[default]; runs only on demand:

    pytest -m cluster tests/test_ray_up.py
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import ray  # noqa: F401  (puts the psutil that ships inside ray on the path)
import psutil
import yaml
from ray.util.state import list_actors

from .conftest import shared_file

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # this environment's `ray` command
CLOUD_KEYS = ("provider", "auth", "available_node_types", "head_node_type", "max_workers")
SBIN = "/usr/sbin:/sbin"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# Ray's ssh has no port or proxy setting: an `ssh` first on PATH adds a ProxyCommand that copies
# the connection to port 22 inside the node's network namespace (this relay, run there).
RELAY = """\
import os, socket, threading
s = socket.create_connection(("127.0.0.1", 22))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
"""


def which(tool: str) -> str | None:
    return shutil.which(tool, path=f"{os.environ.get('PATH', '')}:{SBIN}")


def missing_tool() -> str | None:
    """Why this machine cannot rehearse a cluster, or None."""
    if os.geteuid() != 0:
        return "needs root: the node runs in PID, mount and network namespaces of its own (unshare)"
    for tool in ("sshd", "ssh", "ssh-keygen", "rsync", "unshare", "nsenter", "mount", "ip", "ss"):
        if which(tool) is None:
            return f"{tool} is missing (Debian: apt-get install openssh-server rsync iproute2)"
    if importlib.util.find_spec("aiohttp") is None:
        return "the dashboard and the job API need ray[default]: pip install 'ray[default]==2.60.0'"
    return None


def rehearsal_config(cluster: dict, user: str, key: Path) -> dict:
    """CLUSTER for Ray's local provider: one head at 127.0.0.1, reached as USER with KEY.  Only
    where the nodes come from and how to reach them changes; file mounts and commands stay."""
    local = {k: v for k, v in cluster.items() if k not in CLOUD_KEYS}
    local["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    local["auth"] = {"ssh_user": user, "ssh_private_key": str(key)}
    return local


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Node:
    """The head node: HOME inside it is ROOTFS_HOME here; PROC holds its namespaces."""

    home: Path
    rootfs_home: Path
    key: Path
    proc: subprocess.Popen

    def here(self, path: str) -> Path:
        """Where a path under the node's home lies on this machine."""
        return self.rootfs_home / Path(path).relative_to(self.home)

    def run(self, *command: str) -> str:
        """COMMAND's output, run here but in the node's network namespace."""
        return subprocess.run([which("nsenter"), "--target", str(self.proc.pid), "--net", *command],
                              check=True, capture_output=True, text=True).stdout


def node_script(home: Path, home_here: Path, node_tmp: Path, binds: list[Path]) -> str:
    """The node's first process: its loopback and mounts, its machine image (~/venv), then sshd."""
    python = Path(sys.base_prefix) / "bin" / "python3"
    site = Path(sysconfig.get_paths()["purelib"])
    venv_site = f"{home}/venv/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    mounts = "\n".join(f"mount --bind {p} {home_here}/{p.relative_to(home)}" for p in binds)
    return textwrap.dedent(f"""\
        set -e
        {which("ip")} link set lo up
        {mounts}
        mount --rbind {home_here} {home}
        mount --bind {node_tmp} /tmp
        mount -t tmpfs tmpfs /run && mkdir /run/sshd
        {python} -m venv {home}/venv
        echo {site} > {venv_site}/machine-image.pth
        printf '#!{home}/venv/bin/python\\nimport sys\\nfrom ray.scripts.scripts import main\\nsys.exit(main())\\n' > {home}/venv/bin/ray
        chmod +x {home}/venv/bin/ray
        exec {which("sshd")} -D -e -f {home}/.sshd/sshd_config
        """)


def write_node_files(rootfs_home: Path, home: Path, user: str, key: Path) -> None:
    """The node's home as sshd and Ray's commands find it: sshd's config and keys (KEY is the
    user's, made here), and the login environment that stands in for AWS (module docstring)."""
    sshd_dir = rootfs_home / ".sshd"
    sshd_dir.mkdir(parents=True)
    for path in (sshd_dir / "host_key", key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    shutil.copy(f"{key}.pub", sshd_dir / "authorized_keys")
    (sshd_dir / "sshd_config").write_text(textwrap.dedent(f"""\
        ListenAddress 127.0.0.1
        HostKey {home}/.sshd/host_key
        AuthorizedKeysFile {home}/.sshd/authorized_keys
        AllowUsers {user}
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        AllowTcpForwarding local
        X11Forwarding no
        PrintMotd no
        PidFile none
        """))
    # The node has no network: what the setup's pip install fetches beyond ~/venv's packages
    # (pip itself, boto3, setuptools for the editable build) waits in a folder of its own.
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--dest", str(rootfs_home / "wheels"),
                    "pip", "boto3", "setuptools"], check=True)
    (rootfs_home / ".bashrc").touch()
    (rootfs_home / ".profile").write_text(textwrap.dedent("""\
        export SIMDIFFREC_STORAGE="$HOME/experiments"  # on AWS: the S3 prefix in cluster.yaml
        export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0      # one machine: Ray listens on 127.0.0.1 only
        export PIP_NO_INDEX=1 PIP_FIND_LINKS="$HOME/wheels"
        """))


def wait_until(ready, what: subprocess.Popen, name: str, timeout: float = 120) -> None:
    """Until READY() holds; a failure if WHAT (NAME) ends first or TIMEOUT passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert what.poll() is None, f"{name} ended (exit code {what.returncode})"
        assert time.monotonic() < deadline, f"{name} not ready within {timeout:.0f} s"
        time.sleep(0.5)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def node() -> Iterator[Node]:
    """An sshd at 127.0.0.1 in namespaces of its own, with a host key and a user key made here;
    stopped, with everything it started, whatever the test does."""
    if reason := missing_tool():
        pytest.skip(reason)
    user, home = getpass.getuser(), Path.home()
    tmp = Path(tempfile.mkdtemp(prefix="simdiffrec-rehearsal-"))
    proc = None
    try:
        rootfs_home, node_tmp, key, log = tmp / "home", tmp / "node-tmp", tmp / "id_ed25519", tmp / "node.log"
        for d in (node_tmp, tmp / "bin", tmp / "client-tmp"):
            d.mkdir()
        write_node_files(rootfs_home, home, user, key)
        # The Python this environment runs on stays visible when the home is replaced.
        binds = [p for p in {Path(sys.base_prefix), Path(sys.prefix)} if p.is_relative_to(home)]
        for p in binds:
            (rootfs_home / p.relative_to(home)).mkdir(parents=True)
        with log.open("w") as out:
            proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net", "bash", "-c",
                 node_script(home, rootfs_home, node_tmp, binds)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        (tmp / "bin" / "relay.py").write_text(RELAY)
        proxy = f"{which('nsenter')} --target {proc.pid} --net {sys.executable} {tmp / 'bin' / 'relay.py'}"
        ssh = tmp / "bin" / "ssh"
        ssh.write_text(f'#!/bin/sh\nexec {which("ssh")} -o "ProxyCommand={proxy}" "$@"\n')
        ssh.chmod(0o755)
        try:
            wait_until(lambda: "Server listening" in log.read_text(), proc, "the node's sshd")
        except AssertionError as err:
            raise AssertionError(f"{err}: {log.read_text()}") from None
        yield Node(home, rootfs_home, key, proc)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)  # unshare --kill-child: the namespaces go with it
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def ray_env(node: Node) -> dict[str, str]:
    """For the `ray` commands: the node-reaching ssh, and Ray's client state in the test's folder."""
    tmp = node.rootfs_home.parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{tmp / 'bin'}:{env.get('PATH', '')}", TMPDIR=str(tmp / "client-tmp"))
    return env


def run_ray(node: Node, *args: str, timeout: float = 600) -> str:
    """Run `ray ARGS` from the project root as a user does; its output, or a failure showing it."""
    done = subprocess.run([*RAY, *args], cwd=ROOT, env=ray_env(node), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    print(f"$ ray {' '.join(args)}\n{done.stdout}")  # shown by pytest -rP, and on a failure
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout[-6000:]}"
    return done.stdout


def listening(node: Node) -> set[tuple[str, str]]:
    """(process name, address) of every TCP socket listening in the node's network namespace."""
    found = set()
    for line in node.run("ss", "-Hltnp").splitlines():
        address = line.split()[3].rsplit(":", 1)[0].strip("[]")
        found |= {(name, address) for name in re.findall(r'\("([^"]+)"', line)}
    return found


def ray_processes(node: Node) -> list[str]:
    """Names of the Ray processes left in the node's namespaces."""
    names = []
    for p in psutil.Process(node.proc.pid).children(recursive=True):
        try:
            names.append(p.name())
        except psutil.Error:  # ended meanwhile
            pass
    return [n for n in names if n in ("gcs_server", "raylet") or n.startswith("ray::")]


def ssh_control_dir(cluster_name: str) -> Path:
    """Where Ray's ssh keeps its control sockets for CLUSTER_NAME (command_runner.py)."""
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    return Path("/tmp") / f"ray_ssh_{user}" / hashlib.sha256(cluster_name.encode()).hexdigest()[:10]


def test_ray_up_submit_a_search_and_ray_down(node, tmp_path):
    data = shared_file("ml-100k.inter")
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = tmp_path / "rehearsal.yaml"
    config.write_text(yaml.safe_dump(rehearsal_config(cluster, getpass.getuser(), node.key), sort_keys=False))
    out, experiment = f"{node.home}/runs/ml-100k", f"{node.home}/experiments/ml-100k"
    tunnel = None
    try:
        run_ray(node, "up", "-y", str(config))
        port = free_port()
        tunnel = subprocess.Popen([*RAY, "dashboard", "-p", str(port), str(config)], cwd=ROOT, env=ray_env(node),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: accepts(port), tunnel, "ray dashboard's tunnel")
        address = f"http://127.0.0.1:{port}"
        run_ray(node, "job", "submit", "--address", address, "--submission-id", "rehearsal", "--",
                "simdiffrec", "tune", "--data", str(data), "--num-samples", "2", "--max-epochs", "1", "--out", out)
        assert "succeeded" in run_ray(node, "job", "status", "--address", address, "rehearsal").lower()
        actors = list_actors(address=address, limit=1000, raise_on_missing_output=False)
        assert any(a.class_name.endswith("ImplicitFunc") for a in actors), \
            "the search ran in a Ray of its own: none of its trials is among the cluster's actors"
        sockets = listening(node)
        assert {"gcs_server", "raylet"} <= {name for name, _ in sockets}, sockets
        assert {address for _, address in sockets} <= LOOPBACK, sorted(sockets)
    finally:
        if tunnel is not None:
            os.killpg(tunnel.pid, signal.SIGTERM)
            tunnel.wait()
        down = subprocess.run([*RAY, "down", "-y", str(config)], cwd=ROOT, env=ray_env(node),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        control = ssh_control_dir(cluster["cluster_name"])
        shutil.rmtree(control, ignore_errors=True)
        if control.parent.is_dir() and not any(control.parent.iterdir()):
            control.parent.rmdir()
    assert down.returncode == 0, f"ray down failed:\n{down.stdout[-6000:]}"
    assert ray_processes(node) == []  # `ray down` stopped the node's Ray
    exports = node.here(out)
    assert (exports / "best_config.yaml").is_file() and (exports / "best_checkpoint" / "model.pt").is_file()
    assert pd.read_parquet(exports / "results.parquet")["trial_id"].nunique() == 2
    best = yaml.safe_load((exports / "best_config.yaml").read_text())
    assert best["search"]["experiment"] == experiment  # SIMDIFFREC_STORAGE/NAME, as the file sets it
    assert any(node.here(experiment).glob("experiment_state*.json"))
