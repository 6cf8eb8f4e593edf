"""Starting the local stack safely, without starting Ray: Ray's private temp folder, free and distinct
ports, `ray start` tried again with other ports when one was taken, and connect_ray from many threads.

`ray start` is played by a small fake (a script that binds the ports it is given, as Ray's servers do,
and leaves a process holding them, naming the temp dir in its command line as Ray's processes do);
every process it starts is killed by pid at the end of each test.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from headshots import stack
from headshots.config import Config

# The ports Ray listens on (the head's --port, raylet, agents, client server, metrics).
LISTEN_PORT_FLAGS = ("port", "node-manager-port", "object-manager-port", "ray-client-server-port",
                     "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                     "metrics-export-port")

FAKE_RAY = '''#!{python}
import json, os, signal, socket, subprocess, sys, time

LISTEN = {listen!r}
arguments = sys.argv[1:]
if arguments[0] == "hold":  # the fake cluster: listen on the ports, then wait to be killed
    ports, ready, taken_log = [int(p) for p in arguments[1].split(",")], arguments[2], arguments[3]
    held = []
    for port in ports:
        server = socket.socket()
        try:
            server.bind(("127.0.0.1", port))
        except OSError as error:  # as Ray's dashboard agent: log it, keep the others
            with open(taken_log, "a") as log:
                log.write(f"Failed to bind to port {{port}}: [Errno 98] Address already in use: {{error}}\\n")
            continue
        server.listen()
        held.append(server)
    open(ready, "w").write("ready")
    while True:
        signal.pause()

options = dict(a[2:].split("=", 1) for a in arguments if a.startswith("--") and "=" in a)
mode = os.environ.get("FAKE_RAY_MODE", "like-gcs")
with open(os.environ["FAKE_RAY_CALLS"], "a") as calls:
    calls.write(json.dumps({{"options": options, "pid": os.getpid()}}) + "\\n")
if mode == "broken":
    print("something else went wrong")
    sys.exit(1)
ports = [int(options[flag]) for flag in LISTEN]
if mode == "like-gcs":  # a taken port: "Address already in use" and exit 1, as Ray's GCS does
    for port in ports:
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            print(f"grpc_server: bind 127.0.0.1:{{port}}: [Errno 98] Address already in use")
            sys.exit(1)
        finally:
            probe.close()
temp_dir = options["temp-dir"]
logs = os.path.join(temp_dir, "session_2026-01-01_00-00-00_%d" % os.getpid(), "logs")
os.makedirs(logs)
ready = os.path.join(logs, "ready")
holder = subprocess.Popen([sys.executable, __file__, "hold", ",".join(map(str, ports)), ready,
                           os.path.join(logs, "dashboard_agent.log"), f"--temp-dir={{temp_dir}}"],
                          start_new_session=True, stdin=subprocess.DEVNULL)
with open(os.environ["FAKE_RAY_CALLS"], "a") as calls:
    calls.write(json.dumps({{"holder": holder.pid}}) + "\\n")
while not os.path.exists(ready) and holder.poll() is None:
    time.sleep(0.01)
sys.exit(0)
'''


def wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def config(tmp_path) -> Config:
    return Config.from_dict({"home": str(tmp_path / "home")})


@pytest.fixture
def fake_ray(tmp_path, monkeypatch):
    """The fake `ray` in place of the real one; yields a function returning the calls recorded."""
    script = tmp_path / "bin" / "ray"
    script.parent.mkdir()
    script.write_text(FAKE_RAY.format(python=sys.executable, listen=list(LISTEN_PORT_FLAGS)))
    script.chmod(0o755)
    calls_path = tmp_path / "ray-calls.jsonl"
    calls_path.touch()
    # The stack runs the `ray` beside the interpreter: an interpreter whose neighbour is the fake.
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setattr(stack, "RAY_TEMP_ROOT", tmp_path / "tmp", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("FAKE_RAY_CALLS", str(calls_path))

    def calls() -> list[dict]:
        return [json.loads(line) for line in calls_path.read_text().splitlines()]

    yield calls
    holders = []
    for call in calls():
        if "holder" in call and psutil.pid_exists(call["holder"]):
            holders.append(psutil.Process(call["holder"]))
    for holder in holders:
        holder.kill()
    psutil.wait_procs(holders, timeout=10)


@pytest.fixture
def occupied_port():
    """A port another process (this test) listens on."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


