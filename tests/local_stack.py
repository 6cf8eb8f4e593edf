"""Helpers for tests that run the local stack as a user does (`headshots ...` in subprocesses under a
private $HEADSHOTS_HOME) and kill parts of it: its processes found by pid (the S3 server, the supervisor,
every process of its Ray cluster by its temp dir or GCS address), the head's raylet and agents, and a
driver that pings the stack's actors without creating them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
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


def up(home: Path, *options: str) -> dict:
    """`headshots up OPTIONS --json`: where the stack is, what it started (`actions`), the supervisor's pid."""
    return json.loads(run_cli(home, "up", *options, "--json").stdout)
