"""The local stack's self-healing, without Ray: the half-dead detection (:func:`headshots.stack.diagnose`
with a scripted probe), the supervisor's policy (:class:`headshots.stack.Supervisor` with fake checks and
restarts), and the small real-process parts: finding a raylet by its temp dir, the stack lock, the
supervisor's own restarts refusing a stopped stack, and `down` stopping the supervisor.

Every process a test starts is killed by pid in a finalizer.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from headshots import stack
from headshots.config import Config
from headshots.stack import StackHealth, StackInfo, StackProbe, Supervisor, diagnose

COORDINATOR, RETENTION = stack.STACK_ACTOR_NAMES


class FakeProbe(StackProbe):
    """Scripted answers; records which questions were asked."""

    def __init__(self, *, store=True, port=True, raylet=True, alive=True, actors=frozenset(stack.STACK_ACTOR_NAMES)):
        self.answers = {"store": store, "port": port, "raylet": raylet, "alive": alive, "actors": actors}
        self.asked: list[str] = []

    def _answer(self, question):
        self.asked.append(question)
        answer = self.answers[question]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def store_running(self):
        return self._answer("store")

    def gcs_port_open(self):
        return self._answer("port")

    def raylet_running(self):
        return self._answer("raylet")

    def alive_node(self):
        return self._answer("alive")

    def live_actor_names(self):
        answer = self._answer("actors")
        return None if answer is None else set(answer)


LOCAL = Config.from_dict({"home": "/nonexistent/home"})
RUNNING = StackInfo(s3_pid=4242, s3_endpoint="127.0.0.1:9000", ray_address="127.0.0.1:6380",
                    ray_temp_dir="/tmp/hs-test/ray", ray_started_here=True)


def test_a_whole_stack_is_healthy():
    probe = FakeProbe()
    found = diagnose(LOCAL, RUNNING, probe)
    assert found.healthy and found.store == "ok" and found.ray == "ok"
    assert found.missing_actors == () and found.problems == ()
    assert probe.asked == ["store", "port", "raylet", "alive", "actors"]


def test_gcs_port_open_but_raylet_gone_is_half_dead_without_asking_the_gcs():
    """The case of the issue: the raylet (with its agents) was killed, the GCS still listens."""
    probe = FakeProbe(raylet=False)
    found = diagnose(LOCAL, RUNNING, probe)
    assert found.ray == "half-dead" and found.ray_needs_restart and not found.healthy
    assert "raylet is not running" in found.problems[0]
    assert "alive" not in probe.asked and "actors" not in probe.asked


def test_gcs_knowing_no_alive_node_is_half_dead():
    """A raylet process may still be there while the GCS has declared the node dead."""
    found = diagnose(LOCAL, RUNNING, FakeProbe(alive=False))
    assert found.ray == "half-dead" and found.ray_needs_restart
    assert found.problems == ("Ray's GCS at 127.0.0.1:6380 has no alive node",)


def test_a_gcs_that_does_not_answer_is_unresponsive():
    found = diagnose(LOCAL, RUNNING, FakeProbe(alive=TimeoutError("deadline exceeded")))
    assert found.ray == "unresponsive" and found.ray_needs_restart
    assert "TimeoutError: deadline exceeded" in found.problems[0]


def test_a_failing_actor_listing_is_unresponsive_too():
    found = diagnose(LOCAL, RUNNING, FakeProbe(actors=RuntimeError("rpc failed")))
    assert found.ray == "unresponsive"


def test_a_closed_gcs_port_is_down_and_nothing_else_is_asked_of_ray():
    probe = FakeProbe(port=False)
    found = diagnose(LOCAL, RUNNING, probe)
    assert found.ray == "down" and found.ray_needs_restart
    assert probe.asked == ["store", "port"]


@pytest.mark.parametrize("missing", [(COORDINATOR,), (RETENTION,), (COORDINATOR, RETENTION)])
def test_a_missing_actor_on_a_live_head_needs_only_the_actor(missing):
    present = set(stack.STACK_ACTOR_NAMES) - set(missing) | {"headshots-gpu-0"}
    found = diagnose(LOCAL, RUNNING, FakeProbe(actors=present))
    assert found.ray == "ok" and not found.ray_needs_restart and not found.healthy
    assert found.missing_actors == missing
    assert all("actor does not exist" in problem for problem in found.problems)


def test_a_ray_without_the_gcs_calls_is_judged_by_its_processes():
    found = diagnose(LOCAL, RUNNING, FakeProbe(alive=None, actors=None))
    assert found.healthy and found.ray == "ok"


def test_a_stopped_store_is_reported_and_ray_still_checked():
    probe = FakeProbe(store=False, raylet=False)
    found = diagnose(LOCAL, RUNNING, probe)
    assert found.store == "down" and found.ray == "half-dead" and not found.healthy
    assert found.problems[0] == "the S3 server is not running"


def test_a_stack_never_started_or_stopped_by_down_is_down_without_probing_ray():
    for info in (None, StackInfo(s3_endpoint="127.0.0.1:9000")):
        probe = FakeProbe()
        found = diagnose(LOCAL, info, probe)
        assert (found.store, found.ray) == ("down", "down")
        assert probe.asked == []


def test_external_services_are_not_probed():
    config = Config.from_dict({"home": "/nonexistent/home", "ray": {"address": "10.0.0.5:6379"},
                               "store": {"endpoint": "s3.example:443", "secure": True}})
    probe = FakeProbe(store=False, port=False, raylet=False)
    found = diagnose(config, RUNNING, probe)
    assert (found.store, found.ray) == ("external", "external") and found.healthy
    assert probe.asked == []


def test_the_actor_names_are_the_clusters():
    actors = pytest.importorskip("cluster.actors")
    assert stack.STACK_ACTOR_NAMES == (actors.COORDINATOR_NAME, actors.RETENTION_NAME)


# --- the supervisor's policy --------------------------------------------------------------------

HEALTHY = StackHealth(store="ok", ray="ok")
HALF_DEAD = StackHealth(store="ok", ray="half-dead", problems=("the head's raylet is not running",))
UNRESPONSIVE = StackHealth(store="ok", ray="unresponsive", problems=("GCS does not answer",))
NO_COORDINATOR = StackHealth(store="ok", ray="ok", missing_actors=(COORDINATOR,), problems=("no coordinator",))
STORE_DOWN = StackHealth(store="down", ray="half-dead", problems=("the S3 server is not running",))


class Script:
    """A supervisor's world: a list of check results, a list of restart outcomes."""

    def __init__(self, checks, heals=(), ours=True):
        self.checks, self.heals, self.ours = list(checks), list(heals), ours
        self.healed = 0
        self.logged: list[tuple[int, str]] = []

    def supervisor(self, **options):
        return Supervisor(check=lambda: self.checks.pop(0), heal=self.heal, still_ours=lambda: self.ours,
                          log=lambda level, message, *args: self.logged.append((level, message % args)),
                          interval_s=2.0, max_backoff_s=30.0, **options)

    def heal(self):
        self.healed += 1
        return self.heals.pop(0)