def _first_pick_includes(monkeypatch, port: int, *, every_time: bool = False) -> None:
    """Make the port picker hand out ``port`` (as if it was free when chosen and taken just after)."""
    real_pick = stack._pick_free_ports
    picks = {"n": 0}

    def pick(count, *, exclude=frozenset()):
        picks["n"] += 1
        if picks["n"] == 1 or every_time:
            return [port, *real_pick(count - 1, exclude=set(exclude) | {port})]
        return real_pick(count, exclude=exclude)

    monkeypatch.setattr(stack, "_pick_free_ports", pick)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- Ray's temp dir ---------------------------------------------------------------------------------

def test_private_directory_is_created_0700(tmp_path):
    path = stack._private_directory(tmp_path / "fresh")
    status = os.lstat(path)
    assert stat.S_ISDIR(status.st_mode) and stat.S_IMODE(status.st_mode) == 0o700
    assert status.st_uid == os.geteuid()
    assert stack._private_directory(path) == path  # ours and private: used again


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o770, 0o701])
def test_an_existing_directory_open_to_others_is_refused(tmp_path, mode):
    path = tmp_path / "planted"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(stack.StackError, match="group/other permissions") as refused:
        stack._private_directory(path)
    assert str(path) in str(refused.value) and "rm -rf" in str(refused.value)
    assert stat.S_IMODE(os.lstat(path).st_mode) == mode  # left as it was: not ours to fix


def test_a_symlink_or_a_file_in_its_place_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(stack.StackError, match="symbolic link"):
        stack._private_directory(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(stack.StackError, match="not a directory"):
        stack._private_directory(tmp_path / "file")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path):
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(stack.StackError, match="belongs to uid 65534"):
        stack._private_directory(path)


def test_ray_temp_dir_sits_in_a_private_folder_with_a_short_path(config, tmp_path, monkeypatch):
    private, temp_dir = stack._ray_temp_paths(config)
    assert temp_dir.parent == private and private.parent == Path("/tmp")
    # Ray's longest socket path below its temp dir must fit a unix socket name (107 bytes).
    assert len(f"{temp_dir}/session_2026-12-02_13-35-24_795424_4978/sockets/plasma_store") < 107
    monkeypatch.setattr(stack, "RAY_TEMP_ROOT", tmp_path)
    temp_dir = stack._ray_temp_dir(config)
    assert stat.S_IMODE(os.lstat(temp_dir.parent).st_mode) == 0o700


def test_ray_start_is_refused_in_a_planted_temp_folder(config, fake_ray):
    private, _ = stack._ray_temp_paths(config)
    private.mkdir()
    private.chmod(0o777)
    with pytest.raises(stack.StackError, match=str(private)):
        stack._start_ray_head(config)
    assert fake_ray() == [], "`ray start` ran in a folder other users can write"


# --- ports ------------------------------------------------------------------------------------------

def test_picked_ports_are_distinct_free_and_not_excluded(occupied_port):
    for _ in range(50):
        ports = stack._pick_free_ports(9)
        assert len(set(ports)) == 9 and occupied_port not in ports
        again = stack._pick_free_ports(9, exclude=set(ports))
        assert not set(again) & set(ports)
    for port in ports:  # each one is free right now
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_ray_start_tries_again_with_other_ports_when_one_was_taken(config, fake_ray, occupied_port, monkeypatch):
    _first_pick_includes(monkeypatch, occupied_port)
    address, temp_dir = stack._start_ray_head(config)
    starts = [call["options"] for call in fake_ray() if "options" in call]
    assert len(starts) == 2
    assert occupied_port in {int(v) for k, v in starts[0].items() if k.endswith("port")}
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1" and int(port) != occupied_port and int(port) == int(starts[1]["port"])
    assert starts[1]["node-ip-address"] == "127.0.0.1" and starts[1]["temp-dir"] == temp_dir
    second_ports = {int(starts[1][flag]) for flag in LISTEN_PORT_FLAGS}
    assert occupied_port not in second_ports and len(second_ports) == len(LISTEN_PORT_FLAGS)
    assert all(_listening(p) for p in second_ports)


