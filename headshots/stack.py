"""The local stack: an embedded S3 server and a Ray head, running in the background between CLI calls.

``headshots up`` starts what is not configured elsewhere and records it in ``$HEADSHOTS_HOME``:
- ``stack.json``: pids, endpoints, ports (no secrets);
- ``credentials.json`` (mode 0600): the generated S3 credentials;
- ``ray-auth-token`` (mode 0600): the Ray cluster's auth token (token auth stays on, even locally:
  Ray listens on loopback only, where every local user can reach it);
- ``master-key`` (mode 0600): the master key that wraps every person's data key (crypto-erasure),
  unless ``security.master_key`` is set. Losing it makes the stored person artifacts unreadable.
Every other command reads these back through :func:`connect`.

Everything the stack starts listens on 127.0.0.1 only: the S3 server (see ``storage/seaweed.py``) and
the Ray head, whose node address is loopback (``--node-ip-address=127.0.0.1`` with Ray's single-machine
mode, :data:`LOOPBACK_RAY_ENVIRONMENT`, which keeps Ray from swapping loopback for the routable address),
so GCS, raylet, agents, workers and drivers bind 127.0.0.1. Ray's sockets and logs live under a private
folder (0700, checked before every start: :func:`_private_directory`).
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
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headshots.config import Config

logger = logging.getLogger(__name__)

RAY_START_TIMEOUT_S = 120
# `ray start` attempts when a port it was given turns out taken (chosen free, then taken by another process).
RAY_START_ATTEMPTS = 3
LOOPBACK_IP = "127.0.0.1"
# Ray's single-machine mode: without it, Ray replaces 127.0.0.1 in --node-ip-address and in every
# address a driver passes to ray.init with the machine's routable address (and binds all interfaces).
LOOPBACK_RAY_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Where the private folder holding Ray's temp dir is made (short: Ray's unix socket paths must stay
# under ~107 characters).
RAY_TEMP_ROOT = Path("/tmp")
# The ports `ray start --head` gets, every one listened on by the head once it is up...
_RAY_LISTEN_PORT_FLAGS = ("port", "node-manager-port", "object-manager-port", "ray-client-server-port",
                          "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                          "metrics-export-port")
# ...and one it is given but does not open (the dashboard is off), so that it never falls back to 8265.
_RAY_OTHER_PORT_FLAGS = ("dashboard-port",)
# What Ray's processes log when a port they were given is taken.
_PORT_TAKEN_SIGNATURES = ("address already in use", "errno 98", "eaddrinuse")
_RAY_CONNECT_LOCK = threading.Lock()


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


def _ray_token_environment(config: Config) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_path(config))}


def ray_auth_environment(config: Config) -> dict[str, str]:
    """Environment for Ray servers and clients of the local stack: its token, and loopback only
    (:data:`LOOPBACK_RAY_ENVIRONMENT`). Set it before the process imports ray."""
    return {**_ray_token_environment(config), **LOOPBACK_RAY_ENVIRONMENT}


def _pick_free_ports(count: int, *, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``count`` distinct ports free on loopback now, none of them in ``exclude``.

    All probe sockets stay bound until every port is chosen, so the system never hands out one port
    twice (choosing one at a time can). A port can still be taken by another process before its
    server binds it: :func:`_start_ray_head` then starts again with other ports.
    """
    probes: list[socket.socket] = []
    chosen: list[int] = []
    try:
        for _ in range(count + len(exclude) + 64):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind((LOOPBACK_IP, 0))
            port = probe.getsockname()[1]
            if port not in exclude and port not in chosen:
                chosen.append(port)
                if len(chosen) == count:
                    return chosen
    finally:
        for probe in probes:
            probe.close()
    raise StackError(f"could not find {count} free ports on {LOOPBACK_IP}")


