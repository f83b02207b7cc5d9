"""`ray up` of cluster.yaml, for real, on this machine: the rehearsal of docs/tuning.md.

Ray's local provider reaches the head "node" over SSH on 127.0.0.1: an sshd in PID and mount
namespaces of its own, so the node has its own processes (the file's `ray stop` stops only the
node's Ray), its own /tmp and its own home.  The cluster file is cluster.yaml with its provider,
auth and node types swapped; its file mounts, setup and start commands are the file's own.  A
`simdiffrec tune` goes in through `ray job submit` over `ray dashboard`'s tunnel, as on AWS.

Where this differs from AWS: the node's home starts with ~/venv holding this environment's
packages, as a machine image would (on AWS the setup commands download Ray and torch), and the
node's own environment names a folder for SIMDIFFREC_STORAGE (the file's default is S3) and keeps
Ray on 127.0.0.1.  Needs root, sshd, rsync and ray[default]; runs only on demand:

    pytest -m cluster tests/test_ray_up.py
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import importlib.util
import os
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


def missing_tool() -> str | None:
    """Why this machine cannot rehearse a cluster, or None."""
    if os.geteuid() != 0:
        return "needs root: the node runs in PID and mount namespaces of its own (unshare)"
    for tool in ("sshd", "ssh", "ssh-keygen", "rsync", "unshare", "mount"):
        if shutil.which(tool, path=f"{os.environ.get('PATH', '')}:{SBIN}") is None:
            return f"{tool} is missing (Debian: apt-get install openssh-server rsync)"
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
    """The head node: HOME inside it is ROOTFS_HOME here; PROC is its namespace's first process."""

    home: Path
    rootfs_home: Path
    port: int
    key: Path
    proc: subprocess.Popen

    def here(self, path: str) -> Path:
        """Where a path under the node's home lies on this machine."""
        return self.rootfs_home / Path(path).relative_to(self.home)


def node_script(home: Path, home_here: Path, node_tmp: Path, binds: list[Path]) -> str:
    """The node's first process: its mounts, its machine image (~/venv), then sshd."""
    python = Path(sys.base_prefix) / "bin" / "python3"
    site = Path(sysconfig.get_paths()["purelib"])
    venv_site = f"{home}/venv/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    mounts = "\n".join(f"mount --bind {p} {home_here}/{p.relative_to(home)}" for p in binds)
    return textwrap.dedent(f"""\
        set -e
        {mounts}
        mount --rbind {home_here} {home}
        mount --bind {node_tmp} /tmp
        mount -t tmpfs tmpfs /run && mkdir /run/sshd
        {python} -m venv {home}/venv
        echo {site} > {venv_site}/machine-image.pth
        printf '#!{home}/venv/bin/python\\nimport sys\\nfrom ray.scripts.scripts import main\\nsys.exit(main())\\n' > {home}/venv/bin/ray
        chmod +x {home}/venv/bin/ray
        exec {shutil.which("sshd", path=f"{os.environ.get('PATH', '')}:{SBIN}")} -D -e -f {home}/.sshd/sshd_config
        """)


