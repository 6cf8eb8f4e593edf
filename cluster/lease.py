"""A GPU worker's lease on its node's membership of the cluster: self-fencing when cut off (issue #12).

When a worker node is cut off from the head, Ray declares it dead after its health checks fail
(``RAY_health_check_*``: a few seconds to about a minute) and restarts its actors elsewhere; the
coordinator then runs the lost stage on another worker. The cut-off node's processes are still alive
though (its raylet only exits once it can hear the head again), and if the node still reaches the
store, a stage running there would go on writing next to its replacement.

So a worker writes, and trains, only while it holds a lease: the head's GCS confirmed within the last
``lease_s`` seconds that this node is alive (``check_alive`` on the node's own id, probed every
``interval_s`` from a thread). ``lease_s`` is well under the time Ray needs to declare a node dead, so
a cut-off worker stops before any replacement can start. A lease that lapses without the node being
declared dead (the head was slow, a short blip) only pauses the stage until the next confirmation;
once the GCS answers that the node is dead, it never comes back (a node declared dead never becomes
alive again: a restarted raylet is a new node) and every later step or write raises
:class:`NodeCutOff`.

A write that was already in flight when the node was cut off can still land late (for example when
the link comes back). So every write is confirmed *after* it returns, with a probe that starts after
it (:meth:`HeadLease.confirm`): "alive" proves that no replacement had started when the write landed
(replacements start only after the node is declared dead); "dead" means it may have, and the writer
undoes what it wrote where that is safe (see :mod:`cluster.worker`).

Pure Python: the probe is passed in (:mod:`cluster.actors` asks Ray's GCS), so tests can script it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)

# The lease is this fraction of the shortest time Ray takes to declare a cut-off node dead.
LEASE_FRACTION = 0.5


class NodeCutOff(RuntimeError):
    """This worker's node has been declared dead by the cluster: it must not write or train any more
    (Ray has started, or will start, its work elsewhere)."""


def lease_from_health_checks(period_ms: float, timeout_ms: float, failure_threshold: int) -> tuple[float, float]:
    """(lease_s, interval_s) for Ray's health-check settings.

    The GCS declares a node dead after ``failure_threshold`` failed checks in a row, one every
    ``period_ms``; each check of a cut-off node fails at its timeout, so it takes at least
    ``(failure_threshold - 1) * period + timeout``. (A node whose raylet was killed fails its checks
    faster, but it has no live workers left to fence.) The lease is half of that, at least 0.5 s, and
    is renewed four times per lease.
    """
    shortest_s = (max(1, failure_threshold) - 1) * period_ms / 1000.0 + timeout_ms / 1000.0
    lease_s = max(0.5, LEASE_FRACTION * shortest_s)
    return lease_s, lease_s / 4.0


class HeadLease:
    """Args:
        probe: ``probe(timeout_s)`` asks the head whether this node is alive: True (alive), False
            (declared dead); raises when there is no answer within ``timeout_s``.
        lease_s: how long a confirmation lasts.
        interval_s: how often the background thread probes.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(self, probe: Callable[[float], bool], *, lease_s: float, interval_s: float,
                 clock: Callable[[], float] = time.monotonic):
        if not (lease_s > 0 and interval_s > 0):
            raise ValueError(f"lease_s and interval_s must be > 0 but are {lease_s}, {interval_s}")
        self.probe = probe
        self.lease_s = lease_s
        self.interval_s = interval_s
        self._clock = clock
        self._confirmed_at: float | None = None
        self._dead = False
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lapses = 0  # times a stage found the lease lapsed and had to wait (for info/metrics)

    # --- probing ---------------------------------------------------------------------------------

    def start(self) -> "HeadLease":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="head-lease", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set() and not self._dead:
            self.probe_once()
            self._stop.wait(self.interval_s)

    def probe_once(self, timeout_s: float | None = None) -> bool | None:
        """One probe now: True/False as the head answered, None if it did not answer. A confirmation
        counts from when the probe *started* (the node was alive at some moment after that)."""
        started = self._clock()
        try:
            alive = bool(self.probe(self.lease_s / 2 if timeout_s is None else timeout_s))
        except Exception as error:  # noqa: BLE001 - no answer: the lease runs down
            logger.debug("head lease probe got no answer: %s", type(error).__name__)
            return None
        with self._changed:
            if alive:
                if not self._dead and (self._confirmed_at is None or started > self._confirmed_at):
                    self._confirmed_at = started
            else:
                if not self._dead:
                    logger.warning("the head says this node is dead: no more writes or training steps here")
                self._dead = True
            self._changed.notify_all()
        return alive

    # --- asking ----------------------------------------------------------------------------------

    @property
    def dead(self) -> bool:
        return self._dead

    def valid(self) -> bool:
        with self._changed:
            return (not self._dead and self._confirmed_at is not None
                    and self._clock() - self._confirmed_at < self.lease_s)

    def wait_valid(self, *, give_up: Callable[[], bool] | None = None, timeout_s: float | None = None) -> bool:
        """Block until the lease is valid (True). Returns False early if ``give_up()`` turns true or
        ``timeout_s`` passes first.

        Raises:
            NodeCutOff: the head declared this node dead.
        """
        deadline = None if timeout_s is None else self._clock() + timeout_s
        waited = False
        while True:
            if self._dead:
                raise NodeCutOff("the head declared this worker's node dead; its work runs elsewhere")
            if self.valid():
                if waited:
                    logger.info("head lease confirmed again; the stage goes on")
                return True
            if not waited:
                waited = True
                self.lapses += 1
                logger.warning("head lease lapsed (no confirmation for %.1f s): pausing before the next step or "
                               "write", self.lease_s)
            if give_up is not None and give_up():
                return False
            if deadline is not None and self._clock() >= deadline:
                return False
            if self._thread is None:
                self.probe_once()  # no background thread (tests): probe here
            with self._changed:
                self._changed.wait(min(self.interval_s, 0.5))

    def confirm(self, *, timeout_s: float | None = None) -> bool | None:
        """A fresh confirmation, from a probe that starts now (after the caller's write returned):
        True (alive: nothing can have replaced this node's work yet), False (declared dead). While
        the head does not answer it keeps asking, until ``timeout_s`` (then None)."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        while True:
            if self._dead:
                return False
            answer = self.probe_once()
            if answer is not None:
                return answer
            if deadline is not None and self._clock() >= deadline:
                return None
            self._stop.wait(min(self.interval_s, 0.5))
