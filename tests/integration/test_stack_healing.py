"""`headshots up` heals a half-dead local stack (issue #12), with real processes.

The stack is started as a user starts it (`headshots up` in a subprocess, private $HEADSHOTS_HOME), without
its supervisor so that only `up` heals here (the supervisor: tests/e2e/test_cli_supervisor.py). In order:
`up` on a healthy stack changes nothing; a coordinator removed for good is re-created on the same head;
the head's raylet SIGKILLed with its agents (the GCS still listens: the case that used to fail with
"ConnectionError: Failed to connect to Ray cluster") is restarted, keeping the store, its data and
credentials. Every process of the stack is killed by pid at the end, also when a test failed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
COORDINATOR, RETENTION = "headshots-coordinator", "headshots-retention"


def environment(home: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return dict(os.environ, HEADSHOTS_HOME=str(home), PYTHONPATH=path)


def run_cli(home: Path, *args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "headshots.cli", *args], env=environment(home),
                               cwd=home.parent, capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(f"headshots {' '.join(args)} exited {completed.returncode}:\n"
                             f"{completed.stdout}\n{completed.stderr}")
    return completed


def stack_info(home: Path) -> dict:
    path = home / "stack.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def stack_processes(info: dict) -> dict[int, str]:
    """pid -> name of every process of the stack: the S3 server, the supervisor, and every process of
    its Ray cluster (naming its temp dir, or its GCS address as the client server does), with their trees."""
    markers = [marker for marker in (info.get("ray_temp_dir"), f"--address={info.get('ray_address')}")
               if marker and not marker.endswith("=")]
    roots = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            arguments = process.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if process.pid != os.getpid() and any(m in argument for m in markers for argument in arguments):
            roots.append(process)
    for key in ("s3_pid", "supervisor_pid"):
        if info.get(key) and psutil.pid_exists(info[key]):
            roots.append(psutil.Process(info[key]))
    found: dict[int, str] = {}
    for root in roots:
        try:
            for process in [root, *root.children(recursive=True)]:
                found[process.pid] = process.name()
        except psutil.NoSuchProcess:
            continue
    return found


def kill_by_pid(pids) -> None:
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=15)


def wait_until(condition, what: str, timeout_s: float = 120.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(every_s)


def raylet_and_agents(info: dict) -> list[psutil.Process]:
    """The head's raylet (found by the stack's temp dir, as headshots.stack does) and its agents."""
    raylets = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            arguments = process.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if process.info["name"] == "raylet" and any(info["ray_temp_dir"] + "/" in a for a in arguments):
            raylets.append(process)
    assert len(raylets) == 1, f"expected one raylet of {info['ray_temp_dir']}, found {raylets}"
    agents = [child for child in raylets[0].children()
              if "DashboardAgent" in child.name() + " ".join(child.cmdline())
              or "RuntimeEnvAgent" in child.name() + " ".join(child.cmdline())]
    assert agents, "the raylet has no agents: the test would not kill what the issue describes"
    return [raylets[0], *agents]


def sigkill_raylet(info: dict) -> int:
    """SIGKILL the raylet and its agents (they fate-share); wait until they are gone; the raylet's pid."""
    victims = raylet_and_agents(info)
    for process in victims:
        process.send_signal(signal.SIGKILL)
    wait_until(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in victims),
               "the raylet and its agents are gone", timeout_s=60)
    return victims[0].pid


def gcs_port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


PING = textwrap.dedent("""
    import json, os, sys
    from headshots import stack
    from headshots.config import load_config

    config = load_config()
    os.environ.update(stack.ray_auth_environment(config))
    import ray

    stack.connect_ray(stack.effective_config(config))
    answers = {}
    for name in sys.argv[1:]:
        try:
            actor = ray.get_actor(name, namespace=config.ray.namespace)  # never creates one
        except ValueError:
            answers[name] = None
            continue
        answers[name] = ray.get(actor.ping.remote(), timeout=300)
    print(json.dumps(answers))
""")

KILL_FOR_GOOD = textwrap.dedent("""
    import os, sys
    from headshots import stack
    from headshots.config import load_config

    config = load_config()
    os.environ.update(stack.ray_auth_environment(config))
    import ray

    stack.connect_ray(stack.effective_config(config))
    ray.kill(ray.get_actor(sys.argv[1], namespace=config.ray.namespace), no_restart=True)
""")


