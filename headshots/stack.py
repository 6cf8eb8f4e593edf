"""The local stack: an embedded S3 server and a Ray head, running in the background between CLI calls.

``headshots up`` starts what is not configured elsewhere and records it in ``$HEADSHOTS_HOME``:
- ``stack.json``: pids, endpoints, ports (no secrets);
- ``credentials.json`` (mode 0600): the generated S3 credentials;
- ``ray-auth-token`` (mode 0600): the Ray cluster's auth token (token auth stays on, even locally,
  because Ray binds to the machine's routable address, not loopback);
- ``master-key`` (mode 0600): the master key that wraps every person's data key (crypto-erasure),
  unless ``security.master_key`` is set. Losing it makes the stored person artifacts unreadable.
Every other command reads these back through :func:`connect`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headshots.config import Config

logger = logging.getLogger(__name__)

RAY_START_TIMEOUT_S = 120


class StackError(RuntimeError):
    """The local stack could not be started or reached."""


@dataclass
class StackInfo:
    s3_pid: int | None = None
    s3_endpoint: str = ""
    s3_data_dir: str = ""
    ray_address: str = ""
    ray_temp_dir: str = ""
    ray_started_here: bool = False
    metrics_port: int = 0
    retention_metrics_port: int = 0
    started_at: float = 0.0


def _home(config: Config) -> Path:
    home = config.home_path
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    return home


def _write_private(path: Path, text: str) -> None:
    """Create the file 0600 from the first byte (no window where another user can read it)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def load_info(config: Config) -> StackInfo | None:
    path = config.home_path / "stack.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return StackInfo(**{k: v for k, v in data.items() if k in StackInfo.__dataclass_fields__})


def _save_info(config: Config, info: StackInfo) -> None:
    (_home(config) / "stack.json").write_text(json.dumps(dataclasses.asdict(info), indent=1))


def _credentials(config: Config) -> tuple[str, str]:
    path = _home(config) / "credentials.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return data["access_key"], data["secret_key"]
    access_key, secret_key = "hs" + secrets.token_hex(8), secrets.token_urlsafe(30)
    _write_private(path, json.dumps({"access_key": access_key, "secret_key": secret_key}))
    return access_key, secret_key


