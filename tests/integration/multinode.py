"""A multi-node Ray cluster on one machine: one network namespace per host, on a bridge of its own.

Hosts (each a network namespace ``hs-<suffix>-<name>`` with one veth ``e0`` on the bridge ``hsb<suffix>``,
addresses in ``10.251.<K>.0/24``, K chosen free):

- ``head`` (.1): the Ray head (GCS, raylet, ``--num-gpus=0``): the coordinator, the retention controller
  and the CPU stages run here, and so does every driver (``ip netns exec`` into it, see :class:`Driver`);
- ``worker-1`` (.2), ``worker-2`` (.3), ...: Ray worker nodes with one fake GPU each (``--num-gpus=1``,
  ``--num-cpus=0``): only GPU workers land here;
- ``s3`` (the next address, .4 with two workers): the embedded SeaweedFS (``weed mini``, the flags of :mod:`storage.seaweed`) bound to
  its own address, S3 over TLS (a CA made for this cluster; the config refuses plain HTTP off loopback);
- the bridge itself has .254 in the root namespace, so the test process reaches the S3 server (and
  nothing else needs it).

Every Ray process gets token auth (``RAY_AUTH_MODE=token``, a token file made per cluster, as the local
stack does) and the health-check settings in :data:`DEFAULT_HEALTH` (how fast a lost node is declared dead).

Everything started is found again by namespace (``ip netns pids``) and by Ray temp dir (``ps``), and
stopped by pid; never ``ray stop``, which kills every Ray on the machine. :func:`down` then deletes the
namespaces, the veths and the bridge. The cluster's description is kept in ``<root>/cluster.json``
(0600: it holds the S3 credentials), which is what ``scripts/local-cluster.sh`` passes between calls.

Faults: :func:`kill` SIGKILLs every process of a host; :func:`partition` cuts a host off (``link``: its
veth down, so it reaches nothing; ``ray``: blackhole routes to every other Ray host, so it still reaches
S3 but not the head); :func:`heal` undoes a partition; :func:`restart_node` starts a host's Ray (or the
S3 server, with its data) again. :func:`kill_head_raylet` SIGKILLs the head's raylet with its agents and
workers (the GCS survives, the head node is declared dead); :func:`restart_head` then does what Kubernetes
without GCS fault tolerance does: the head restarts whole (a new GCS), each worker raylet exits when the
new GCS refuses it, and the worker host is started again (KubeRay recreating the pod).

Used by tests/integration/test_multinode.py, tests/integration/test_multinode_chaos.py and by
``scripts/local-cluster.sh`` (``python -m tests.integration.multinode up|down|kill|partition|heal|restart|status``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
SUBNET_PREFIX = "10.251"
LOCK_FILE = Path("/tmp/hs-local-cluster.lock")
HEAD = "head"
S3 = "s3"
ETH = "e0"
# Fixed ports: each host is a fresh namespace, so nothing else can hold them.
RAY_PORT = 6379
RAY_CLIENT_PORT = 10001
# The S3 server's ports are the cluster's own, although its host is a namespace of its own: weed
# also serves each gRPC port P+10000 on a unix socket at a fixed path, /tmp/seaweedfs-<component>-grpc-
# <P+10000>.sock, and /tmp is shared by every namespace. Two clusters on the same ports (two test runs
# at once) took over each other's sockets, and their components then met the other cluster's CA
# ("x509: certificate signed by unknown authority", HTTP 500 on S3). Derived from the cluster's subnet
# octet, unique among the clusters up, and outside storage.seaweed's range for one-machine servers.
S3_PORTS_BASE = 40000
S3_COMPONENTS = ("s3", "master", "volume", "filer", "admin")


def s3_ports(octet: int) -> dict[str, int]:
    """The S3 server's HTTP port per component for the cluster on 10.251.<octet>.0/24 (gRPC: +10000)."""
    base = S3_PORTS_BASE + octet * len(S3_COMPONENTS)
    return {component: base + index for index, component in enumerate(S3_COMPONENTS)}