def driver(home: Path, script: str, *args: str, timeout: int = 600) -> str:
    completed = subprocess.run([sys.executable, "-c", script, *args], env=environment(home), cwd=home.parent,
                               capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def ping(home: Path, *names: str) -> dict:
    return json.loads(driver(home, PING, *names).strip().splitlines()[-1])


def up(home: Path) -> dict:
    return json.loads(run_cli(home, "up", "--no-supervisor", "--json").stdout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack-healing") / "home"
    seen: dict[int, str] = {}
    try:
        first = up(home)
        seen.update(stack_processes(stack_info(home)))
        yield home, first, seen
    finally:
        seen.update(stack_processes(stack_info(home)))
        run_cli(home, "down", check=False, timeout=180)
        kill_by_pid(seen)


def test_up_on_a_healthy_stack_changes_nothing(stack):
    home, first, seen = stack
    assert [action.split(" (")[0] for action in first["actions"]] == ["started the S3 server", "started the Ray head"]
    assert first["supervisor_pid"] is None
    before = stack_info(home)
    pids = ping(home, COORDINATOR, RETENTION)
    again = up(home)
    assert again["actions"] == []
    after = stack_info(home)
    assert {k: after[k] for k in ("s3_pid", "ray_address", "metrics_port", "retention_metrics_port", "ray_restarts")} \
        == {k: before[k] for k in ("s3_pid", "ray_address", "metrics_port", "retention_metrics_port", "ray_restarts")}
    assert ping(home, COORDINATOR, RETENTION) == pids
    seen.update(stack_processes(after))


def test_a_coordinator_gone_for_good_is_recreated_on_the_same_head(stack):
    home, _, seen = stack
    before = stack_info(home)
    raylet = raylet_and_agents(before)[0].pid
    old = ping(home, COORDINATOR)[COORDINATOR]
    driver(home, KILL_FOR_GOOD, COORDINATOR)
    # Gone, and Ray will not bring it back.
    wait_until(lambda: ping(home, COORDINATOR)[COORDINATOR] is None, "the coordinator is gone", every_s=1)
    healed = up(home)
    assert healed["actions"] == [f"re-created the {COORDINATOR} actor"]
    after = stack_info(home)
    assert after["ray_address"] == before["ray_address"] and after["ray_restarts"] == before["ray_restarts"]
    assert raylet_and_agents(after)[0].pid == raylet
    answer = ping(home, COORDINATOR)[COORDINATOR]
    assert answer is not None and answer["pid"] != old["pid"]
    assert answer["metrics_port"] == before["metrics_port"]
    seen.update(stack_processes(after))


def test_up_restarts_a_head_whose_raylet_was_killed_and_keeps_the_store(stack):
    home, _, seen = stack
    from minio import Minio

    env = json.loads(run_cli(home, "env", "--json").stdout)
    credentials = (home / "credentials.json").read_text()
    store = Minio(env["s3_endpoint"], access_key=env["access_key"], secret_key=env["secret_key"], secure=False)
    marker, payload = f"_test/healing-{secrets.token_hex(4)}", secrets.token_bytes(64)
    from io import BytesIO

    store.put_object(env["buckets"]["state"], marker, BytesIO(payload), len(payload))
    before = stack_info(home)
    old_processes = stack_processes(before)
    seen.update(old_processes)

    killed = sigkill_raylet(before)
    # The half-dead stack of the issue: the GCS still accepts connections, the node is dead.
    assert gcs_port_open(before["ray_address"])

    healed = up(home)
    after = stack_info(home)
    seen.update(stack_processes(after))
    assert any(action.startswith("restarted the Ray head") and "raylet is not running" in action
               for action in healed["actions"]), healed["actions"]
    assert after["ray_restarts"] == before["ray_restarts"] + 1
    assert after["ray_address"] != before["ray_address"]
    # The store was not touched: same process, same credentials, same data.
    assert after["s3_pid"] == before["s3_pid"] and (home / "credentials.json").read_text() == credentials
    assert store.get_object(env["buckets"]["state"], marker).read() == payload
    # Nothing of the old cluster is left; a new raylet runs.
    left = [pid for pid in old_processes if pid != before["s3_pid"] and psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, {pid: old_processes[pid] for pid in left}
    assert raylet_and_agents(after)[0].pid != killed
    # The actors answer again, on the metrics ports they had (they were free).
    answers = ping(home, COORDINATOR, RETENTION)
    assert answers[COORDINATOR]["metrics_port"] == before["metrics_port"]
    assert answers[RETENTION]["metrics_port"] == before["retention_metrics_port"]
    # And `up` is idempotent again.
    assert up(home)["actions"] == []