def _master_key(config: Config) -> str:
    """The local stack's master key (base64), generated on first use into ``$HEADSHOTS_HOME/master-key``.

    Two commands starting at once must not end up with two different keys (uploads wrapped by the
    loser's key would be unreadable), so the key is written to a private temporary file and then
    hard-linked into place, which fails if the file already exists; everyone then reads the file.
    """
    path = _home(config) / "master-key"
    if not path.is_file():
        candidate = path.with_name(f".master-key.{os.getpid()}.{secrets.token_hex(4)}")
        _write_private(candidate, base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        try:
            os.link(candidate, path)
        except FileExistsError:
            pass  # another command created it first: use theirs
        finally:
            candidate.unlink()
    return path.read_text().strip()


def ray_token_path(config: Config) -> Path:
    path = _home(config) / "ray-auth-token"
    if not path.is_file():
        _write_private(path, secrets.token_hex(32))
    return path


def ray_auth_environment(config: Config) -> dict[str, str]:
    """Environment that makes Ray clients and servers use this stack's token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_path(config))}


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray_temp_dir(config: Config) -> Path:
    # Ray puts unix sockets under its temp dir; their paths must stay under ~100 characters, so the
    # folder is short and derived from $HEADSHOTS_HOME (two homes never share one).
    digest = hashlib.sha256(str(config.home_path.resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"hs-ray-{digest}"


def effective_config(config: Config, info: StackInfo | None = None) -> Config:
    """``config`` with the local stack's endpoint, credentials, master key and Ray address filled in where
    unset. With the embedded store, server-side encryption (SSE-S3) is turned on too."""
    info = info if info is not None else load_info(config)
    store, ray_config, security = config.store, config.ray, config.security
    if not store.endpoint:
        if info is None or not info.s3_endpoint:
            raise StackError("the local stack is not running: start it with `headshots up`")
        access_key, secret_key = _credentials(config)
        store = dataclasses.replace(store, endpoint=info.s3_endpoint, access_key=access_key, secret_key=secret_key,
                                    secure=False, server_side_encryption=True)
        if not security.master_key:
            # Only for the embedded store: a key generated on one machine for a shared store would
            # make every other submitter's uploads unreadable; such a deployment sets one key everywhere.
            security = dataclasses.replace(security, master_key=_master_key(config))
    if not ray_config.address:
        if info is None or not info.ray_address:
            raise StackError("the local stack is not running: start it with `headshots up`")
        ray_config = dataclasses.replace(ray_config, address=info.ray_address)
    return config.replace(store=store, ray=ray_config, security=security)


def is_up(config: Config) -> bool:
    info = load_info(config)
    if info is None:
        return False
    from storage.seaweed import is_running

    if not config.store.endpoint and not (info.s3_pid and is_running(info.s3_pid)):
        return False
    if not config.ray.address and not _ray_alive(info):
        return False
    return True


def _ray_alive(info: StackInfo) -> bool:
    if not info.ray_address:
        return False
    host, _, port = info.ray_address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def up(config: Config) -> StackInfo:
    """Start whatever part of the local stack is missing, then the coordinator. Idempotent."""
    from storage.seaweed import is_running, start_embedded_s3
    from storage.store import ArtifactStore

    home = _home(config)
    info = load_info(config) or StackInfo()
    if not config.store.endpoint and not (info.s3_pid and is_running(info.s3_pid)):
        access_key, secret_key = _credentials(config)
        port = int(info.s3_endpoint.rsplit(":", 1)[1]) if info.s3_endpoint else None
        try:
            server = start_embedded_s3(home / "s3", access_key=access_key, secret_key=secret_key, s3_port=port,
                                       detach=True)
        except Exception:
            if port is None:
                raise
            server = start_embedded_s3(home / "s3", access_key=access_key, secret_key=secret_key, detach=True)
        info.s3_pid, info.s3_endpoint, info.s3_data_dir = server.pid, server.endpoint, server.data_dir
        _save_info(config, info)
    if not config.ray.address and not _ray_alive(info):
        info.ray_address, info.ray_temp_dir = _start_ray_head(config)
        info.ray_started_here = True
        info.metrics_port = info.retention_metrics_port = 0
        _save_info(config, info)
    resolved = effective_config(config, info)
    store = ArtifactStore.from_config(resolved.store)
    store.ensure_buckets()
    from storage.lifecycle import apply_lifecycle_rules
    from storage.retention import load_policy

    # The store's own expiry, as a backstop behind the sweep (never instead of it).
    apply_lifecycle_rules(store, load_policy(resolved.retention.policy_file or None),
                          grace_days=resolved.retention.lifecycle_grace_days)
    connect_ray(resolved)
    import ray

    from cluster.actors import get_or_create_coordinator, get_or_create_retention_controller

    metrics_port = info.metrics_port or config.metrics.port or _free_port()
    coordinator = get_or_create_coordinator(resolved, metrics_port=metrics_port)
    info.metrics_port = ray.get(coordinator.ping.remote())["metrics_port"] or metrics_port
    # The retention controller sweeps once as it starts, so time the stack was down is never skipped.
    retention_port = info.retention_metrics_port or config.metrics.retention_port or _free_port()
    controller = get_or_create_retention_controller(resolved, metrics_port=retention_port)
    info.retention_metrics_port = ray.get(controller.ping.remote())["metrics_port"] or retention_port
    info.started_at = info.started_at or time.time()
    _save_info(config, info)
    return info


def _start_ray_head(config: Config) -> tuple[str, str]:
    temp_dir = _ray_temp_dir(config)
    ray_binary = Path(sys.executable).with_name("ray")
    if not ray_binary.exists():
        found = shutil.which("ray")
        if not found:
            raise StackError("the `ray` command is not installed; run `pip install 'ray[default]'`")
        ray_binary = Path(found)
    port = _free_port()
    command = [
        str(ray_binary), "start", "--head", f"--port={port}", f"--num-gpus={config.ray.num_gpus}",
        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
        f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
    ]
    if config.ray.num_cpus:
        command.append(f"--num-cpus={config.ray.num_cpus}")
    environment = dict(os.environ, **ray_auth_environment(config))
    log_path = _home(config) / "ray-start.log"
    with open(log_path, "ab") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                   timeout=RAY_START_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if completed.returncode != 0:
        raise StackError(f"`ray start --head` failed (exit {completed.returncode}); see {log_path}")
    from ray._private.services import get_node_ip_address

    return f"{get_node_ip_address()}:{port}", str(temp_dir)


def connect_ray(config: Config) -> None:
    """Connect this process to the stack's Ray cluster (idempotent)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update(ray_auth_environment(config))
    ray.init(address=config.ray.address, namespace=config.ray.namespace, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=False)


def uses_external_services(config: Config) -> bool:
    """Both the store and Ray are configured (a deployment): there is no local stack to start."""
    return bool(config.store.endpoint and config.ray.address)


def connect(config: Config, *, start: bool = False) -> Config:
    """The config with the local stack filled in; starts the stack first when ``start`` and it is down.

    With an external store and Ray cluster configured nothing is started: a process such as the API
    server in a pod must not create buckets or actors (that is the head's job, with wider rights).
    """
    if start and not uses_external_services(config) and not is_up(config):
        up(config)
    return effective_config(config)


def down(config: Config) -> dict[str, Any]:
    """Stop the local stack's processes (only ours: other Ray clusters on the machine are left alone)."""
    info = load_info(config)
    stopped: dict[str, Any] = {"s3": False, "ray": False}
    if info is None:
        return stopped
    import psutil

    ray_processes: list[psutil.Process] = []
    s3_processes: list[psutil.Process] = []
    if info.ray_started_here and info.ray_temp_dir:
        ray_processes = _ray_processes(info.ray_temp_dir)
        stopped["ray"] = bool(ray_processes)
    if info.s3_pid:
        try:
            s3_processes.append(psutil.Process(info.s3_pid))
            stopped["s3"] = True
        except psutil.NoSuchProcess:
            pass
    # Ray keeps nothing worth a slow shutdown (all state is in the store); the S3 server gets time
    # to flush its volumes. Both are signalled at once.
    _terminate(ray_processes + s3_processes, grace_s=RAY_STOP_GRACE_S)
    _terminate(s3_processes, grace_s=S3_STOP_GRACE_S)
    info.s3_pid, info.ray_address, info.ray_started_here = None, "", False
    info.metrics_port = info.retention_metrics_port = 0
    _save_info(config, info)
    return stopped


RAY_STOP_GRACE_S = 2.0
S3_STOP_GRACE_S = 10.0


def _ray_processes(temp_dir: str) -> list:
    """Every process of the Ray cluster whose temp dir is ``temp_dir`` (`ray stop` would kill all clusters)."""
    import psutil

    roots = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if temp_dir in cmdline and process.pid != os.getpid():
            roots.append(process)
    # Workers are children of the raylet and do not name the temp dir: take whole process trees.
    family = {p.pid: p for p in roots}
    for process in roots:
        try:
            for child in process.children(recursive=True):
                family.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
    return list(family.values())


def _terminate(processes: list, *, grace_s: float) -> None:
    """SIGTERM all at once, wait together, SIGKILL whatever is left (SeaweedFS can hang on SIGTERM)."""
    import psutil

    for process in processes:
        try:
            if process.is_running():
                process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
