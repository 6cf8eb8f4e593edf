"""The GPU worker's head lease (cluster/lease.py) on a scripted probe and a fake clock."""

from __future__ import annotations

import pytest

from cluster.lease import HeadLease, NodeCutOff, lease_from_health_checks


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Probe:
    """Answers from a script: True (alive), False (dead), None (no answer: raises)."""

    def __init__(self, clock: Clock, answers: list, *, takes_s: float = 0.0):
        self.clock, self.answers, self.takes_s = clock, list(answers), takes_s
        self.calls = 0

    def __call__(self, timeout_s: float) -> bool:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.clock.now += self.takes_s
        if answer is None:
            self.clock.now += timeout_s
            raise TimeoutError("no answer")
        return answer


def test_lease_is_half_the_shortest_time_ray_takes_to_declare_a_cut_off_node_dead():
    # Ray's defaults: 3 s period, 10 s timeout, 5 failures: at least 4 * 3 + 10 = 22 s.
    assert lease_from_health_checks(3000, 10000, 5) == (11.0, 2.75)
    # The test cluster's: 1 s, 2 s, 4: at least 5 s.
    assert lease_from_health_checks(1000, 2000, 4) == (2.5, 0.625)
    assert lease_from_health_checks(10, 10, 1)[0] == 0.5  # never shorter than half a second


def test_a_lease_counts_from_when_the_confirming_probe_started_and_runs_out():
    clock = Clock()
    lease = HeadLease(Probe(clock, [True], takes_s=0.4), lease_s=2.0, interval_s=0.5, clock=clock)
    assert not lease.valid()  # never confirmed yet
    assert lease.probe_once() is True
    assert clock.now == pytest.approx(100.4)
    clock.now = 101.9
    assert lease.valid()
    clock.now = 102.0  # 2 s after the probe *started*, though only 1.6 s after its answer
    assert not lease.valid()


def test_no_answer_lets_the_lease_run_down_and_a_later_confirmation_renews_it():
    clock = Clock()
    lease = HeadLease(Probe(clock, [True, None, None, True]), lease_s=2.0, interval_s=0.5, clock=clock)
    lease.probe_once()
    assert lease.probe_once() is None and lease.probe_once() is None
    assert not lease.valid() and not lease.dead
    # Waiting probes (no background thread here) until the head answers again.
    assert lease.wait_valid() is True
    assert lease.valid() and lease.lapses == 1


def test_once_the_head_says_dead_the_lease_never_comes_back():
    clock = Clock()
    lease = HeadLease(Probe(clock, [True, False, True]), lease_s=5.0, interval_s=0.5, clock=clock)
    lease.probe_once()
    assert lease.valid()
    assert lease.probe_once() is False
    assert lease.dead and not lease.valid()
    lease.probe_once()  # an "alive" answer after "dead" (cannot happen in Ray) changes nothing
    assert lease.dead and not lease.valid()
    with pytest.raises(NodeCutOff):
        lease.wait_valid()
    assert lease.confirm() is False


def test_waiting_gives_up_when_asked_to_and_confirm_reports_no_answer_after_its_timeout():
    clock = Clock()
    lease = HeadLease(Probe(clock, [None]), lease_s=2.0, interval_s=0.5, clock=clock)
    stop = iter([False, False, True])
    assert lease.wait_valid(give_up=lambda: next(stop)) is False
    assert lease.confirm(timeout_s=3.0) is None


def test_confirm_asks_a_fresh_probe_even_while_the_lease_is_valid():
    clock = Clock()
    probe = Probe(clock, [True, True, False])
    lease = HeadLease(probe, lease_s=10.0, interval_s=0.5, clock=clock)
    lease.probe_once()
    assert lease.confirm() is True and probe.calls == 2
    assert lease.confirm() is False and probe.calls == 3 and lease.dead