def test_a_healthy_stack_is_left_alone():
    script = Script([HEALTHY, HEALTHY])
    supervisor = script.supervisor()
    assert [supervisor.step(), supervisor.step()] == [2.0, 2.0]
    assert script.healed == 0 and script.logged == []


@pytest.mark.parametrize("found", [HALF_DEAD, NO_COORDINATOR])
def test_a_dead_head_or_a_missing_actor_is_restarted_at_once(found):
    script = Script([found, HEALTHY], heals=[(True, "stack up: restarted the Ray head")])
    supervisor = script.supervisor()
    assert supervisor.step() == 2.0 and script.healed == 1
    assert supervisor.step() == 2.0
    messages = [message for _, message in script.logged]
    assert any(found.problems[0] in message for message in messages)
    assert any(message.startswith("restarted (1 so far)") for message in messages)
    assert messages[-1] == "the stack is healthy again"


def test_restarts_that_keep_failing_back_off_and_a_success_resets():
    failures = [(False, "headshots: error: StackError: ray start failed")] * 5
    script = Script([HALF_DEAD] * 6, heals=[*failures, (True, "stack up")])
    supervisor = script.supervisor()
    delays = [supervisor.step() for _ in range(6)]
    assert delays == [4.0, 8.0, 16.0, 30.0, 30.0, 2.0]
    assert script.healed == 6 and supervisor.failures == 0
    errors = [message for level, message in script.logged if level == logging.ERROR]
    assert len(errors) == 5 and "restart failed (5 in a row)" in errors[-1] and "ray start failed" in errors[-1]