def _private_directory(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check that the existing one is a directory of ours that nobody
    else can enter. Raises StackError naming the path otherwise: under a shared /tmp another user may
    have made it first, to read or replace Ray's sockets and logs."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # the umask may have taken the owner's bits
    except FileExistsError:
        pass
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        raise StackError(f"{path} disappeared while the stack was starting; run the command again") from None
    problems = []
    if stat.S_ISLNK(status.st_mode):
        problems.append("is a symbolic link")
    elif not stat.S_ISDIR(status.st_mode):
        problems.append("is not a directory")
    if status.st_uid != os.geteuid():
        problems.append(f"belongs to uid {status.st_uid}, not to you (uid {os.geteuid()})")
    if stat.S_IMODE(status.st_mode) & 0o077:
        problems.append(f"has group/other permissions (mode {stat.S_IMODE(status.st_mode):04o}; it must be 0700)")
    if problems:
        raise StackError(
            f"refusing to use {path} for the local Ray cluster's sockets and logs: it {' and '.join(problems)}. "
            f"Another user may have made it to reach this stack's Ray. If it is yours and no stack uses it, "
            f"remove it (`rm -rf {path}`); otherwise set HEADSHOTS_HOME to another folder (the name derives from it)."
        )
    return path


def _ray_temp_paths(config: Config) -> tuple[Path, Path]:
    """(private folder, Ray's temp dir inside it) for this $HEADSHOTS_HOME; nothing is created.

    Ray makes its temp dir and everything under it world-writable (0777), so the temp dir sits in a
    private folder of ours. Ray puts unix sockets under its temp dir and their paths must stay under
    ~107 characters: the folder is short and derived from $HEADSHOTS_HOME (two homes never share one).
    """
    digest = hashlib.sha256(str(config.home_path.resolve()).encode()).hexdigest()[:12]
    private = RAY_TEMP_ROOT / f"hs-{digest}"
    return private, private / "ray"


def _ray_temp_dir(config: Config) -> Path:
    """Ray's temp dir, inside a private folder checked (or created 0700) now."""
    private, temp_dir = _ray_temp_paths(config)
    _private_directory(private)
    return temp_dir


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

    # Both metrics ports at once, so they differ.
    spare_ports = iter(_pick_free_ports(2))
    metrics_port = info.metrics_port or config.metrics.port or next(spare_ports)
    coordinator = get_or_create_coordinator(resolved, metrics_port=metrics_port)
    info.metrics_port = ray.get(coordinator.ping.remote())["metrics_port"] or metrics_port
    # The retention controller sweeps once as it starts, so time the stack was down is never skipped.
    retention_port = info.retention_metrics_port or config.metrics.retention_port or next(spare_ports)
    controller = get_or_create_retention_controller(resolved, metrics_port=retention_port)
    info.retention_metrics_port = ray.get(controller.ping.remote())["metrics_port"] or retention_port
    info.started_at = info.started_at or time.time()
    _save_info(config, info)
    return info


def _ray_binary() -> Path:
    ray_binary = Path(sys.executable).with_name("ray")
    if ray_binary.exists():
        return ray_binary
    found = shutil.which("ray")
    if not found:
        raise StackError("the `ray` command is not installed; run `pip install 'ray[default]'`")
    return Path(found)


def _start_ray_head(config: Config) -> tuple[str, str]:
    """Start the stack's Ray head on loopback; its (address, temp dir).

    Its ports are chosen free and distinct, but another process can take one before Ray binds it:
    such a start is stopped and tried again with other ports, up to RAY_START_ATTEMPTS times.
    """
    temp_dir = _ray_temp_dir(config)
    binary = _ray_binary()
    environment = dict(os.environ, **ray_auth_environment(config))
    log_path = _home(config) / "ray-start.log"
    tried: set[int] = set()
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        flags = _RAY_LISTEN_PORT_FLAGS + _RAY_OTHER_PORT_FLAGS
        ports = dict(zip(flags, _pick_free_ports(len(flags), exclude=tried)))
        tried.update(ports.values())
        outcome = _start_ray_head_once(config, binary, temp_dir, ports, environment, log_path)
        if outcome == "started":
            return f"{LOOPBACK_IP}:{ports['port']}", str(temp_dir)
        if outcome != "port taken":
            raise StackError(f"`ray start --head` failed ({outcome}); see {log_path}")
        logger.warning("a port given to `ray start` was taken by another process (attempt %d of %d)%s",
                       attempt, RAY_START_ATTEMPTS, "; trying other ports" if attempt < RAY_START_ATTEMPTS else "")
    raise StackError(
        f"`ray start --head` failed {RAY_START_ATTEMPTS} times because other processes took ports it was given "
        f"(each time chosen free just before); see {log_path}. Find what keeps opening ports with `ss -ltnp`, "
        "or set ray.address to a running cluster."
    )


def _start_ray_head_once(config: Config, binary: Path, temp_dir: Path, ports: dict[str, int],
                         environment: dict[str, str], log_path: Path) -> str:
    """One `ray start --head`: "started" once every port is listened on by the new cluster's processes;
    "port taken" if one of its processes could not bind a port (the cluster is stopped); else what failed."""
    command = [
        str(binary), "start", "--head", f"--node-ip-address={LOOPBACK_IP}", f"--num-gpus={config.ray.num_gpus}",
        "--include-dashboard=false", f"--dashboard-host={LOOPBACK_IP}", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", *(f"--{flag}={port}" for flag, port in ports.items()),
    ]
    if config.ray.num_cpus:
        command.append(f"--num-cpus={config.ray.num_cpus}")
    address = f"{LOOPBACK_IP}:{ports['port']}"
    expected = {ports[flag] for flag in _RAY_LISTEN_PORT_FLAGS}
    sessions_before = set(temp_dir.glob("session_2*")) if temp_dir.is_dir() else set()
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        output_from = log.tell()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                   stdin=subprocess.DEVNULL)

    def port_taken() -> bool:
        return _port_taken_logged(log_path, output_from, temp_dir, sessions_before)

    deadline = time.monotonic() + RAY_START_TIMEOUT_S
    outcome = ""
    while not outcome:
        code = process.poll()
        if code is not None and code != 0:
            outcome = f"exit {code}"
        elif code == 0:
            missing = expected - _listening_ports(_ray_processes(str(temp_dir), address=address))
            if not missing:
                return "started"
            if not _ray_processes(str(temp_dir), address=address):
                outcome = "its processes exited"
        if not outcome and port_taken():
            outcome = "port taken"
        if not outcome and time.monotonic() > deadline:
            outcome = f"not up within {RAY_START_TIMEOUT_S} s"
        if not outcome:
            time.sleep(0.2)
    if outcome != "port taken" and port_taken():
        outcome = "port taken"
    if process.poll() is None:
        process.kill()
    process.wait()
    _terminate(_ray_processes(str(temp_dir), address=address), grace_s=RAY_STOP_GRACE_S)
    return outcome


