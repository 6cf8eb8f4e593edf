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
import secrets
from io import BytesIO

import psutil
import pytest

from tests import local_stack
from tests.local_stack import (COORDINATOR, KILL_FOR_GOOD, RETENTION, driver, gcs_port_open, kill_by_pid, ping,
                               raylet_and_agents, run_cli, sigkill_raylet, stack_info, stack_processes, wait_until)


def up(home) -> dict:
    """`headshots up` without the supervisor: here only `up` heals."""
    return local_stack.up(home, "--no-supervisor")


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