def test_a_port_taken_after_ray_start_returned_is_noticed_and_the_start_repeated(
        config, fake_ray, occupied_port, monkeypatch):
    """As with Ray's dashboard agent: `ray start` exits 0, the agent cannot bind and logs it."""
    monkeypatch.setenv("FAKE_RAY_MODE", "like-agent")
    _first_pick_includes(monkeypatch, occupied_port)
    address, _ = stack._start_ray_head(config)
    holders = [call["holder"] for call in fake_ray() if "holder" in call]
    assert len(holders) == 2
    assert not psutil.pid_exists(holders[0]) or psutil.Process(holders[0]).status() == psutil.STATUS_ZOMBIE, \
        "the failed attempt's processes were left running"
    assert int(address.rpartition(":")[2]) != occupied_port and _listening(int(address.rpartition(":")[2]))


def test_ray_start_gives_up_with_a_clear_error_when_ports_keep_being_taken(
        config, fake_ray, occupied_port, monkeypatch):
    _first_pick_includes(monkeypatch, occupied_port, every_time=True)
    with pytest.raises(stack.StackError, match="took ports") as failed:
        stack._start_ray_head(config)
    assert "ray-start.log" in str(failed.value)
    assert len([call for call in fake_ray() if "options" in call]) == stack.RAY_START_ATTEMPTS


def test_a_failure_that_is_not_a_port_is_not_retried(config, fake_ray, monkeypatch):
    monkeypatch.setenv("FAKE_RAY_MODE", "broken")
    with pytest.raises(stack.StackError, match="exit 1"):
        stack._start_ray_head(config)
    assert len(fake_ray()) == 1


# --- connect_ray from many threads ---------------------------------------------------------------------

class WatchedLock:
    """A lock that counts the threads waiting for it."""

    def __init__(self):
        self._lock, self._count = threading.Lock(), threading.Lock()
        self.waiting = 0

    def __enter__(self):
        with self._count:
            self.waiting += 1
        self._lock.acquire()
        with self._count:
            self.waiting -= 1
        return self

    def __exit__(self, *exc):
        self._lock.release()


def test_connect_ray_from_many_threads_initialises_ray_once(tmp_path, monkeypatch):
    import ray
    from ray._private import ray_constants

    # connect_ray sets these; put them back afterwards.
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    config = Config.from_dict({"home": str(tmp_path / "home"), "ray": {"address": "127.0.0.1:6379"}})
    threads_count = 8
    lock = WatchedLock()
    monkeypatch.setattr(stack, "_RAY_CONNECT_LOCK", lock, raising=False)
    initialized = threading.Event()
    inits, inside = [], {"n": 0}
    count = threading.Lock()

    def fake_init(*args, **kwargs):
        with count:
            inside["n"] += 1
            inits.append(kwargs)
        # Stay in ray.init until every other thread is either inside it too (a race) or waiting to
        # get in: that is when a second ray.init would happen, if connect_ray allowed it.
        wait_until(lambda: inside["n"] + lock.waiting >= threads_count, "every thread to reach connect_ray")
        initialized.set()

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", initialized.is_set)
    errors = []

    def connect():
        try:
            stack.connect_ray(config)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=connect) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(inits) == 1, f"ray.init ran {len(inits)} times"
    assert inits[0]["address"] == "127.0.0.1:6379" and inits[0]["_node_ip_address"] == "127.0.0.1"
    assert ray_constants.ENABLE_RAY_CLUSTER is False  # loopback stays loopback in this process


def test_connect_ray_leaves_other_clusters_alone(tmp_path, monkeypatch):
    """A deployment's Ray (not loopback) keeps Ray's normal node address."""
    import ray
    from ray._private import ray_constants

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    inits = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: inits.append(kwargs))
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(inits))
    stack.connect_ray(Config.from_dict({"home": str(tmp_path / "home"), "ray": {"address": "10.0.0.5:6379"}}))
    assert len(inits) == 1 and "_node_ip_address" not in inits[0]
    assert ray_constants.ENABLE_RAY_CLUSTER is True
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