def _listening_ports(processes: list) -> set[int]:
    import psutil

    ports = set()
    for process in processes:
        try:
            connections = (getattr(process, "net_connections", None) or process.connections)(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        ports.update(c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN)
    return ports


def _port_taken_logged(log_path: Path, offset: int, temp_dir: Path, sessions_before: set[Path]) -> bool:
    """Whether `ray start`'s output (from ``offset``) or the logs of the sessions it made say a port was taken."""
    texts = []
    with open(log_path, "rb") as log:
        log.seek(offset)
        texts.append(log.read())
    for session in set(temp_dir.glob("session_2*")) - sessions_before:
        for path in (session / "logs").glob("*"):
            # The head's own processes; a worker's log would be about a worker port, not one of ours.
            if path.is_file() and path.suffix in (".out", ".err", ".log") and not path.name.startswith(
                    ("worker", "python-core-worker", "python-core-driver")):
                try:
                    texts.append(path.read_bytes())
                except OSError:
                    continue
    text = b"\n".join(texts).decode(errors="replace").lower()
    return any(signature in text for signature in _PORT_TAKEN_SIGNATURES)


def _is_loopback_address(address: str) -> bool:
    if "://" in address:
        return False  # a Ray client address (ray://): the client does not bind
    host = address.rpartition(":")[0].strip("[]")
    return host in (LOOPBACK_IP, "localhost", "::1")


def _keep_ray_on_loopback() -> None:
    """Ray's single-machine mode, for this process and whatever it starts (even if ray is imported)."""
    os.environ.update(LOOPBACK_RAY_ENVIRONMENT)
    from ray._private import ray_constants

    # Read once, when ray is imported: a process that imported it earlier needs the value itself.
    ray_constants.ENABLE_RAY_CLUSTER = False


def connect_ray(config: Config) -> None:
    """Connect this process to the stack's Ray cluster (idempotent, and safe from many threads at once:
    ray.init runs once, in whichever thread comes first; the others wait and return)."""
    import ray

    with _RAY_CONNECT_LOCK:
        if ray.is_initialized():
            return
        os.environ.update(_ray_token_environment(config))
        options: dict[str, Any] = {}
        if _is_loopback_address(config.ray.address):
            _keep_ray_on_loopback()
            options["_node_ip_address"] = LOOPBACK_IP
        ray.init(address=config.ray.address, namespace=config.ray.namespace, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False, **options)


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
        ray_processes = _ray_processes(info.ray_temp_dir, address=info.ray_address)
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


def _ray_processes(temp_dir: str, *, address: str = "") -> list:
    """Every process of the Ray cluster whose temp dir is ``temp_dir`` or whose GCS is at ``address``,
    with their process trees (`ray stop` would kill all clusters).

    The Ray client server names only the GCS address and outlives the `ray start` that started it (its
    parent), so it is found by its ``--address=<address>`` argument.
    """
    import psutil

    address_argument = f"--address={address}" if address else None
    roots = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            arguments = process.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if process.pid == os.getpid():
            continue
        if temp_dir in " ".join(arguments) or (address_argument and address_argument in arguments):
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
