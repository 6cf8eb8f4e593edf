"""The messages that move between the coordinator and the workers: small, JSON-shaped, ids only.

A job never carries image bytes or names: workers read their inputs from the store under the person's
own prefix, and return the records of what they wrote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from storage.keys import PersonRef
from storage.store import StoredObject


@dataclass(frozen=True)
class PersonJob:
    tenant: str
    batch_id: str
    person_id: str
    base_model: str
    styles: tuple[str, ...] = ()
    images_per_style: int = 0
    upload_keys: tuple[str, ...] = ()
    # The names operators know the photos by (same order as upload_keys), for rejection messages.
    upload_names: tuple[str, ...] = ()
    # Scheduling: higher priority first within a tenant; then the person's place in line (the same
    # for every stage and retry, so a person's generate never waits behind its batch's later training).
    priority: int = 0
    queue_position: float = 0.0
    # The coordinator's fencing epoch: a worker that has seen a newer one stops this job's stage (its
    # coordinator died and a new one has re-sent the work), so two runs of a stage never overlap.
    epoch: int = 0
    # generate only: images per style beyond the batch's images_per_style (`headshots more`), as
    # (style, count) pairs; slots already stored are kept, so only the new ones are made.
    extra_by_style: tuple[tuple[str, int], ...] = ()

    @property
    def ref(self) -> PersonRef:
        return PersonRef(self.tenant, self.batch_id, self.person_id)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class WorkerLost(RuntimeError):
    """The process running a stage died or became unreachable (preemption, OOM kill, node loss).

    The stage is run again; this does not count as one of the person's attempts, since the person's
    input is not at fault.
    """


@dataclass
class StageResult:
    """What a stage did: objects written (every version), figures for metrics, stage-specific details."""

    objects: list[StoredObject] = field(default_factory=list)
    seconds: float = 0.0
    training_steps: int = 0
    images_by_style: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
