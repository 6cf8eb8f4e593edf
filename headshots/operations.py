"""Operations that go through the stack's actors, shared by the CLI and the HTTP API.

Cancel, retry and `more` go through the coordinator (it owns running persons); early deletion goes
through the retention controller (it owns deletion, receipts and the workers' purge). Each call takes
a resolved config (store endpoint and Ray address filled in, see :func:`headshots.stack.connect`).
"""

from __future__ import annotations

from typing import Any

from storage.state import OPEN_BATCH_STATES, BatchStatus, StateStore


class OperationRefused(ValueError):
    """The actor refused the request as asked (a person in the wrong state, an unknown style...):
    the caller's input, not a failure of the system. The message says what is allowed."""


def call_actor(handle, method: str, *call_args):
    """Call a stack actor and wait; a ValueError it raises comes back as :class:`OperationRefused`."""
    import ray

    try:
        return ray.get(getattr(handle, method).remote(*call_args))
    except ray.exceptions.RayTaskError as error:
        if isinstance(getattr(error, "cause", None), ValueError):
            raise OperationRefused(str(error.cause)) from None
        raise


def coordinator(resolved):
    from cluster.actors import get_or_create_coordinator
    from headshots.stack import connect_ray, load_info

    connect_ray(resolved)
    info = load_info(resolved)
    return get_or_create_coordinator(resolved, metrics_port=(info.metrics_port if info else 0) or None)


def coordinator_call(resolved, method: str, *call_args):
    return call_actor(coordinator(resolved), method, *call_args)


def retention_controller(resolved):
    from cluster.actors import get_or_create_retention_controller
    from headshots.stack import connect_ray, load_info

    connect_ray(resolved)
    info = load_info(resolved)
    return get_or_create_retention_controller(resolved, metrics_port=(info.retention_metrics_port if info else 0)
                                              or None)


def cancel(resolved, states: StateStore, *, tenant: str, batch_id: str, person_id: str | None = None
           ) -> dict[str, Any]:
    """Cancel a batch (every person not yet final) or one person; the batch becomes ``cancelled``.

    Raises:
        OperationRefused: the batch has no such person.
        storage.store.ObjectNotFound: no such batch.
    """
    batch = states.load_batch(tenant, batch_id)
    if person_id and person_id not in batch.person_ids:
        raise OperationRefused(f"batch {batch_id!r} has no person {person_id!r}")
    person_ids = [person_id] if person_id else batch.person_ids
    result = coordinator_call(resolved, "cancel_persons",
                              [{"tenant": tenant, "batch_id": batch_id, "person_id": p} for p in person_ids])
    if not person_id:
        batch = states.load_batch(tenant, batch_id)
        if batch.state in OPEN_BATCH_STATES:
            batch.state = BatchStatus.CANCELLED
            states.save_batch(batch)
    return result


def retry(resolved, *, tenant: str, batch_id: str, person_id: str) -> dict[str, Any]:
    return coordinator_call(resolved, "retry_person", tenant, batch_id, person_id)


def more(resolved, *, tenant: str, batch_id: str, person_id: str, count: int, style: str | None) -> dict[str, Any]:
    return coordinator_call(resolved, "more_headshots", tenant, batch_id, person_id, count, style)


def delete(resolved, *, tenant: str, batch_id: str | None = None, person_id: str | None = None,
           include_outputs: bool = False, requested_by: str = "operator") -> dict[str, Any]:
    """Early deletion now: ``{request_id, receipt_id, objects_deleted, persons, seconds, verification}``."""
    controller = retention_controller(resolved)
    return call_actor(controller, "delete", tenant, batch_id, person_id, include_outputs, requested_by)
