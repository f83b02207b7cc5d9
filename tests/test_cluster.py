"""cluster.yaml against Ray's own cluster-config schema (offline: no cloud account), its safety
properties, a search on a two-node Ray cluster on this machine, and where a local search's Ray
listens.  `ray up` of the file itself: tests/test_ray_up.py."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.cluster_utils import Cluster

from simdiffrec.cli import main
from tuner.jobs import LOOPBACK_ENV

from .conftest import synthetic_sequences

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema(cluster_config):
    validate_config(prepare_config(copy.deepcopy(cluster_config)))


def test_cluster_has_a_cpu_head_and_autoscaling_gpu_workers(cluster_config):
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != cluster_config["head_node_type"]]
    assert len(workers) == 1 and workers[0]["resources"]["GPU"] >= 1
    assert workers[0]["min_workers"] == 0 < workers[0]["max_workers"]


def test_cluster_opens_no_port_to_the_world_and_holds_no_credentials(cluster_config):
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text
    assert any("--dashboard-host=127.0.0.1" in c for c in cluster_config["head_start_ray_commands"])
    for node_type in cluster_config["available_node_types"].values():  # Ray's own group opens SSH to all
        assert node_type["node_config"]["SecurityGroupIds"]
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|ssh_private_key", text,
                         re.IGNORECASE)


def test_every_node_type_has_an_instance_profile_of_its_own(cluster_config):
    """Ray's default profile goes to the head only (EC2 and S3 full access); the GPU workers write
    trial checkpoints to S3 themselves, and need no EC2 rights, so each type names its own."""
    arns = {name: t["node_config"].get("IamInstanceProfile", {}).get("Arn")
            for name, t in cluster_config["available_node_types"].items()}
    assert all(arn and ":instance-profile/" in arn for arn in arns.values()), arns
    assert len(set(arns.values())) == len(arns), arns


def test_cluster_installs_this_project_and_stores_experiments_on_s3(cluster_config):
    assert cluster_config["file_mounts"] == {"~/simdiffrec": "."}
    assert ".gitignore" in cluster_config["rsync_filter"]  # a local .venv is not copied to the nodes
    setup = "\n".join(cluster_config["setup_commands"])
    assert "-e ~/simdiffrec" in setup and f"ray[default,tune]=={ray.__version__}" in setup
    assert re.search(r"SIMDIFFREC_STORAGE:-s3://", setup)  # a node's own value, else the S3 prefix


def tiny_search(tmp_path: Path) -> list[str]:
    """`simdiffrec tune` flags for a search of seconds: synthetic data, a small model, 2 epochs."""
    data = tmp_path / "seq.txt"
    sequences = synthetic_sequences(n_users=80, n_items=40, length=10, seed=2)
    data.write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in enumerate(sequences, 1)))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5}},
        "fixed": {"hidden": 16, "inner": 32, "steps": 50, "k_noise": 3, "k_sample": 2, "batch_size": 32,
                  "kcore": 0, "max_len": 10, "dropout": 0.1, "attn_dropout": 0.1},
        "asha": {"max_epochs": 2, "grace_period": 2, "reduction_factor": 2}}))
    return ["tune", "--data", str(data), "--space", str(space), "--out", str(tmp_path / "out")]


def test_a_two_node_cluster_runs_trials_on_both_nodes(tmp_path):
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        assert main([*tiny_search(tmp_path), "--num-samples", "4", "--max-concurrent", "2"]) == 0
        nodes = {actor["Address"]["NodeID"] for actor in ray._private.state.actors().values()
                 if actor["ActorClassName"].endswith("ImplicitFunc")}  # Tune's function-trainable actors
        assert nodes == {cluster.head_node.node_id, worker.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert pd.read_parquet(tmp_path / "out" / "results.parquet")["trial_id"].nunique() == 4


def test_a_local_search_listens_on_loopback_only(tmp_path):
    """`simdiffrec tune` with no Ray address, as a user runs it: every socket that its Ray's
    processes (GCS, raylet, agents, workers) listen on, sampled while it runs, is 127.0.0.1's."""
    psutil = pytest.importorskip("psutil")  # ships inside ray
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", LOOPBACK_ENV)}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = tmp_path / "tune.log"
    with log.open("w") as out:
        search = subprocess.Popen([sys.executable, "-m", "simdiffrec.cli", *tiny_search(tmp_path),
                                   "--num-samples", "1", "--max-epochs", "1"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
        listening: set[tuple[str, str]] = set()
        try:
            while search.poll() is None:
                for proc in psutil.Process(search.pid).children(recursive=True):
                    try:
                        listening |= {(proc.name(), c.laddr.ip) for c in proc.net_connections("inet")
                                      if c.status == psutil.CONN_LISTEN}
                    except psutil.Error:  # ended meanwhile
                        pass
                time.sleep(0.2)
        except psutil.Error:  # the search ended meanwhile
            search.wait()
        finally:
            if search.poll() is None:
                search.kill()
                search.wait()
    assert search.returncode == 0, log.read_text()[-3000:]
    assert {"gcs_server", "raylet"} <= {name for name, _ in listening}, listening
    assert {ip for _, ip in listening} <= LOOPBACK, sorted(listening)
