"""The supervisor keeps the local stack running without the operator (issue #12), end to end.

`headshots up` starts the stack with its supervisor (checking every second here); the demo batch is
submitted; once a person is being worked on, the head's raylet is SIGKILLed with its agents (the whole
node dies: coordinator, workers). No command is run after that: the supervisor notices, restarts the
Ray head and the actors, and the coordinator resumes the batch from the store until it is done. Then
`headshots down` stops the supervisor first. Every process is killed by pid at the end, also on failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from tests.local_stack import (COORDINATOR, kill_by_pid, ping, run_cli, sigkill_raylet, stack_info, stack_processes,
                               up, wait_until)

REPO = Path(__file__).resolve().parents[2]
DEMO_MANIFEST = REPO / "examples" / "demo" / "team.yaml"
HEADSHOTS_PER_PERSON = 2 * 2  # the demo's two styles, two images each
WORKING = ("ingesting", "training", "generating", "packaging")
FINAL = ("done", "failed", "cancelled", "needs_photos", "deleted")


@pytest.fixture
def supervised(tmp_path):
    home = tmp_path / "home"
    seen: dict[int, str] = {}
    try:
        started = up(home, "--supervise-interval=1")
        seen.update(stack_processes(stack_info(home)))
        yield home, started, seen
    finally:
        seen.update(stack_processes(stack_info(home)))
        run_cli(home, "down", check=False, timeout=180)
        kill_by_pid(seen)


def status(home: Path, batch_id: str) -> dict:
    """`headshots status BATCH --json` (it reads the store only, so it answers while Ray is down)."""
    return json.loads(run_cli(home, "status", batch_id, "--json", timeout=300).stdout)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_supervisor_restarts_a_dead_node_and_the_batch_finishes(supervised):
    home, started, seen = supervised
    supervisor = started["supervisor_pid"]
    assert supervisor and alive(supervisor)
    assert any(action.startswith("started the supervisor") for action in started["actions"])
    # A second `up` leaves the running supervisor alone.
    assert up(home)["supervisor_pid"] == supervisor

    batch_id = json.loads(run_cli(home, "submit", str(DEMO_MANIFEST), "--json").stdout)["batch_id"]
    wait_until(lambda: any(p["state"] in WORKING for p in status(home, batch_id)["persons"]),
               "a person of the demo batch is being worked on", timeout_s=600, every_s=0.5)
    before = stack_info(home)
    seen.update(stack_processes(before))
    sigkill_raylet(before)
    at_kill = status(home, batch_id)
    # The node died with the batch unfinished (its coordinator went with it): what follows is the
    # supervisor's doing and the resumed coordinator's.
    assert at_kill["state"] == "running", at_kill

    healed = wait_until(lambda: (info := stack_info(home)).get("ray_restarts", 0) >= 1 and info["ray_address"]
                        != before["ray_address"] and info, "the supervisor restarted the Ray head",
                        timeout_s=600, every_s=0.5)
    seen.update(stack_processes(healed))
    final = wait_until(lambda: (s := status(home, batch_id))["state"] not in ("running", "created") and s,
                       "the batch finished after the restart", timeout_s=900, every_s=1)
    assert final["state"] == "done", final
    assert [(p["state"], p["headshots"]) for p in final["persons"]] == [("done", HEADSHOTS_PER_PERSON)] * 2, final

    assert stack_info(home)["supervisor_pid"] == supervisor and alive(supervisor)
    log = (home / "supervisor.log").read_text()
    assert "raylet is not running" in log and "restarted (1 so far)" in log, log
    assert ping(home, COORDINATOR)[COORDINATOR] is not None  # reachable from a fresh driver

    stopped = json.loads(run_cli(home, "down", "--json", timeout=180).stdout)
    assert stopped == {"s3": True, "ray": True, "supervisor": True}
    wait_until(lambda: not alive(supervisor), "the supervisor exited", timeout_s=60)
    assert "stopping (signal 15)" in (home / "supervisor.log").read_text()
    assert stack_info(home)["supervisor_pid"] is None