@pytest.fixture
def node() -> Iterator[Node]:
    """An sshd on 127.0.0.1 in namespaces of its own, with a host key and a user key made here;
    stopped, with everything it started, whatever the test does."""
    if reason := missing_tool():
        pytest.skip(reason)
    user, home = getpass.getuser(), Path.home()
    tmp = Path(tempfile.mkdtemp(prefix="simdiffrec-rehearsal-"))
    proc = None
    try:
        rootfs_home, node_tmp, sshd_dir = tmp / "home", tmp / "node-tmp", tmp / "home" / ".sshd"
        for d in (sshd_dir, node_tmp, tmp / "bin", tmp / "client-tmp"):
            d.mkdir(parents=True)
        key = tmp / "id_ed25519"
        for path in (sshd_dir / "host_key", key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        shutil.copy(f"{key}.pub", sshd_dir / "authorized_keys")
        port = free_port()
        (sshd_dir / "sshd_config").write_text(textwrap.dedent(f"""\
            ListenAddress 127.0.0.1
            Port {port}
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
            LogLevel ERROR
            """))
        (rootfs_home / ".bashrc").touch()
        (rootfs_home / ".profile").write_text(textwrap.dedent("""\
            export SIMDIFFREC_STORAGE="$HOME/experiments"  # on AWS: the S3 prefix in cluster.yaml
            export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0      # one machine: Ray listens on 127.0.0.1 only
            """))
        # The Python this environment runs on stays visible when the home is replaced.
        binds = [p for p in {Path(sys.base_prefix), Path(sys.prefix)} if p.is_relative_to(home)]
        for p in binds:
            (rootfs_home / p.relative_to(home)).mkdir(parents=True)
        # Ray's ssh and rsync reach the node through `ssh`; this one knows the port.
        ssh = tmp / "bin" / "ssh"
        ssh.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -p {port} "$@"\n')
        ssh.chmod(0o755)
        log = (tmp / "node.log").open("w")
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "bash", "-c",
             node_script(home, rootfs_home, node_tmp, binds)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(port, proc, "the node's sshd")
        except AssertionError as err:
            raise AssertionError(f"{err}: {(tmp / 'node.log').read_text()}") from None
        yield Node(home, rootfs_home, port, key, proc)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)  # unshare --kill-child: the namespace goes with it
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def ray_env(node: Node) -> dict[str, str]:
    """For the `ray` commands: the port-aware ssh, and Ray's client state in the test's folder."""
    tmp = node.rootfs_home.parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{tmp / 'bin'}:{env.get('PATH', '')}", TMPDIR=str(tmp / "client-tmp"))
    return env


def ray(node: Node, *args: str, timeout: float = 600) -> str:
    """Run `ray ARGS` from the project root as a user does; its output, or a failure showing it."""
    done = subprocess.run([*RAY, *args], cwd=ROOT, env=ray_env(node), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    print(f"$ ray {' '.join(args)}\n{done.stdout}")  # shown by pytest -rP, and on a failure
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout[-6000:]}"
    return done.stdout


def wait_for_port(port: int, what: subprocess.Popen, name: str, timeout: float = 120) -> None:
    """Until WHAT (NAME) accepts connections on 127.0.0.1:PORT; a failure if it ends first."""
    deadline = time.monotonic() + timeout
    while True:
        assert what.poll() is None, f"{name} ended (exit code {what.returncode})"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s"
            time.sleep(0.5)


def node_processes(node: Node) -> list[psutil.Process]:
    """The processes in the node's namespaces (sshd and what it started)."""
    return psutil.Process(node.proc.pid).children(recursive=True)


def listening(node: Node) -> set[tuple[str, str]]:
    """(process name, address) of every socket that a node process listens on."""
    found = set()
    for p in node_processes(node):
        try:
            found |= {(p.name(), c.laddr.ip) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # ended meanwhile
            pass
    return found


def ray_processes(node: Node) -> list[str]:
    """Names of the Ray processes left in the node's namespace."""
    names = []
    for p in node_processes(node):
        try:
            names.append(p.name())
        except psutil.Error:
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
        ray(node, "up", "-y", str(config))
        port = free_port()
        tunnel = subprocess.Popen([*RAY, "dashboard", "-p", str(port), str(config)], cwd=ROOT, env=ray_env(node),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(port, tunnel, "ray dashboard's tunnel")
        address = f"http://127.0.0.1:{port}"
        ray(node, "job", "submit", "--address", address, "--submission-id", "rehearsal", "--",
            "simdiffrec", "tune", "--data", str(data), "--num-samples", "2", "--max-epochs", "1", "--out", out)
        assert "succeeded" in ray(node, "job", "status", "--address", address, "rehearsal").lower()
        actors = list_actors(address=address, limit=1000, raise_on_missing_output=False)
        assert any(a.class_name.endswith("ImplicitFunc") for a in actors), \
            "the search ran in a Ray of its own: none of its trials is among the cluster's actors"
        sockets = listening(node)
        assert {"gcs_server", "raylet"} <= {name for name, _ in sockets}, sockets
        assert {ip for _, ip in sockets} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, sorted(sockets)
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
