"""The Ray driver of a multi-node test cluster, run on its head host by :class:`multinode.Driver`.

``python -m tests.integration.multinode_driver FD RAY_ADDRESS NODE_IP NAMESPACE``: connects to the
cluster as a driver on the head node, then runs the functions below by name for the test process,
which sends them over the socket ``FD``. Everything here is a thin call into the system's own code
(:mod:`cluster.actors`) or into Ray's tables.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import ray

_config = None


@ray.remote(num_gpus=1, num_cpus=0)
def _where_am_i() -> dict[str, Any]:
    return {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()], "pid": os.getpid()}


def ping() -> dict[str, Any]:
    return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address()}


def nodes() -> list[dict[str, Any]]:
    return [{"node_id": node["NodeID"], "address": node["NodeManagerAddress"], "alive": node["Alive"],
             "resources": node.get("Resources", {})} for node in ray.nodes()]


def gpu_task_nodes(count: int = 1) -> list[dict[str, Any]]:
    """Where ``count`` tasks asking for one GPU each ran."""
    return ray.get([_where_am_i.remote() for _ in range(count)], timeout=300)


def actor_nodes() -> dict[str, dict[str, Any]]:
    """Every named actor of the stack: its state and the address of the node it is (or was last) on."""
    from ray._private.state import actors

    found = {}
    for actor in actors().values():
        name = actor.get("Name") or ""
        if name.startswith("headshots-"):
            found[name] = {"state": actor.get("State"), "node_ip": (actor.get("Address") or {}).get("IPAddress"),
                           "pid": actor.get("Pid"), "restarts": actor.get("NumRestarts")}
    return found


def start_stack(config: dict[str, Any]) -> dict[str, Any]:
    """The coordinator and the retention controller, created from this driver (on the head node)."""
    global _config
    from cluster.actors import get_or_create_coordinator, get_or_create_retention_controller
    from headshots.config import Config

    _config = Config.from_dict(config)
    coordinator = get_or_create_coordinator(_config, metrics_port=None)
    get_or_create_retention_controller(_config, metrics_port=None)
    return {"epoch": ray.get(coordinator.start.remote(), timeout=120)["epoch"]}


def wait_gpu_workers(count: int, timeout_s: float = 180.0) -> list[dict[str, Any]]:
    """Until ``count`` GPU workers answer; their ``info()`` (with the node each runs on)."""
    from cluster.actors import existing_gpu_workers

    deadline = time.monotonic() + timeout_s
    while True:
        workers = existing_gpu_workers(_config.ray.namespace)
        if len(workers) >= count:
            try:
                return ray.get([worker.info.remote() for worker in workers], timeout=30)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} GPU workers did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


def gpu_workers(timeout_s: float = 1.0) -> list[dict[str, Any]]:
    """``info()`` of every GPU worker that answers within ``timeout_s`` (the stage it runs, its node)."""
    from cluster.actors import existing_gpu_workers

    refs = [worker.info.options(max_task_retries=0).remote() for worker in existing_gpu_workers(_config.ray.namespace)]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    answers = []
    for ref in ready:
        try:
            answers.append(ray.get(ref))
        except Exception:  # noqa: BLE001 - lost or restarting: not answering
            continue
    return answers


def submit(tenant: str, batch_id: str) -> dict[str, Any]:
    from cluster.actors import COORDINATOR_NAME

    coordinator = ray.get_actor(COORDINATOR_NAME, namespace=_config.ray.namespace)
    return ray.get(coordinator.submit.remote(tenant, batch_id), timeout=120)


def coordinator_epoch() -> int:
    from cluster.actors import COORDINATOR_NAME

    coordinator = ray.get_actor(COORDINATOR_NAME, namespace=_config.ray.namespace)
    return ray.get(coordinator.start.remote(), timeout=120)["epoch"]


def remove_stack() -> None:
    """Kill the stack's named actors (the cluster is torn down next; this only ends them cleanly)."""
    from tests.integration.ray_actors import remove_named_actors

    if _config is not None:
        remove_named_actors(ray, _config.ray.namespace)


