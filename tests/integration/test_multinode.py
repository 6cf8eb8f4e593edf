"""A real multi-node Ray cluster on one machine (issue #12): hosts in network namespaces on a bridge
(tests/integration/multinode.py), the S3 server on a host of its own, and nodes lost or cut off.

The coordinator and the retention controller run on the head (created by a driver on the head host,
with their soft affinity to it; the head declares no GPU), GPU workers on the two worker hosts (one fake
GPU each). The test process stays in the root namespace: it reaches the S3 server over the bridge and
drives Ray through :class:`multinode.Driver`.

Select with ``-m multinode``; they run in CI by default (as root, with iproute2; skipped otherwise).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import time
import uuid
from pathlib import Path

import pytest

from tests.integration import multinode

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(multinode.require_root_and_iproute() is not None,
                       reason=f"multi-node cluster: {multinode.require_root_and_iproute()}"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo" / "photos"


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    # A short root: Ray's unix socket paths under it must stay under ~107 characters.
    root = Path("/tmp") / f"hsc-{secrets.token_hex(3)}"
    failed_before = request.session.testsfailed
    started = multinode.up(root)
    yield started
    try:
        multinode.down(started)
    finally:
        if request.session.testsfailed > failed_before:
            # Keep the logs of a failing run (Ray's session logs, the S3 server's, the drivers').
            keep = tmp_path_factory.mktemp("multinode-logs")
            shutil.copytree(root, keep / root.name, ignore=shutil.ignore_patterns("*.sock", "sockets", "*.dat",
                                                                                  "*.idx", "*.ecx", "*.crt", "*.key"),
                            ignore_dangling_symlinks=True, dirs_exist_ok=True)
            print(f"multi-node cluster logs kept in {keep / root.name}")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def driver(cluster):
    handle = multinode.Driver(cluster, namespace=f"mn-{uuid.uuid4().hex[:6]}")
    yield handle
    handle.close()


def test_cluster_has_a_head_without_gpus_and_two_gpu_workers_on_their_own_hosts(cluster, driver):
    nodes = {node["address"]: node for node in driver.call("nodes") if node["alive"]}
    worker_addresses = {host.address for host in cluster.workers}
    assert set(nodes) == {cluster.head.address} | worker_addresses
    assert nodes[cluster.head.address]["resources"].get("GPU", 0) == 0
    assert all(nodes[address]["resources"].get("GPU") == 1 for address in worker_addresses)
    # The driver itself is on the head host, at its address.
    assert driver.call("ping")["node_ip"] == cluster.head.address
    # A task asking for a GPU can only land on a worker host; two of them take both.
    placed = driver.call("gpu_task_nodes", 2)
    assert sorted(task["node_ip"] for task in placed) == sorted(worker_addresses)
    # Every host's processes live in its own namespace.
    for host in cluster.ray_hosts:
        assert multinode.netns_pids(host.netns), host.name


def test_ray_refuses_a_driver_without_the_cluster_token(cluster):
    import subprocess
    import sys

    script = ("import ray\n"
              f"ray.init(address={cluster.ray_address!r}, _node_ip_address={cluster.head.address!r})\n"
              "print('connected')\n")
    environment = {key: value for key, value in cluster.ray_environment().items() if key != "RAY_AUTH_TOKEN_PATH"}
    completed = subprocess.run(["ip", "netns", "exec", cluster.head.netns, sys.executable, "-c", script],
                               env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent-home", **environment},
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0 and "connected" not in completed.stdout, completed.stdout


def test_down_stops_every_process_and_removes_namespaces_and_links(cluster):
    """Last in this module: the cluster goes away completely (the fixture's own down is then a no-op)."""
    multinode.down(cluster)
    assert multinode.links_left(cluster) == []
    for name in cluster.hosts:
        assert not multinode.host_processes(cluster, name), name