def test_an_unresponsive_gcs_must_be_seen_twice_before_a_restart():
    script = Script([UNRESPONSIVE, HEALTHY, UNRESPONSIVE, UNRESPONSIVE], heals=[(True, "stack up")])
    supervisor = script.supervisor()
    supervisor.step()
    assert script.healed == 0
    supervisor.step()  # it answered again: the count starts over
    supervisor.step()
    assert script.healed == 0
    supervisor.step()
    assert script.healed == 1


def test_a_stack_whose_store_is_down_is_not_restarted_and_the_supervisor_exits():
    script = Script([STORE_DOWN], heals=[(True, "should not happen")])
    assert script.supervisor().step() is None
    assert script.healed == 0
    assert "does not restart a stack without its store" in script.logged[-1][1]


def test_after_down_the_supervisor_exits_without_checking():
    script = Script([], ours=False)
    assert script.supervisor().step() is None
    assert "stopped" in script.logged[-1][1]


def test_a_restart_refused_because_down_ran_meanwhile_ends_the_supervision():
    script = Script([HALF_DEAD], heals=[(False, "the stack was stopped")])
    supervisor = script.supervisor()
    original_heal = script.heal

    def heal_then_down():
        result = original_heal()
        script.ours = False
        return result

    supervisor.heal = heal_then_down
    assert supervisor.step() is None and supervisor.failures == 0


# --- real processes: the raylet by its temp dir, the lock, refusals, down ---------------------------

@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _start_named(processes, argv0: str, *arguments: str) -> subprocess.Popen:
    """A sleeping Python process whose command line reads ``argv0 ARGUMENTS`` (as `ps` shows it)."""
    process = subprocess.Popen([argv0, "-c", "import signal; signal.pause()", *arguments], executable=sys.executable,
                               stdin=subprocess.DEVNULL)
    processes.append(process)
    return process


def _wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.01)