def run_batch_watched(tenant: str, batch_id: str, poll_s: float = 0.1, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Submit a stored batch and watch the GPU workers until its run ends (for bench/multinode_scaling.py).

    Returns the submit time (epoch seconds, this host's clock, taken just before the coordinator's
    ``submit``), the final batch state and each worker's ``info()`` before and after (``busy_s`` counts
    the seconds its stages ran), with the stages seen in its ``running`` field, sampled every
    ``poll_s``: a stage shorter than the sampling period can be missed, so callers compare the count
    with the stages the batch needed.
    """
    from cluster.actors import COORDINATOR_NAME, existing_gpu_workers

    workers = existing_gpu_workers(_config.ray.namespace)
    before = ray.get([worker.info.remote() for worker in workers], timeout=60)
    seen: dict[str, set[str]] = {info["worker_id"]: set() for info in before}
    coordinator = ray.get_actor(COORDINATOR_NAME, namespace=_config.ray.namespace)
    submitted_at = time.time()
    started = time.monotonic()
    ray.get(coordinator.submit.remote(tenant, batch_id), timeout=120)
    finished = coordinator.wait.remote(tenant, batch_id, timeout_s)
    while not ray.wait([finished], timeout=poll_s)[0]:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"batch {batch_id} did not finish within {timeout_s:.0f} s")
        refs = [worker.info.options(max_task_retries=0).remote() for worker in workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
        for ref in ready:
            try:
                info = ray.get(ref)
            except Exception:  # noqa: BLE001 - a worker restarting: nothing to sample this round
                continue
            if info.get("running"):
                seen.setdefault(info["worker_id"], set()).add(info["running"])
    polled_wall_s = time.monotonic() - started
    state = ray.get(finished)
    after = ray.get([worker.info.remote() for worker in workers], timeout=60)
    return {"submitted_at": submitted_at, "polled_wall_s": polled_wall_s, "state": state,
            "workers": [{"worker_id": a["worker_id"], "node_ip": a["node_ip"], "pid": a["pid"],
                         "busy_s_before": b["busy_s"], "busy_s_after": a["busy_s"],
                         "seen": sorted(seen.get(a["worker_id"], ()))}
                        for b, a in zip(before, after)]}


def delete_person(tenant: str, batch_id: str, person_id: str, include_outputs: bool = True,
                  timeout_s: float = 600.0) -> dict[str, Any]:
    """An early deletion through the retention controller, as ``headshots delete`` asks for it."""
    from cluster.actors import RETENTION_NAME

    controller = ray.get_actor(RETENTION_NAME, namespace=_config.ray.namespace)
    return ray.get(controller.delete.remote(tenant, batch_id, person_id, include_outputs, "multinode-test"),
                   timeout=timeout_s)


def train_on_node(node_ip: str, tenant: str, batch_id: str, person_id: str) -> dict[str, Any]:
    """Send a fine-tune of this person straight to the GPU worker on ``node_ip`` (with the coordinator's
    current epoch); returns ``{"ran": True}`` or the name of the exception the stage raised."""
    from cluster.actors import existing_gpu_workers
    from cluster.jobs import PersonJob

    for worker in existing_gpu_workers(_config.ray.namespace):
        try:
            info = ray.get(worker.info.options(max_task_retries=0).remote(), timeout=30)
        except Exception:  # noqa: BLE001 - not answering: not the one asked for
            continue
        if info["node_ip"] != node_ip:
            continue
        job = PersonJob(tenant=tenant, batch_id=batch_id, person_id=person_id, base_model="tiny", styles=("office",),
                        images_per_style=1, epoch=coordinator_epoch())
        try:
            ray.get(worker.train.options(max_task_retries=0).remote(job), timeout=300)
        except ray.exceptions.RayTaskError as error:
            return {"ran": False, "error": type(error.cause).__name__, "worker_id": info["worker_id"]}
        return {"ran": True, "worker_id": info["worker_id"]}
    raise LookupError(f"no GPU worker answers on node {node_ip}")


FUNCTIONS = {function.__name__: function for function in (
    ping, nodes, gpu_task_nodes, actor_nodes, start_stack, wait_gpu_workers, gpu_workers, submit, coordinator_epoch,
    remove_stack, run_batch_watched, delete_person, train_on_node)}


def main(argv: list[str]) -> None:
    from tests.integration.multinode import serve_driver

    fd, address, node_ip, namespace = int(argv[0]), argv[1], argv[2], argv[3]
    ray.init(address=address, _node_ip_address=node_ip, namespace=namespace, log_to_driver=False,
             configure_logging=False)
    try:
        serve_driver(fd, FUNCTIONS)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