# How long Ray takes to declare a node dead once its raylet stops answering: the GCS checks every
# period, each check may take up to the timeout, and after `threshold` failures in a row the node is
# dead (its actors restart elsewhere, its tasks are retried). Ray's own defaults (3 s, 10 s, 5) take
# ~64 s for a partitioned node; these take a few seconds. Set on every Ray process (only the GCS reads
# them, but every process reads the same config).
DEFAULT_HEALTH = {
    "RAY_health_check_initial_delay_ms": "2000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "4",
}
# A process that cannot reach the GCS for this long exits by itself (Ray's default: 60 s), so a node
# cut off for longer kills its own workers. Longer here, so that a cut-off node's stale workers stay
# alive for as long as a test keeps the node cut off: the fencing has to hold on its own.
GCS_RECONNECT_TIMEOUT_S = "300"
READY_TIMEOUT_S = 120.0
OBJECT_STORE_BYTES = 256 * 1024 * 1024  # per node; the system passes little through Ray's object store
STOP_GRACE_S = 3.0


class ClusterError(RuntimeError):
    """The local cluster could not be started, reached or changed."""


@dataclass
class Host:
    name: str
    role: str  # head | worker | s3
    netns: str
    veth: str
    address: str
    temp_dir: str = ""  # Ray's, for head and workers