def _wait_for_cmdline(process: subprocess.Popen, text: str) -> None:
    """Until exec has replaced the forked child's command line with ours."""
    def shows_it() -> bool:
        try:
            return text in " ".join(psutil.Process(process.pid).cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
    _wait_until(shows_it, f"process {process.pid} shows {text!r}")


def test_the_raylet_is_found_by_its_temp_dir_and_missed_once_killed(processes, tmp_path):
    temp_dir = str(tmp_path / "ray")
    # Another cluster's raylet, in a sibling folder whose name starts like ours.
    other = _start_named(processes, str(tmp_path / "raylet"), f"--raylet_socket_name={temp_dir}2/s/sockets/raylet")
    raylet = _start_named(processes, str(tmp_path / "raylet"),
                          f"--raylet_socket_name={temp_dir}/session_x/sockets/raylet")
    not_a_raylet = _start_named(processes, str(tmp_path / "gcs_server"), f"--log_dir={temp_dir}/session_x/logs")
    for process in (other, raylet, not_a_raylet):
        _wait_for_cmdline(process, str(tmp_path))
    assert [p.pid for p in stack._raylet_processes(temp_dir)] == [raylet.pid]
    raylet.kill()
    raylet.wait(timeout=30)
    assert stack._raylet_processes(temp_dir) == []


def test_a_killed_raylet_not_yet_reaped_counts_as_gone(processes, tmp_path):
    temp_dir = str(tmp_path / "ray")
    raylet = _start_named(processes, str(tmp_path / "raylet"), f"--raylet_socket_name={temp_dir}/s/sockets/raylet")
    _wait_for_cmdline(raylet, temp_dir)
    raylet.kill()  # not waited for: a zombie until the finalizer reaps it
    _wait_until(lambda: psutil.Process(raylet.pid).status() == psutil.STATUS_ZOMBIE, "the raylet is a zombie")
    assert stack._raylet_processes(temp_dir) == []


def test_the_stack_lock_is_exclusive_and_released(tmp_path):
    config = Config.from_dict({"home": str(tmp_path / "home")})
    errors = []

    def try_lock():
        try:
            with stack._stack_lock(config, timeout_s=0.3):
                pass
        except stack.StackError as error:
            errors.append(str(error))

    with stack._stack_lock(config):
        thread = threading.Thread(target=try_lock)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "stack.lock" in errors[0]
    try_lock()  # free again
    assert len(errors) == 1


def _write_info(config: Config, info: StackInfo) -> None:
    stack._save_info(config, info)


def test_the_supervisors_restart_does_nothing_for_a_stack_it_no_longer_supervises(tmp_path):
    config = Config.from_dict({"home": str(tmp_path / "home")})
    _write_info(config, StackInfo(supervisor_pid=None, s3_endpoint="127.0.0.1:9"))
    with pytest.raises(stack.StackError, match="was stopped"):
        stack.start_or_heal(config, for_supervisor=12345)
    assert json.loads((tmp_path / "home" / "stack.json").read_text())["s3_pid"] is None


def test_the_supervisors_restart_never_starts_a_stopped_store(tmp_path, monkeypatch):
    config = Config.from_dict({"home": str(tmp_path / "home")})
    _write_info(config, StackInfo(supervisor_pid=12345, s3_pid=None, s3_endpoint="127.0.0.1:9"))
    started = []
    monkeypatch.setattr("storage.seaweed.start_embedded_s3", lambda *a, **k: started.append(a))
    with pytest.raises(stack.StackError, match="does not restart the stack"):
        stack.start_or_heal(config, for_supervisor=12345)
    assert started == []


def test_down_stops_the_supervisor_and_what_it_runs_by_pid(processes, tmp_path):
    config = Config.from_dict({"home": str(tmp_path / "home")})
    config_path = str(stack._supervisor_config_path(config))
    supervisor = _start_named(processes, sys.executable, "supervise", "--config", config_path)
    # Same command line, another home: not ours, left alone.
    stranger = _start_named(processes, sys.executable, "supervise", "--config", str(tmp_path / "elsewhere.json"))
    _wait_for_cmdline(supervisor, config_path)
    _wait_for_cmdline(stranger, "elsewhere")
    _write_info(config, StackInfo(supervisor_pid=supervisor.pid))
    assert stack.down(config) == {"s3": False, "ray": False, "supervisor": True}
    assert supervisor.wait(timeout=30) is not None
    assert stranger.poll() is None
    assert json.loads((tmp_path / "home" / "stack.json").read_text())["supervisor_pid"] is None
    _write_info(config, StackInfo(supervisor_pid=stranger.pid))  # a pid that is not our supervisor
    assert stack.down(config)["supervisor"] is False and stranger.poll() is None


def test_stack_json_is_replaced_whole(tmp_path):
    config = Config.from_dict({"home": str(tmp_path / "home")})
    _write_info(config, StackInfo(s3_pid=1, ray_restarts=2))
    info = stack.load_info(config)
    assert info.s3_pid == 1 and info.ray_restarts == 2
    assert sorted(p.name for p in Path(tmp_path / "home").iterdir()) == ["stack.json"]
