"""A worker pool for coordinator tests without Ray: stages answer at once, or raise what a test scripts."""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.jobs import PersonJob, StageResult
from storage import keys


class ScriptedPool:
    """Runs stages instantly; ``failures[(person_id, stage)]`` lists exceptions to raise first, in order."""

    def __init__(self, failures: dict[tuple[str, str], list[BaseException]] | None = None,
                 during: dict[tuple[str, str], Any] | None = None):
        self.failures = {key: list(errors) for key, errors in (failures or {}).items()}
        # (person_id, stage) -> a callable run (in a thread) the first time that stage runs.
        self.during = dict(during or {})
        self.calls: list[tuple[str, str, int]] = []
        self.fenced: list[int] = []

    async def _stage(self, stage: str, job: PersonJob, **details: Any) -> StageResult:
        self.calls.append((job.person_id, stage, job.epoch))
        action = self.during.pop((job.person_id, stage), None)
        if action is not None:
            await asyncio.to_thread(action)
        pending = self.failures.get((job.person_id, stage))
        if pending:
            raise pending.pop(0)
        return StageResult(details=details)

    async def ingest(self, job):
        return await self._stage("ingest", job, accepted=list(job.upload_keys))

    async def train(self, job):
        return await self._stage("train", job, steps=6)

    async def generate(self, job):
        return await self._stage("generate", job, headshots=[
            {"style": style, "index": index, "seed": index, "prompt": "p", "negative_prompt": "", "seconds": 0.0,
             "key": keys.headshot_key(job.ref, style, index, index)}
            for style in job.styles for index in range(job.images_per_style)])

    async def package_person(self, job, headshots):
        return await self._stage("package", job)

    async def package_batch(self, **fields):
        return StageResult()

    async def revoke(self, prefixes):
        return []

    async def allow(self, prefixes):
        return []

    async def fence(self, epoch):
        self.fenced.append(epoch)
        return [{"worker_id": "scripted", "epoch": epoch, "drained": True}]

    def eta_persons_seconds(self, tenant, batch_id):
        return {}  # nothing queued on GPUs in this pool

    def eta_seconds(self, tenant, batch_id):
        return 30.0
