"""The deletion receipt's account of every GPU node (cluster/purge.py): confirmed, or how it is covered."""

from __future__ import annotations

import pytest

from cluster.purge import WorkerPurge, node_entries

NODES = {"n-alive": {"address": "10.0.0.2", "alive": True}, "n-dead": {"address": "10.0.0.3", "alive": False},
         "n-lost": {"address": "10.0.0.4", "alive": False}}
PURGED = {"purged": True, "keys_forgotten": 1, "local_files_removed": 2}


def test_a_node_confirms_only_when_every_worker_on_it_purged():
    entries = node_entries([WorkerPurge("gpu-0", "n-alive", "confirmed", answer=PURGED),
                            WorkerPurge("gpu-1", "n-alive", "timed_out")], NODES, barriers_in_store=True)
    [node] = entries
    assert node["confirmed"] is False and node["outcome"] == "timed_out" and node["state"] == "alive"
    assert [(w["worker_id"], w["purged"], w["local_files_removed"]) for w in node["workers"]] == [
        ("gpu-0", True, 2), ("gpu-1", False, None)]
    assert node["coverage"]["mechanisms"] == ["deletion_barrier", "person_files_wiped_at_worker_start",
                                              "purge_call_still_queued"]


def test_a_dead_node_is_covered_by_self_fencing_and_the_wipe_when_it_returns():
    entries = node_entries([WorkerPurge("gpu-0", "n-alive", "confirmed", answer=PURGED),
                            WorkerPurge("gpu-1", "n-dead", "node_dead")], NODES,
                           gpu_nodes=["n-lost"], barriers_in_store=False)
    by_node = {entry["node_id"]: entry for entry in entries}
    assert by_node["n-alive"]["confirmed"] and by_node["n-alive"]["coverage"] is None
    for lost in ("n-dead", "n-lost"):  # a worker's node, and a GPU node no worker is placed on now
        assert by_node[lost]["state"] == "dead" and by_node[lost]["outcome"] == "node_dead"
        # A sweep raises no barrier: the coverage does not claim one.
        assert by_node[lost]["coverage"]["mechanisms"] == ["person_files_wiped_at_worker_start",
                                                           "cut_off_worker_self_fences",
                                                           "raylet_exits_when_node_returns"]
    assert by_node["n-lost"]["workers"] == []


def test_a_worker_whose_node_is_unknown_is_listed_not_dropped():
    [node] = node_entries([WorkerPurge("gpu-2", None, "unreachable", error="ActorUnavailableError")], NODES,
                          barriers_in_store=True)
    assert node["node_id"] is None and node["state"] == "unknown" and node["outcome"] == "unreachable"
    assert node["workers"][0]["error"] == "ActorUnavailableError"


def test_an_outcome_outside_the_known_ones_is_refused():
    with pytest.raises(ValueError, match="outcome must be one of"):
        WorkerPurge("gpu-0", "n-alive", "maybe")
