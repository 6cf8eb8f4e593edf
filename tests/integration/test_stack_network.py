"""The local stack listens on loopback only, and `headshots down` stops every process of it.

The stack is started as a user starts it (`headshots up` in a subprocess, under a private
$HEADSHOTS_HOME); the fixture stops it with `headshots down`, and then kills by pid anything of it
that is still there, also when a test failed. Listening sockets are read from `ss -ltnp` (iproute2).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import psutil
import pytest

from tests.local_stack import environment as _environment
from tests.local_stack import kill_by_pid, run_cli, stack_processes

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # the last: an IPv6 socket bound to IPv4 loopback

pytestmark = pytest.mark.skipif(shutil.which("ss") is None,
                                reason="`ss` is missing: install iproute2 (apt-get install -y iproute2)")


def listening_sockets() -> list[tuple[str, int, set[int]]]:
    """(local address, port, owning pids) of every listening TCP socket, from `ss -ltnpH`."""
    output = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=60).stdout
    sockets = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        host, _, port = fields[3].rpartition(":")
        host = host.strip("[]").split("%", 1)[0]  # "[::1]", "127.0.0.1%lo"
        sockets.append((host, int(port), {int(pid) for pid in re.findall(r"pid=(\d+)", line)}))
    return sockets


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack-network") / "home"
    seen: dict[int, str] = {}
    try:
        run_cli(home, "up", "--json")
        info = json.loads((home / "stack.json").read_text())
        seen.update(stack_processes(info))
        yield home, info, seen
    finally:
        info_path = home / "stack.json"
        before_down = json.loads(info_path.read_text()) if info_path.is_file() else {}
        seen.update(stack_processes(before_down))
        run_cli(home, "down", check=False, timeout=180)
        kill_by_pid(seen)


def test_the_stack_records_a_loopback_ray_address(stack):
    _, info, _ = stack
    host, _, port = info["ray_address"].rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0, info["ray_address"]
    assert info["s3_endpoint"].startswith("127.0.0.1:")


def test_no_process_of_the_stack_listens_beyond_loopback(stack):
    _, info, seen = stack
    processes = stack_processes(info)
    seen.update(processes)
    ours = [(host, port, processes[next(iter(pids & processes.keys()))])
            for host, port, pids in listening_sockets() if pids & processes.keys()]
    exposed = [f"{name} on {host}:{port}" for host, port, name in ours if host not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # The check saw the stack's sockets (not an empty list): Ray's GCS, S3, both metrics servers.
    ports = {port for _, port, _ in ours}
    expected = {int(info["ray_address"].rpartition(":")[2]), int(info["s3_endpoint"].rpartition(":")[2]),
                info["metrics_port"], info["retention_metrics_port"]}
    assert expected <= ports, f"{expected - ports} not found among the stack's listening ports {sorted(ports)}"
    names = set(processes.values())
    assert {"gcs_server", "raylet", "weed"} <= names, names


DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys, threading
    from headshots import stack
    from headshots.config import load_config

    config = load_config()
    # Ray reads its token settings when it is imported: set them first, as `headshots` does. Only
    # those: connect_ray itself must keep a process that already imported ray on loopback.
    os.environ.update({key: value for key, value in stack.ray_auth_environment(config).items()
                       if key.startswith("RAY_AUTH_")})
    import ray

    resolved = stack.effective_config(config)
    calls, errors = [], []
    real_init = ray.init

    def counting_init(*args, **kwargs):
        calls.append(threading.get_ident())
        return real_init(*args, **kwargs)

    ray.init = counting_init
    start = threading.Barrier(8)

    def connect():
        start.wait()
        try:
            stack.connect_ray(resolved)
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=connect) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    @ray.remote
    def answer():
        return 42

    result = ray.get(answer.remote(), timeout=120) if ray.is_initialized() else None
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    mine = [line.split()[3] for line in listening.splitlines() if f"pid={os.getpid()}," in line]
    print(json.dumps({"init_calls": len(calls), "errors": errors, "result": result, "listening": mine}))
    ray.shutdown()
""")


def test_a_driver_connects_once_from_many_threads_and_listens_on_loopback_only(stack):
    home, _, _ = stack
    completed = subprocess.run([sys.executable, "-c", DRIVER], env=_environment(home), cwd=home.parent,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["errors"] == [] and report["init_calls"] == 1, report
    assert report["result"] == 42
    assert report["listening"], "the driver listens on no port: the check would prove nothing"
    for address in report["listening"]:
        host = address.rpartition(":")[0].strip("[]").split("%", 1)[0]
        assert host in LOOPBACK, f"the driver listens on {address}"


def test_down_stops_every_process_of_the_stack(stack):
    """Last in this module: it stops the stack (the fixture's own `down` then finds nothing)."""
    home, info, seen = stack
    seen.update(stack_processes(info))
    processes = [psutil.Process(pid) for pid in list(seen) if psutil.pid_exists(pid)]
    assert processes
    run_cli(home, "down", "--json", timeout=180)
    _, alive = psutil.wait_procs(processes, timeout=30)
    left = [f"{p.pid} {' '.join(p.cmdline())[:150]}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running after `headshots down`: {left}"
