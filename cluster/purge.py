"""The deletion receipt's account of every node: which GPU workers confirmed their purge, and how the
persons' data is kept from use on the nodes that did not (issue #12).

Pure (no Ray): :mod:`cluster.actors` asks the workers, each with its own bounded wait, reads Ray's node
and actor tables, and passes what it found to :func:`node_entries`.

A node that does not confirm is still covered, by mechanisms that need no answer from it:

- ``deletion_barrier``: an early deletion's barrier is in the store (:mod:`storage.barrier`); every
  worker asks for it before any stage, and purges the person when it is up, so no stage for them runs
  and no cached key or file of theirs is used;
- ``person_files_wiped_at_worker_start``: a worker that starts on the node (after a restart, or when
  the node comes back) first wipes every person file there that no live worker holds
  (:func:`cluster.worker.wipe_unowned_person_files`);
- ``cut_off_worker_self_fences``: a worker cut off from the head stops training and writing once its
  lease lapses (:mod:`cluster.lease`);
- ``raylet_exits_when_node_returns``: a node Ray declared dead learns it when it hears the head again,
  and its raylet exits with every worker of it; a returning node is a new Ray node, whose workers wipe;
- ``purge_call_still_queued``: on a live node, the purge call was not withdrawn: a worker that was busy
  or slow runs it when it answers again (a restarted one wipes at start instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

CONFIRMED = "confirmed"
TIMED_OUT = "timed_out"  # no answer within the bound
UNREACHABLE = "unreachable"  # the call failed: the worker died, is restarting, or cannot be reached
NODE_DEAD = "node_dead"  # Ray declared the worker's node dead (down, or cut off from the head)
INCOMPLETE = "incomplete"  # it answered, but some of the persons' files could not be removed
OUTCOMES = (CONFIRMED, TIMED_OUT, UNREACHABLE, NODE_DEAD, INCOMPLETE)

EXPLANATIONS = {
    "deletion_barrier": "the person's deletion barrier is in the store; a worker checks it before any stage "
                        "and purges the person when it is up",
    "person_files_wiped_at_worker_start": "a worker that starts on this node wipes every person file there "
                                          "that no live worker holds",
    "cut_off_worker_self_fences": "a worker cut off from the head stops training and writing once its lease "
                                  "lapses (cluster/lease.py)",
    "raylet_exits_when_node_returns": "the node was declared dead: when it hears the head again its raylet "
                                      "exits with its workers; it rejoins as a new node whose workers wipe",
    "purge_call_still_queued": "the purge call stays queued: the worker runs it when it answers again",
}


@dataclass(frozen=True)
class WorkerPurge:
    """One GPU worker's part in a purge.

    Args:
        worker_id: ``gpu-<index>``.
        node_id: the Ray node it runs on (or last ran on); None if unknown.
        outcome: one of :data:`OUTCOMES`.
        answer: the worker's confirmation (:meth:`cluster.worker.GpuWorker.purge`) when it answered.
        error: the exception's type name when the call failed.
    """

    worker_id: str
    node_id: str | None
    outcome: str
    answer: dict[str, Any] | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)} but is {self.outcome!r}")

    def to_json(self) -> dict[str, Any]:
        """The worker's line in the receipt's ``worker_purges``: its answer, or why there is none."""
        if self.answer is not None:
            return {**self.answer, "worker_id": self.worker_id, "node_id": self.node_id, "outcome": self.outcome}
        return {"worker_id": self.worker_id, "node_id": self.node_id, "outcome": self.outcome, "purged": False,
                "error": self.error}


def coverage(outcome: str, *, barriers_in_store: bool) -> dict[str, Any]:
    """How a node that did not confirm is covered (``outcome`` is the node's, not ``confirmed``)."""
    mechanisms = ["deletion_barrier"] if barriers_in_store else []
    mechanisms.append("person_files_wiped_at_worker_start")
    if outcome == NODE_DEAD:
        mechanisms += ["cut_off_worker_self_fences", "raylet_exits_when_node_returns"]
    elif outcome in (TIMED_OUT, UNREACHABLE):
        mechanisms.append("purge_call_still_queued")
    return {"mechanisms": mechanisms, "barriers_in_store": barriers_in_store,
            "explanation": "; ".join(EXPLANATIONS[name] for name in mechanisms)}


def node_entries(purges: Iterable[WorkerPurge], nodes: dict[str, dict[str, Any]], *,
                 gpu_nodes: Iterable[str] = (), barriers_in_store: bool) -> list[dict[str, Any]]:
    """The receipt's ``nodes``: one entry per node that hosts or hosted GPU workers.

    Args:
        purges: every worker's outcome.
        nodes: Ray's node table, node id → ``{"address", "alive"}``.
        gpu_nodes: further nodes that offered GPUs (a dead one may have held a worker's files even
            though no worker is placed there now).
        barriers_in_store: every person of the deletion has a deletion barrier in the store.

    Returns:
        Entries ``{"node_id", "address", "state" (alive/dead/unknown), "confirmed", "outcome",
        "workers": [{"worker_id", "outcome", "purged", "keys_forgotten", "local_files_removed",
        "error"}], "coverage"}``; ``coverage`` is None for a node that confirmed.
    """
    by_node: dict[str | None, list[WorkerPurge]] = {}
    for purge in purges:
        by_node.setdefault(purge.node_id, []).append(purge)
    for node_id in gpu_nodes:
        by_node.setdefault(node_id, [])
    entries = []
    for node_id, workers in by_node.items():
        known = nodes.get(node_id) if node_id is not None else None
        state = "unknown" if known is None else "alive" if known.get("alive") else "dead"
        outcomes = {purge.outcome for purge in workers}
        if workers and outcomes == {CONFIRMED}:
            outcome = CONFIRMED  # even if the node died since: its workers had purged
        elif state == "dead":
            outcome = NODE_DEAD
        elif not workers:
            continue  # a live GPU node without workers holds nothing of anyone (its workers would be listed)
        else:
            # The worst of its workers: an error says more than silence.
            outcome = next(o for o in (NODE_DEAD, UNREACHABLE, TIMED_OUT, INCOMPLETE) if o in outcomes)
        confirmed = outcome == CONFIRMED
        entries.append({
            "node_id": node_id, "address": (known or {}).get("address"), "state": state, "confirmed": confirmed,
            "outcome": outcome,
            "workers": [{"worker_id": purge.worker_id, "outcome": purge.outcome,
                         "purged": bool((purge.answer or {}).get("purged")),
                         "keys_forgotten": (purge.answer or {}).get("keys_forgotten"),
                         "local_files_removed": (purge.answer or {}).get("local_files_removed"),
                         "error": purge.error}
                        for purge in sorted(workers, key=lambda p: p.worker_id)],
            "coverage": None if confirmed else coverage(outcome, barriers_in_store=barriers_in_store),
        })
    return sorted(entries, key=lambda entry: (entry["confirmed"], entry["address"] or "", entry["node_id"] or ""))
