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

The stack heals itself: ``up`` first diagnoses what runs (:func:`diagnose`): the store's process, Ray's GCS
port, the head's raylet (a raylet killed, with its agents, leaves a GCS that still answers but has no alive
node), the GCS's own view of its nodes, and the two named actors. A dead or half-dead Ray head is stopped
completely (every process of its temp dir, by pid) and started again; a missing actor is re-created; the
store and its data and credentials are kept. A supervisor (``headshots supervise``, started by ``up``, pid
in ``stack.json``, log in ``supervisor.log``) runs the same check every few seconds and runs ``up`` when
something is missing; ``down`` stops it first. It never restarts a stack whose store is not running.
"""

from __future__ import annotations

import base64
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
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
# ...and two with no flag, set through the environment: the metrics servers of the autoscaler monitor and
# of the dashboard head. Their fixed defaults (44217, 44227) are held by any other Ray head on the machine,
# and a process that cannot bind one logs "Address already in use" (the start is then taken as failed).
_RAY_ENVIRONMENT_PORTS = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")
# What Ray's processes log when a port they were given is taken.
_PORT_TAKEN_SIGNATURES = ("address already in use", "errno 98", "eaddrinuse")
_RAY_CONNECT_LOCK = threading.Lock()
# The stack's named actors (cluster.actors.COORDINATOR_NAME and RETENTION_NAME; not imported here, so that
# the supervisor's check imports neither torch nor the coordinator).
COORDINATOR_ACTOR, RETENTION_ACTOR = "headshots-coordinator", "headshots-retention"
STACK_ACTOR_NAMES = (COORDINATOR_ACTOR, RETENTION_ACTOR)
# How long the health check waits for the GCS to answer a query (an open port that does not answer
# within this is "unresponsive").
GCS_QUERY_TIMEOUT_S = 10.0
# `up` and `down` hold $HEADSHOTS_HOME/stack.lock; a second one waits this long for the first.
STACK_LOCK_TIMEOUT_S = 900.0
# The supervisor: seconds between checks, the longest wait after failed restarts, how many checks in a
# row must find the GCS unresponsive before it restarts (a dead process is acted on at once), and the
# longest one restart (`headshots up`) may take.
SUPERVISE_INTERVAL_S = 5.0
SUPERVISE_MAX_BACKOFF_S = 300.0
SUPERVISE_CONFIRM_UNRESPONSIVE = 2
SUPERVISE_HEAL_TIMEOUT_S = 900.0
SUPERVISOR_STOP_GRACE_S = 5.0
SUPERVISOR_CONFIG_FILE = "supervisor-config.json"
SUPERVISOR_LOG_FILE = "supervisor.log"


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
    # The supervisor's pid (None: none started, or stopped by `down`), and its seconds between checks.
    supervisor_pid: int | None = None
    supervisor_interval_s: float = 0.0
    # Times the Ray head was found dead or half-dead and started again, and when last.
    ray_restarts: int = 0
    ray_restarted_at: float = 0.0


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
    """Write stack.json whole (a temporary file renamed into place: the supervisor reads it at any time)."""
    path = _home(config) / "stack.json"
    temporary = path.with_name(f".stack.json.{os.getpid()}.{secrets.token_hex(4)}")
    temporary.write_text(json.dumps(dataclasses.asdict(info), indent=1))
    os.replace(temporary, path)


@contextlib.contextmanager
def _stack_lock(config: Config, *, timeout_s: float = STACK_LOCK_TIMEOUT_S):
    """Exclusive hold on the stack (``$HEADSHOTS_HOME/stack.lock``) for ``up`` and ``down``, so that the
    supervisor's restart, an operator's ``up`` and ``down`` never run at once. The lock goes with the
    process: a killed holder releases it (and the descriptor is not inherited by what ``up`` starts)."""
    descriptor = os.open(_home(config) / "stack.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(f"another `headshots up` or `down` has held {config.home_path / 'stack.lock'} "
                                     f"for over {timeout_s:.0f} s; try again when it has finished") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(descriptor)  # releases the lock


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


# --- health: what runs, what is missing ---------------------------------------------------------

@dataclass(frozen=True)
class StackHealth:
    """What :func:`diagnose` found.

    ``store``: "ok", "down" or "external" (store.endpoint configured). ``ray``: "ok"; "down" (nothing
    answers on the recorded GCS address, or none recorded); "half-dead" (the GCS answers but the head's
    raylet is not running or the GCS knows no alive node: a dead node); "unresponsive" (the GCS port is
    open but a query is not answered); or "external" (ray.address configured). ``missing_actors``: the
    stack actors that do not exist (or are dead), checked only when Ray is "ok".
    """

    store: str
    ray: str
    missing_actors: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.store != "down" and self.ray in ("ok", "external") and not self.missing_actors

    @property
    def ray_needs_restart(self) -> bool:
        return self.ray in ("down", "half-dead", "unresponsive")


class StackProbe:
    """The questions :func:`diagnose` asks about a running stack (the real answers: :class:`_LocalProbe`;
    unit tests pass fakes). ``alive_node`` and ``live_actor_names`` return None when they cannot be asked
    (another Ray version without that call) and raise when the GCS does not answer."""

    def store_running(self) -> bool:
        raise NotImplementedError

    def gcs_port_open(self) -> bool:
        raise NotImplementedError

    def raylet_running(self) -> bool:
        raise NotImplementedError

    def alive_node(self) -> bool | None:
        raise NotImplementedError

    def live_actor_names(self) -> set[str] | None:
        raise NotImplementedError


def diagnose(config: Config, info: StackInfo | None, probe: StackProbe) -> StackHealth:
    """The local stack's health from ``probe``'s answers (only the parts this config runs locally).

    Ray is asked in order of cost and stops at the first failure: the GCS port, the head's raylet process
    (found at once when killed; the GCS notices only after its health checks), then the GCS itself (an
    alive node of this temp dir, then the named actors in the stack's namespace).
    """
    problems: list[str] = []
    if config.store.endpoint:
        store = "external"
    elif info is None or not info.s3_pid or not probe.store_running():
        store = "down"
        problems.append("the S3 server is not running")
    else:
        store = "ok"
    missing: tuple[str, ...] = ()
    address = info.ray_address if info else ""
    if config.ray.address:
        ray_state = "external"
    elif not address:
        ray_state = "down"
        problems.append("no Ray head is recorded")
    elif not probe.gcs_port_open():
        ray_state = "down"
        problems.append(f"Ray's GCS at {address} does not accept connections")
    elif not probe.raylet_running():
        ray_state = "half-dead"
        problems.append(f"Ray's GCS at {address} is up but the head's raylet is not running (the node died)")
    else:
        ray_state = "ok"
        try:
            alive = probe.alive_node()
            names = probe.live_actor_names() if alive is not False else None
        except Exception as error:  # noqa: BLE001 (any failure to answer is the finding)
            ray_state = "unresponsive"
            problems.append(f"Ray's GCS at {address} does not answer ({type(error).__name__}: {error})")
        else:
            if alive is False:
                ray_state = "half-dead"
                problems.append(f"Ray's GCS at {address} has no alive node")
            elif names is not None:
                missing = tuple(name for name in STACK_ACTOR_NAMES if name not in names)
                problems.extend(f"the {name} actor does not exist" for name in missing)
    return StackHealth(store=store, ray=ray_state, missing_actors=missing, problems=tuple(problems))


_GCS_CLIENTS: dict[str, Any] = {}
_GCS_CLIENTS_LOCK = threading.Lock()


def _gcs_client(address: str):
    """A GCS client for ``address`` (kept: the supervisor asks every few seconds), or None when this Ray
    has no such client. Ask only after the port was found open: against a closed port it waits ~40 s."""
    with _GCS_CLIENTS_LOCK:
        if address not in _GCS_CLIENTS:
            try:
                from ray._raylet import InnerGcsClient
            except ImportError:
                return None
            if not hasattr(InnerGcsClient, "standalone"):
                return None
            _GCS_CLIENTS.clear()  # another address: the old head is gone
            _GCS_CLIENTS[address] = InnerGcsClient.standalone(address, None, int(GCS_QUERY_TIMEOUT_S * 1000))
        return _GCS_CLIENTS[address]


def _run_coroutine(coroutine_function):
    """Run an async GCS call to completion from sync code, also when this thread has a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        return executor.submit(lambda: asyncio.run(coroutine_function())).result()


def _alive_process(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


class _LocalProbe(StackProbe):
    """Asks the processes of this machine and the stack's own GCS."""

    def __init__(self, config: Config, info: StackInfo | None):
        self.config = config
        self.info = info or StackInfo()
        self.temp_dir = self.info.ray_temp_dir or str(_ray_temp_paths(config)[1])

    def store_running(self) -> bool:
        return _store_process_running(self.info)

    def gcs_port_open(self) -> bool:
        return _ray_alive(self.info)

    def raylet_running(self) -> bool:
        return bool(_raylet_processes(self.temp_dir))

    def _client(self):
        # The stack's token, as connect_ray sets it (the CLI sets it before ray is imported).
        os.environ.update(_ray_token_environment(self.config))
        return _gcs_client(self.info.ray_address)

    def alive_node(self) -> bool | None:
        client = self._client()
        if client is None:
            return None
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        nodes = client.get_all_node_info(timeout=GCS_QUERY_TIMEOUT_S,
                                         state_filter=GcsNodeInfo.GcsNodeState.Value("ALIVE"))
        # This stack's node: its temp dir (an older Ray without the field: any alive node).
        return any(getattr(node, "temp_dir", "") in ("", self.temp_dir) for node in nodes.values())

    def live_actor_names(self) -> set[str] | None:
        client = self._client()
        if client is None or not hasattr(client, "async_get_all_actor_info"):
            return None
        from ray.core.generated.gcs_pb2 import ActorTableData

        async def actors():
            return await client.async_get_all_actor_info(timeout=GCS_QUERY_TIMEOUT_S)

        dead = ActorTableData.ActorState.Value("DEAD")
        return {actor.name for actor in _run_coroutine(actors).values()
                if actor.state != dead and actor.ray_namespace == self.config.ray.namespace and actor.name}


def _store_process_running(info: StackInfo) -> bool:
    """The recorded S3 server runs (a process of that pid that is the `weed` server, not a zombie)."""
    import psutil

    if not info.s3_pid:
        return False
    try:
        process = psutil.Process(info.s3_pid)
        arguments = " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return _alive_process(process) and "weed" in arguments


def _raylet_processes(temp_dir: str) -> list:
    """The running raylets of the Ray cluster whose temp dir is ``temp_dir``."""
    import psutil

    inside = temp_dir.rstrip("/") + "/"  # a path under it (not a sibling such as ".../ray2")
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            arguments = process.info["cmdline"] or []
            name = process.info["name"] or ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if (name == "raylet" or (arguments and Path(arguments[0]).name == "raylet")) \
                and any(inside in argument for argument in arguments) and _alive_process(process):
            found.append(process)
    return found


def health(config: Config, info: StackInfo | None = None) -> StackHealth:
    """Diagnose the running local stack (see :func:`diagnose`)."""
    info = info if info is not None else load_info(config)
    return diagnose(config, info, _LocalProbe(config, info))


def is_up(config: Config) -> bool:
    return health(config).healthy


def _ray_alive(info: StackInfo) -> bool:
    """Whether the recorded GCS port accepts connections (not enough on its own: see :func:`diagnose`)."""
    if not info.ray_address:
        return False
    host, _, port = info.ray_address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _port_free(host: str, port: int) -> bool:
    if not port:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False


# --- up -----------------------------------------------------------------------------------------

@dataclass
class UpResult:
    info: StackInfo
    # What this call started or restarted, in words (empty: the stack was whole already).
    actions: list[str] = dataclasses.field(default_factory=list)
    health: StackHealth | None = None


def up(config: Config, **options: Any) -> StackInfo:
    """Start or heal whatever part of the local stack is missing (see :func:`start_or_heal`). Idempotent."""
    return start_or_heal(config, **options).info


def start_or_heal(config: Config, *, supervise: bool = True, supervise_interval_s: float | None = None,
                  for_supervisor: int | None = None) -> UpResult:
    """Start whatever part of the local stack is missing or dead, then its actors. Idempotent.

    A Ray head that is down, half-dead (GCS up, node dead) or unresponsive is stopped completely (every
    process of its temp dir, by pid) and started again; the store, its data and credentials are kept,
    and the actors are created again (the coordinator resumes running batches from the store). A live
    head with a missing actor just gets the actor. Then a supervisor is started unless one runs
    (``supervise``; only when both store and Ray are local), checking every ``supervise_interval_s``
    (default: as the last one did, else :data:`SUPERVISE_INTERVAL_S`).

    ``for_supervisor``: the call is the supervisor's (that pid): it does nothing unless that supervisor
    is still the recorded one (``down`` clears it), and it never starts the store.
    """
    from storage.seaweed import start_embedded_s3

    home = _home(config)
    with _stack_lock(config):
        info = load_info(config) or StackInfo()
        if for_supervisor is not None and info.supervisor_pid != for_supervisor:
            raise StackError("the stack was stopped (or has another supervisor): the supervisor leaves it alone")
        found = health(config, info)
        actions: list[str] = []
        if found.store == "down":
            if for_supervisor is not None:
                raise StackError("the S3 server is not running (stopped on purpose, or it died): the supervisor "
                                 "does not restart the stack; `headshots up` does")
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
            actions.append(f"started the S3 server (pid {server.pid})")
            _save_info(config, info)
        if found.ray_needs_restart:
            was_running = bool(info.ray_address)
            leftovers = _stop_ray_cluster(config, info)
            _save_info(config, info)  # no address of a cluster that is gone, should the start below fail
            if leftovers:
                actions.append(f"stopped what was left of the Ray head ({leftovers} processes)")
            old_ports = (info.metrics_port, info.retention_metrics_port)
            info.ray_address, info.ray_temp_dir = _start_ray_head(config)
            info.ray_started_here = True
            # The metrics ports stay the same when still free (scrape configs keep working).
            info.metrics_port, info.retention_metrics_port = (
                port if _port_free(config.metrics.host, port) else 0 for port in old_ports)
            if was_running:
                info.ray_restarts += 1
                info.ray_restarted_at = time.time()
                actions.append(f"restarted the Ray head ({'; '.join(p for p in found.problems if 'Ray' in p)})")
            else:
                actions.append("started the Ray head")
            _save_info(config, info)
        else:
            actions.extend(f"re-created the {name} actor" for name in found.missing_actors)
        _start_actors(config, info)
        info.started_at = info.started_at or time.time()
        if supervise and for_supervisor is None and not config.store.endpoint and not config.ray.address:
            interval_s = supervise_interval_s or info.supervisor_interval_s or SUPERVISE_INTERVAL_S
            pid = _ensure_supervisor(config, info, interval_s=interval_s)
            if pid is not None:
                actions.append(f"started the supervisor (pid {pid})")
        _save_info(config, info)
        return UpResult(info=info, actions=actions, health=found)


def _start_actors(config: Config, info: StackInfo) -> None:
    """Buckets and lifecycle rules, then the coordinator and the retention controller (created if absent)."""
    from storage.store import ArtifactStore

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


def _stop_ray_cluster(config: Config, info: StackInfo) -> int:
    """Stop every process of this stack's Ray cluster (its temp dir's, and the client server of its
    recorded GCS address), by pid; how many there were. Never `ray stop` (it stops every cluster)."""
    temp_dir = info.ray_temp_dir or str(_ray_temp_paths(config)[1])
    processes = [p for p in _ray_processes(temp_dir, address=info.ray_address) if _alive_process(p)]
    _terminate(processes, grace_s=RAY_STOP_GRACE_S)
    info.ray_address = ""
    return len(processes)


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
        chosen = _pick_free_ports(len(flags) + len(_RAY_ENVIRONMENT_PORTS), exclude=tried)
        tried.update(chosen)
        ports = dict(zip(flags, chosen))
        attempt_environment = {**environment, **{variable: str(port) for variable, port in
                                                 zip(_RAY_ENVIRONMENT_PORTS, chosen[len(flags):])}}
        outcome = _start_ray_head_once(config, binary, temp_dir, ports, attempt_environment, log_path)
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
    """Stop the local stack's processes (only ours: other Ray clusters on the machine are left alone).

    The supervisor is stopped first, so that it cannot start again what is being stopped."""
    info = load_info(config)
    stopped: dict[str, Any] = {"s3": False, "ray": False, "supervisor": False}
    if info is None:
        return stopped
    stopped["supervisor"] = _stop_supervisor(config, info)
    with _stack_lock(config):
        info = load_info(config) or info
        stopped["supervisor"] = _stop_supervisor(config, info) or stopped["supervisor"]
        import psutil

        ray_processes: list[psutil.Process] = []
        s3_processes: list[psutil.Process] = []
        if info.ray_started_here and info.ray_temp_dir:
            ray_processes = _ray_processes(info.ray_temp_dir, address=info.ray_address)
            stopped["ray"] = bool(ray_processes)
        if info.s3_pid and _store_process_running(info):
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
        info.supervisor_pid = None
        _save_info(config, info)
    return stopped


# --- the supervisor -----------------------------------------------------------------------------

def _supervisor_config_path(config: Config) -> Path:
    return config.home_path.resolve() / SUPERVISOR_CONFIG_FILE


def _supervisor_process(config: Config, info: StackInfo):
    """The recorded supervisor's process if it runs (checked to be `headshots supervise` of this home,
    so a reused pid is never taken for it), else None."""
    import psutil

    if not info.supervisor_pid:
        return None
    try:
        process = psutil.Process(info.supervisor_pid)
        arguments = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if "supervise" in arguments and str(_supervisor_config_path(config)) in arguments and _alive_process(process):
        return process
    return None


def _ensure_supervisor(config: Config, info: StackInfo, *, interval_s: float) -> int | None:
    """Start the supervisor unless it runs; its pid when started now (recorded in ``info``), else None.

    It gets the config this call was given, as a file (0600: it may hold secrets) in the private home,
    so that it restarts the stack exactly as it was started, whatever file or environment that came from.
    """
    if _supervisor_process(config, info) is not None:
        return None
    path = _supervisor_config_path(config)
    home = config.home_path.resolve()  # the supervisor runs in the home: a relative one would not be found
    _write_private(path, json.dumps(config.replace(home=str(home)).to_dict(), indent=1))
    log_path = _home(config) / SUPERVISOR_LOG_FILE
    descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "headshots.cli", "--config", str(path), "supervise",
             f"--interval={interval_s:g}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=str(home), env=_supervisor_environment())
    info.supervisor_pid, info.supervisor_interval_s = process.pid, interval_s
    return process.pid


def _supervisor_environment() -> dict[str, str]:
    """This process's environment, with the folder this code is imported from first on the path: the
    supervisor (and the `up` it runs) run the same code as the `up` that started it, installed or not."""
    code_root = str(Path(__file__).resolve().parent.parent)
    path = [code_root, *[entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}


def _stop_supervisor(config: Config, info: StackInfo) -> bool:
    """Stop the recorded supervisor and what it runs (a restart in progress), by pid."""
    import psutil

    process = _supervisor_process(config, info)
    if process is None:
        return False
    try:
        family = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    _terminate(family, grace_s=SUPERVISOR_STOP_GRACE_S)
    return True


class Supervisor:
    """The supervisor's policy, one check at a time (:meth:`step`); the process is :func:`supervise`.

    ``check()`` returns a :class:`StackHealth`; ``heal()`` runs ``headshots up`` for this supervisor and
    returns (succeeded, what it said); ``still_ours()`` is False once ``down`` ran or another supervisor
    was recorded; ``log(level, message)``.
    """

    def __init__(self, *, check, heal, still_ours, log, interval_s: float = SUPERVISE_INTERVAL_S,
                 max_backoff_s: float = SUPERVISE_MAX_BACKOFF_S,
                 confirm_unresponsive: int = SUPERVISE_CONFIRM_UNRESPONSIVE):
        self.check, self.heal, self.still_ours, self.log = check, heal, still_ours, log
        self.interval_s, self.max_backoff_s = interval_s, max_backoff_s
        self.confirm_unresponsive = confirm_unresponsive
        self.failures = 0  # restarts that failed in a row
        self.unresponsive = 0  # checks in a row that found the GCS unresponsive
        self.restarts = 0
        self.unhealthy = False

    def step(self) -> float | None:
        """One check (and a restart if needed); seconds until the next step, or None: stop supervising."""
        if not self.still_ours():
            self.log(logging.INFO, "the stack was stopped (`headshots down`) or has another supervisor: exiting")
            return None
        found = self.check()
        if found.healthy:
            if self.unhealthy:
                self.log(logging.INFO, "the stack is healthy again")
            self.unhealthy, self.failures, self.unresponsive = False, 0, 0
            return self.interval_s
        self.unhealthy = True
        if found.store == "down":
            # Stopped on purpose or died: not ours to tell apart, and `headshots up` restarts it all.
            self.log(logging.WARNING, "the S3 server is not running (stopped on purpose, or it died): the "
                     "supervisor does not restart a stack without its store; exiting (`headshots up` restarts "
                     "the stack and its supervisor)")
            return None
        if found.ray == "unresponsive":
            self.unresponsive += 1
            if self.unresponsive < self.confirm_unresponsive:
                self.log(logging.WARNING, "%s (check %d of %d before a restart)", "; ".join(found.problems),
                         self.unresponsive, self.confirm_unresponsive)
                return self.interval_s
        else:
            self.unresponsive = 0
        self.log(logging.WARNING, "unhealthy: %s; restarting what is missing", "; ".join(found.problems))
        succeeded, said = self.heal()
        if succeeded:
            self.restarts += 1
            self.failures, self.unresponsive = 0, 0
            self.log(logging.INFO, "restarted (%d so far): %s", self.restarts, said)
            return self.interval_s
        if not self.still_ours():
            self.log(logging.INFO, "the stack was stopped while restarting it: exiting")
            return None
        self.failures += 1
        delay = min(self.interval_s * 2 ** self.failures, self.max_backoff_s)
        self.log(logging.ERROR, "restart failed (%d in a row): %s; next try in %.0f s", self.failures, said, delay)
        return delay


def _heal_command(config: Config) -> list[str]:
    return [sys.executable, "-m", "headshots.cli", "--config", str(_supervisor_config_path(config)), "up",
            f"--for-supervisor={os.getpid()}"]


def _run_heal(config: Config) -> tuple[bool, str]:
    """`headshots up` for this supervisor, in a process of its own (a Ray driver cannot outlive the
    cluster it connected to); (succeeded, its last line of output)."""
    try:
        completed = subprocess.run(_heal_command(config), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                   timeout=SUPERVISE_HEAL_TIMEOUT_S, cwd=str(config.home_path.resolve()))
    except subprocess.TimeoutExpired:
        return False, f"`headshots up` did not finish within {SUPERVISE_HEAL_TIMEOUT_S:.0f} s"
    lines = [line for line in (completed.stdout + "\n" + completed.stderr).splitlines() if line.strip()]
    said = lines[-1] if lines else f"exit {completed.returncode}"
    if completed.returncode == 0:
        said = "; ".join(line.strip() for line in completed.stdout.splitlines() if line.strip()) or said
    return completed.returncode == 0, said


def supervise(config: Config, *, interval_s: float = SUPERVISE_INTERVAL_S) -> int:
    """The supervisor process (``headshots supervise``, started by ``up``): check the stack every
    ``interval_s`` and run ``up`` when something is missing, until ``down`` (or the store is gone)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s supervisor[%(process)d]: %(message)s",
                        stream=sys.stderr, force=True)
    log = logging.getLogger("headshots.supervisor")
    stop = threading.Event()

    def on_signal(number, _frame):
        log.info("stopping (signal %d)", number)
        stop.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # `up` records this pid while it holds the stack lock: wait for it to let go, then read it.
    with _stack_lock(config):
        pass

    def still_ours() -> bool:
        info = load_info(config)
        return info is not None and info.supervisor_pid == os.getpid()

    supervisor = Supervisor(check=lambda: health(config), heal=lambda: _run_heal(config), still_ours=still_ours,
                            log=log.log, interval_s=interval_s)
    log.info("supervising the stack in %s every %g s", config.home_path, interval_s)
    while not stop.is_set():
        try:
            delay = supervisor.step()
        except Exception as error:  # noqa: BLE001 (a failed check must not end the supervision)
            log.exception("check failed: %s", error)
            delay = interval_s
        if delay is None:
            return 0
        stop.wait(delay)
    return 0


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
