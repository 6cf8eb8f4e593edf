"""Helpers for tests that run the stack's named actors on the shared local Ray cluster."""

from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float, what: str, *, poll_s: float = 0.3) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(poll_s)


def remove_named_actors(ray, namespace: str) -> None:
    """Kill the stack's coordinator, retention controller and GPU workers in ``namespace``, and wait
    until their names are free: the next module must not get old actors (with their old config) back
    from ``get_if_exists``, and their fake GPUs must be free for new workers."""
    from cluster.actors import COORDINATOR_NAME, GPU_WORKER_PREFIX, RETENTION_NAME

    names = [COORDINATOR_NAME, RETENTION_NAME] + [f"{GPU_WORKER_PREFIX}{i}" for i in range(8)]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:
            pass

    def gone(name: str) -> bool:
        try:
            ray.get_actor(name, namespace=namespace)
            return False
        except ValueError:
            return True

    wait_for(lambda: all(gone(name) for name in names), 60, "the previous actors to go")
    time.sleep(1.0)  # let Ray release the fake GPUs before new workers ask for them