@dataclass
class Cluster:
    suffix: str
    octet: int
    root: str
    bridge: str
    bridge_address: str
    hosts: dict[str, Host]
    token_path: str
    health: dict[str, str]
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = field(default="", repr=False)
    s3_ca_file: str = ""
    partitions: dict[str, str] = field(default_factory=dict)  # host → "link" | "ray"

    # --- views -----------------------------------------------------------------------------------

    @property
    def head(self) -> Host:
        return self.hosts[HEAD]

    @property
    def workers(self) -> list[Host]:
        return [host for host in self.hosts.values() if host.role == "worker"]

    @property
    def ray_hosts(self) -> list[Host]:
        return [host for host in self.hosts.values() if host.role in ("head", "worker")]

    @property
    def ray_address(self) -> str:
        return f"{self.head.address}:{RAY_PORT}"

    @property
    def state_file(self) -> Path:
        return Path(self.root) / "cluster.json"

    def ray_environment(self) -> dict[str, str]:
        """What every Ray process and driver of this cluster runs with (token auth on)."""
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path, "RAY_USAGE_STATS_ENABLED": "0",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
                "RAY_gcs_rpc_server_reconnect_timeout_s": GCS_RECONNECT_TIMEOUT_S, **self.health}

    def store_settings(self) -> dict[str, Any]:
        """The ``store`` section of a config that reaches this cluster's S3 server (TLS, its CA)."""
        return {"endpoint": self.s3_endpoint, "access_key": self.s3_access_key, "secret_key": self.s3_secret_key,
                "secure": True, "ca_file": self.s3_ca_file}

    def save(self) -> None:
        data = dataclasses.asdict(self)
        descriptor = os.open(self.state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(data, handle, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "Cluster":
        path = Path(path)
        if path.is_dir():
            path = path / "cluster.json"
        data = json.loads(path.read_text())
        data["hosts"] = {name: Host(**host) for name, host in data["hosts"].items()}
        return cls(**data)


# --- plumbing ------------------------------------------------------------------------------------

def _ip(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=60)
    if check and completed.returncode != 0:
        raise ClusterError(f"`ip {' '.join(arguments)}` failed: {completed.stderr.strip()}")
    return completed


def require_root_and_iproute() -> str | None:
    """Why this machine cannot run the cluster (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is missing: apt-get install -y iproute2"
    return None


def _octets_in_use() -> set[int]:
    """Third octets of 10.251.K.0/24 networks this machine already has (another cluster's)."""
    text = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
    used = set()
    for word in text.split():
        if word.startswith(SUBNET_PREFIX + "."):
            parts = word.split("/")[0].split(".")
            if len(parts) == 4 and parts[2].isdigit():
                used.add(int(parts[2]))
    return used


def _spawn(netns: str, command: list[str], environment: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A process "on" host ``netns``, in a session of its own (it outlives the caller, e.g. the script)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(["ip", "netns", "exec", netns, *command], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=environment, start_new_session=True)


def netns_pids(netns: str) -> set[int]:
    completed = _ip("netns", "pids", netns, check=False)
    return {int(word) for word in completed.stdout.split() if word.isdigit()}


def host_processes(cluster: Cluster, name: str) -> set[int]:
    """Every process of a host: those in its namespace, and those naming its Ray temp dir (with their
    process trees; none should be outside the namespace, but a stray one is stopped all the same)."""
    import psutil

    host = cluster.hosts[name]
    pids = netns_pids(host.netns)
    if host.temp_dir:
        marker = host.temp_dir.rstrip("/") + "/"
        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                arguments = " ".join(process.info["cmdline"] or []) + " "
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if process.pid != os.getpid() and (marker in arguments or f"={host.temp_dir} " in arguments):
                pids.add(process.pid)
                with contextlib.suppress(psutil.NoSuchProcess):
                    pids.update(child.pid for child in process.children(recursive=True))
    pids.discard(os.getpid())
    return {pid for pid in pids if _alive(pid)}  # a zombie (exited, not yet reaped) is gone already


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    import psutil

    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            processes.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return {process.pid for process in alive if _alive(process.pid)}


def stop_pids(pids: set[int], *, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace_s`` (0: SIGKILL at once)."""
    if not pids:
        return
    if grace_s > 0:
        _signal_all(pids, signal.SIGTERM)
        pids = _wait_gone(pids, grace_s)
    _signal_all(pids, signal.SIGKILL)
    left = _wait_gone(pids, 10.0)
    if left:
        raise ClusterError(f"processes {sorted(left)} survived SIGKILL")


# --- TLS for the S3 server -----------------------------------------------------------------------

def _write_s3_certificates(directory: Path, address: str) -> tuple[Path, Path, Path]:
    """A CA made for this cluster (its key never written) and the S3 server's certificate for
    ``address``: (ca.crt, s3.crt, s3.key), 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid_from, valid_until = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"headshots local cluster ca {secrets.token_hex(4)}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid_from).not_valid_after(valid_until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "headshots-cluster-s3")]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(valid_from).not_valid_after(valid_until)
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
                             critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.crt", directory / "s3.crt", directory / "s3.key"
    contents = (ca.public_bytes(serialization.Encoding.PEM), server.public_bytes(serialization.Encoding.PEM),
                server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    for path, content in zip(paths, contents):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
    return paths


# --- up / down -----------------------------------------------------------------------------------

def _make_cluster(root: Path, workers: int, health: dict[str, str]) -> Cluster:
    suffix = secrets.token_hex(2)
    hosts = {}
    names = [HEAD] + [f"worker-{index}" for index in range(1, workers + 1)] + [S3]
    for index, name in enumerate(names, start=1):
        role = "head" if name == HEAD else "s3" if name == S3 else "worker"
        short = "h" if name == HEAD else "s" if name == S3 else name.split("-")[1]
        hosts[name] = Host(name=name, role=role, netns=f"hs-{suffix}-{name}", veth=f"hsv{suffix}{short}",
                           address="", temp_dir=str(root / "ray" / short) if role != "s3" else "")
    return Cluster(suffix=suffix, octet=0, root=str(root), bridge=f"hsb{suffix}", bridge_address="", hosts=hosts,
                   token_path=str(root / "ray-auth-token"), health=dict(health))


def _create_network(cluster: Cluster) -> None:
    """Bridge, namespaces and veths, under a machine-wide lock so two clusters never pick one subnet."""
    LOCK_FILE.touch(exist_ok=True)
    with open(LOCK_FILE) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        free = sorted(set(range(1, 255)) - _octets_in_use())
        if not free:
            raise ClusterError(f"every {SUBNET_PREFIX}.K.0/24 network is in use")
        cluster.octet = secrets.choice(free)
        base = f"{SUBNET_PREFIX}.{cluster.octet}"
        cluster.bridge_address = f"{base}.254"
        for index, host in enumerate(cluster.hosts.values(), start=1):
            host.address = f"{base}.{index}"
        cluster.save()  # from here on, `down` knows what to remove
        _ip("link", "add", cluster.bridge, "type", "bridge")
        _ip("addr", "add", f"{cluster.bridge_address}/24", "dev", cluster.bridge)
        _ip("link", "set", cluster.bridge, "up")
    for host in cluster.hosts.values():
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", ETH, "netns", host.netns)
        _ip("link", "set", host.veth, "master", cluster.bridge, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", ETH)
        _ip("-n", host.netns, "link", "set", ETH, "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")


def _start_s3(cluster: Cluster) -> None:
    """``weed mini`` in the s3 namespace on its own address, with storage.seaweed's flags and secrets
    (filer/master HTTP off, JWT-signed chunks, mutual TLS on gRPC) and S3 over TLS. Started again
    (:func:`restart_node`), it keeps its data, credentials and certificate."""
    from storage.seaweed import _security_environment, weed_binary

    host = cluster.hosts[S3]
    data_dir = Path(cluster.root) / "s3"
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    tls = Path(cluster.root) / "tls"
    if not cluster.s3_access_key:
        _write_s3_certificates(tls, host.address)
        cluster.s3_access_key = "hs" + secrets.token_hex(8)
        cluster.s3_secret_key = secrets.token_urlsafe(30)
        cluster.s3_ca_file = str(tls / "ca.crt")
        cluster.s3_endpoint = f"{host.address}:{s3_ports(cluster.octet)['s3']}"
    cert_file, key_file = tls / "s3.crt", tls / "s3.key"
    ports = s3_ports(cluster.octet)
    command = [
        weed_binary(), "mini", f"-dir={data_dir}", f"-ip={host.address}", f"-ip.bind={host.address}",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}",
        "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=0",
        f"-s3.localSocket={data_dir / 's3.sock'}", f"-filer.localSocket={data_dir / 'filer.sock'}",
        "-disableHttp", f"-s3.cert.file={cert_file}", f"-s3.key.file={key_file}",
    ]
    environment = dict(os.environ, **_security_environment(data_dir), AWS_ACCESS_KEY_ID=cluster.s3_access_key,
                       AWS_SECRET_ACCESS_KEY=cluster.s3_secret_key)
    cluster.save()
    _spawn(host.netns, command, environment, data_dir / "weed.log")
    _wait_s3(cluster, data_dir / "weed.log")


def _wait_s3(cluster: Cluster, log_path: Path) -> None:
    import ssl

    context = ssl.create_default_context(cafile=cluster.s3_ca_file)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"https://{cluster.s3_endpoint}/healthz", timeout=2,
                                        context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise ClusterError(f"the S3 server did not answer on https://{cluster.s3_endpoint} within "
                       f"{READY_TIMEOUT_S:.0f} s; see {log_path}")


def _ray_binary() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def start_ray_host(cluster: Cluster, name: str) -> None:
    """`ray start` on one host (head: ``--head --num-gpus=0``; worker: ``--address`` and one fake GPU)."""
    host = cluster.hosts[name]
    Path(host.temp_dir).mkdir(parents=True, exist_ok=True)
    common = [f"--node-ip-address={host.address}", "--disable-usage-stats", f"--temp-dir={host.temp_dir}",
              f"--object-store-memory={OBJECT_STORE_BYTES}"]
    if host.role == "head":
        command = [_ray_binary(), "start", "--head", f"--port={RAY_PORT}", f"--ray-client-server-port={RAY_CLIENT_PORT}",
                   "--num-gpus=0", "--num-cpus=2", "--include-dashboard=false", *common]
    else:
        command = [_ray_binary(), "start", f"--address={cluster.ray_address}", "--num-gpus=1", "--num-cpus=0",
                   *common]
    log_path = Path(cluster.root) / f"ray-start-{name}.log"
    # The host's own disk for node caches (base models): kept across restart_node, gone with the root.
    node_cache = Path(cluster.root) / "node-cache" / name
    environment = dict(os.environ, **cluster.ray_environment(), HEADSHOTS_NODE_CACHE_DIR=str(node_cache))
    process = _spawn(host.netns, command, environment, log_path)
    try:
        code = process.wait(timeout=READY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise ClusterError(f"`ray start` on {name} did not return within {READY_TIMEOUT_S:.0f} s; see {log_path}")
    if code != 0:
        raise ClusterError(f"`ray start` on {name} exited {code}; see {log_path}")


def up(root: str | Path, *, workers: int = 2, health: dict[str, str] | None = None) -> Cluster:
    """Start a cluster under ``root`` (created; Ray temp dirs and S3 data live there). On any failure
    everything started so far is stopped and removed before the error is raised."""
    problem = require_root_and_iproute()
    if problem:
        raise ClusterError(problem)
    root = Path(root).resolve()
    if (root / "cluster.json").is_file():
        existing = Cluster.load(root)
        if any(Path(f"/run/netns/{host.netns}").exists() for host in existing.hosts.values()):
            raise ClusterError(f"a cluster is already up under {root}; run `down` first")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    cluster = _make_cluster(root, workers, DEFAULT_HEALTH if health is None else health)
    descriptor = os.open(cluster.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    try:
        _create_network(cluster)
        _start_s3(cluster)
        start_ray_host(cluster, HEAD)
        with ThreadPoolExecutor(max_workers=len(cluster.workers)) as pool:
            for started in [pool.submit(start_ray_host, cluster, host.name) for host in cluster.workers]:
                started.result()
        wait_for_nodes(cluster, {host.address for host in cluster.ray_hosts})
    except BaseException:
        with contextlib.suppress(ClusterError):
            down(cluster)  # the first error is the one to report
        raise
    cluster.save()
    return cluster


def alive_nodes(cluster: Cluster, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """Ray's view (the GCS's node table, asked from the head host): node address → {node_id, alive}."""
    script = (
        "import json, ray._raylet as r\n"
        "from ray._raylet import GcsClient\n"
        f"client = GcsClient(address={cluster.ray_address!r})\n"
        "nodes = client.get_all_node_info(timeout=20)\n"
        "print(json.dumps([{'address': n.node_manager_address, 'node_id': n.node_id.hex(), 'state': int(n.state)}"
        " for n in nodes.values()]))\n"
    )
    completed = subprocess.run(["ip", "netns", "exec", cluster.head.netns, sys.executable, "-c", script],
                               capture_output=True, text=True, timeout=timeout_s,
                               env=dict(os.environ, **cluster.ray_environment()))
    if completed.returncode != 0:
        raise ClusterError(f"could not read Ray's node table: {completed.stderr.strip()[-2000:]}")
    nodes: dict[str, dict[str, Any]] = {}
    for node in json.loads(completed.stdout.strip().splitlines()[-1]):
        alive = node["state"] == 0  # GcsNodeInfo.ALIVE
        # A host restarted after a kill has a dead and an alive entry: the alive one wins.
        if alive or node["address"] not in nodes:
            nodes[node["address"]] = {"node_id": node["node_id"], "alive": alive}
    return nodes


def wait_for_nodes(cluster: Cluster, addresses: set[str], *, alive: bool = True,
                   timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until Ray reports every node in ``addresses`` alive (or, with ``alive=False``, dead)."""
    deadline = time.monotonic() + timeout_s
    state: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        try:
            state = alive_nodes(cluster)
        except (ClusterError, subprocess.TimeoutExpired):
            state = {}
        if all(address in state and state[address]["alive"] == alive for address in addresses):
            return
        time.sleep(0.5)
    raise ClusterError(f"Ray did not report {sorted(addresses)} {'alive' if alive else 'dead'} within "
                       f"{timeout_s:.0f} s (last view: {state})")


def _cluster_processes(cluster: Cluster) -> set[int]:
    everyone: set[int] = set()
    for name, host in cluster.hosts.items():
        if Path(f"/run/netns/{host.netns}").exists() or host.temp_dir:
            everyone |= host_processes(cluster, name)
    return everyone


def down(cluster: Cluster) -> None:
    """Stop every process of the cluster by pid, then remove its namespaces, veths and bridge.
    Safe to call on a cluster that is half up or already down."""
    errors = []
    try:
        stop_pids(_cluster_processes(cluster))
        # A process may have been starting meanwhile (a raylet starting a worker): until none is left.
        deadline = time.monotonic() + 30
        while (left := _cluster_processes(cluster)) and time.monotonic() < deadline:
            stop_pids(left, grace_s=0)
        if left:
            errors.append(f"processes {sorted(left)} of the cluster are still running")
    except ClusterError as error:
        errors.append(str(error))
    for host in cluster.hosts.values():
        if Path(f"/run/netns/{host.netns}").exists():
            _ip("netns", "del", host.netns, check=False)
        _ip("link", "del", host.veth, check=False)  # gone with the namespace, unless it was never moved
    _ip("link", "del", cluster.bridge, check=False)
    if errors:
        raise ClusterError("; ".join(errors))


def copy_logs(cluster: Cluster, destination: Path) -> Path:
    """Copy the cluster's logs (Ray's session logs, the S3 server's, the drivers' and `ray start`'s)
    under ``destination``, without sockets, S3 data or keys; returns where they are."""
    target = Path(destination) / Path(cluster.root).name
    shutil.copytree(cluster.root, target, ignore=shutil.ignore_patterns("*.sock", "sockets", "*.dat", "*.idx",
                                                                        "*.ecx", "*.crt", "*.key", "*token*",
                                                                        "cluster.json"),
                    ignore_dangling_symlinks=True, dirs_exist_ok=True)
    return target


def links_left(cluster: Cluster) -> list[str]:
    """Namespaces and links of this cluster that still exist (after :func:`down`: none)."""
    namespaces = _ip("netns", "list").stdout
    links = _ip("-o", "link").stdout
    left = [host.netns for host in cluster.hosts.values() if host.netns in namespaces.split()]
    left += [name for name in [cluster.bridge] + [host.veth for host in cluster.hosts.values()]
             if f" {name}:" in links or f" {name}@" in links]
    return left


# --- faults --------------------------------------------------------------------------------------

def kill(cluster: Cluster, name: str) -> set[int]:
    """SIGKILL every process of a host at once (raylet, agents, workers): the host is lost."""
    pids = host_processes(cluster, name)
    stop_pids(pids, grace_s=0)
    return pids


def partition(cluster: Cluster, name: str, mode: str = "link") -> None:
    """Cut a host off: ``link`` takes its veth down (it reaches nothing, S3 included); ``ray`` adds
    blackhole routes to every other Ray host, so it still reaches S3 (and S3 it) but not the head or the
    other workers. Packets are dropped silently, as in a real partition (no connection refused)."""
    host = cluster.hosts[name]
    if mode == "link":
        _ip("-n", host.netns, "link", "set", ETH, "down")
    elif mode == "ray":
        for other in cluster.ray_hosts:
            if other.name != name:
                _ip("-n", host.netns, "route", "add", "blackhole", f"{other.address}/32")
    else:
        raise ValueError(f"partition mode must be 'link' or 'ray', not {mode!r}")
    cluster.partitions[name] = mode
    cluster.save()


def heal(cluster: Cluster, name: str) -> None:
    host = cluster.hosts[name]
    mode = cluster.partitions.pop(name, None)
    _ip("-n", host.netns, "link", "set", ETH, "up")
    for other in cluster.ray_hosts:
        if other.name != name:
            _ip("-n", host.netns, "route", "del", "blackhole", f"{other.address}/32", check=False)
    cluster.save()


def restart_node(cluster: Cluster, name: str) -> None:
    """Start a host's server again once its processes are gone (after :func:`kill`, or a partitioned
    node whose raylet exited when it learnt it had been declared dead): Ray (waits until Ray reports the
    node alive), or the S3 server (same data, credentials and certificate). Whatever is left of it is
    stopped first."""
    left = host_processes(cluster, name)
    if left:
        stop_pids(left)
    if cluster.hosts[name].role == "s3":
        _start_s3(cluster)
        return
    start_ray_host(cluster, name)
    wait_for_nodes(cluster, {cluster.hosts[name].address})


def _is_raylet(pid: int) -> bool:
    import psutil

    try:
        arguments = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return bool(arguments) and Path(arguments[0]).name == "raylet"


def raylet_pids(cluster: Cluster, name: str) -> set[int]:
    """The live raylet(s) of a Ray host (none once it exited or was killed)."""
    return {pid for pid in host_processes(cluster, name) if _is_raylet(pid)}


def kill_head_raylet(cluster: Cluster) -> set[int]:
    """SIGKILL the head host's raylet and every process it started (the dashboard and runtime-env
    agents, the workers on the head: the stack's singletons, the CPU stages) at once. The GCS and the
    head's other processes (autoscaler monitor, client server, log monitor) stay: Ray declares the head
    node dead, and nothing but :func:`restart_head` brings a node with the head's resource back."""
    import psutil

    victims: set[int] = set()
    for pid in raylet_pids(cluster, HEAD):
        victims.add(pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            victims.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    if not victims:
        raise ClusterError("the head host has no raylet to kill; start it with restart_head first")
    stop_pids(victims, grace_s=0)
    return victims


def restart_head(cluster: Cluster, *, worker_exit_timeout_s: float = 180.0) -> dict[str, float]:
    """Restart the head whole, the way Kubernetes does without GCS fault tolerance, then the worker
    hosts the way KubeRay does.

    - The head container exits once its raylet died (``ray start --block`` ends with it): every process
      left on the head host is stopped, the GCS included, and a fresh one is started: a new GCS with an
      empty actor and node table (the state documents in S3 are all that survives).
    - A worker node's raylet, once it reaches the new GCS, is refused (another cluster: "GCS returned an
      authentication error") and exits, taking its workers with it. KubeRay then creates the worker pod
      again; here each worker host is started again once its raylet has exited (hosts cut off by
      :func:`partition` are left to the caller: heal, then :func:`restart_node`).

    Returns seconds from the head's restart until each worker host's old raylet exited (host name →
    s). Raises ClusterError if one does not exit within ``worker_exit_timeout_s``."""
    stop_pids(host_processes(cluster, HEAD), grace_s=0)
    # A fresh container has no record of the last cluster. This one does, and `ray start --head` refuses
    # to start where that record names an address which processes on this machine still use (the worker
    # raylets, until they exit).
    Path(cluster.head.temp_dir, "ray_current_cluster").unlink(missing_ok=True)
    restarted_at = time.monotonic()
    start_ray_host(cluster, HEAD)
    wait_for_nodes(cluster, {cluster.head.address})

    def worker_comes_back(host: Host) -> float:
        deadline = time.monotonic() + worker_exit_timeout_s
        while raylet_pids(cluster, host.name):
            if time.monotonic() > deadline:
                raise ClusterError(f"the raylet of {host.name} did not exit within {worker_exit_timeout_s:.0f} s "
                                   f"of the head's restart; see {host.temp_dir}/session_latest/logs/raylet.out")
            time.sleep(0.3)
        exited_after_s = time.monotonic() - restarted_at
        restart_node(cluster, host.name)
        return exited_after_s

    reachable = [host for host in cluster.workers if host.name not in cluster.partitions]
    with ThreadPoolExecutor(max_workers=max(1, len(reachable))) as pool:
        futures = {host.name: pool.submit(worker_comes_back, host) for host in reachable}
        return {name: future.result() for name, future in futures.items()}


# --- a driver on the head host -------------------------------------------------------------------

class Driver:
    """A Ray driver process on the head host (``ip netns exec``), called from the test process.

    A Ray driver must run on a node of the cluster (it binds the node's address and talks to that
    node's raylet), so it cannot live in the test process, which stays in the root namespace where the
    other tests' servers are on loopback. This process is connected to the cluster once and runs
    functions of :mod:`tests.integration.multinode_driver` by name: ``driver.call("submit", ...)``.
    """

    def __init__(self, cluster: Cluster, namespace: str):
        ours, theirs = socket.socketpair()
        self.cluster = cluster
        self.log_path = Path(cluster.root) / f"driver-{secrets.token_hex(3)}.log"
        environment = dict(os.environ, **cluster.ray_environment())
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", cluster.head.netns, sys.executable, "-m", "tests.integration.multinode_driver",
                 str(theirs.fileno()), cluster.ray_address, cluster.head.address, namespace],
                pass_fds=[theirs.fileno()], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=environment, cwd=REPO)
        theirs.close()
        self._connection = Connection(ours.detach())
        try:
            self.call("ping", timeout_s=READY_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def call(self, function: str, *args: Any, timeout_s: float = 600.0, **kwargs: Any) -> Any:
        self._connection.send((function, args, kwargs))
        if not self._connection.poll(timeout_s):
            raise TimeoutError(f"the driver did not answer {function} within {timeout_s:.0f} s; see {self.log_path}")
        ok, value = self._connection.recv()
        if not ok:
            raise ClusterError(f"driver call {function} failed:\n{value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._connection.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


def serve_driver(fd: int, functions: dict[str, Callable[..., Any]]) -> None:
    """The driver's loop: run each (name, args, kwargs) received, send back (ok, value or traceback)."""
    connection = Connection(fd)
    while True:
        try:
            name, args, kwargs = connection.recv()
        except (EOFError, OSError):
            return
        try:
            connection.send((True, functions[name](*args, **kwargs)))
        except Exception:  # noqa: BLE001 - handed to the caller
            connection.send((False, traceback.format_exc()))


# --- command line (scripts/local-cluster.sh) -----------------------------------------------------

def _print_environment(cluster: Cluster) -> None:
    print(f"# headshots local cluster {cluster.suffix}: {cluster.state_file}")
    for host in cluster.hosts.values():
        print(f"#   {host.name:10s} {host.address:15s} netns {host.netns}")
    print(f"export HEADSHOTS_RAY_ADDRESS={cluster.ray_address}")
    print(f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token_path}")
    print(f"export HEADSHOTS_STORE_ENDPOINT={cluster.s3_endpoint} HEADSHOTS_STORE_SECURE=true "
          f"HEADSHOTS_STORE_CA_FILE={cluster.s3_ca_file}")
    print(f"# S3 credentials: {cluster.state_file} (s3_access_key, s3_secret_key)")
    print(f"# drivers run on the head host: ip netns exec {cluster.head.netns} <command>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local-cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="start a cluster under DIR")
    up_parser.add_argument("dir")
    up_parser.add_argument("--workers", type=int, default=2)
    up_parser.add_argument("--ray-default-health-checks", action="store_true",
                           help="keep Ray's own health-check settings (a partitioned node is declared dead after ~1 min)")
    for name in ("down", "status"):
        sub.add_parser(name).add_argument("dir")
    for name in ("kill", "heal", "restart"):
        fault = sub.add_parser(name)
        fault.add_argument("dir")
        fault.add_argument("host")
    partition_parser = sub.add_parser("partition")
    partition_parser.add_argument("dir")
    partition_parser.add_argument("host")
    partition_parser.add_argument("--mode", choices=("link", "ray"), default="link")
    arguments = parser.parse_args(argv)

    if arguments.command == "up":
        cluster = up(arguments.dir, workers=arguments.workers,
                     health={} if arguments.ray_default_health_checks else None)
        _print_environment(cluster)
        return 0
    cluster = Cluster.load(arguments.dir)
    if arguments.command == "down":
        down(cluster)
        left = links_left(cluster)
        if left:
            print(f"left behind: {left}", file=sys.stderr)
            return 1
        return 0
    if arguments.command == "status":
        _print_environment(cluster)
        nodes = alive_nodes(cluster)
        for host in cluster.ray_hosts:
            node = nodes.get(host.address)
            state = "absent" if node is None else "alive" if node["alive"] else "dead"
            extra = f" (partitioned: {cluster.partitions[host.name]})" if host.name in cluster.partitions else ""
            print(f"{host.name:10s} {state}{extra}, {len(host_processes(cluster, host.name))} processes")
        return 0
    if arguments.host not in cluster.hosts:
        parser.error(f"no host {arguments.host!r}; hosts: {', '.join(cluster.hosts)}")
    if arguments.command == "kill":
        print(f"killed {len(kill(cluster, arguments.host))} processes of {arguments.host}")
    elif arguments.command == "partition":
        partition(cluster, arguments.host, arguments.mode)
    elif arguments.command == "heal":
        heal(cluster, arguments.host)
    elif arguments.command == "restart":
        restart_node(cluster, arguments.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
