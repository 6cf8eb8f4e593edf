"""Bucket lifecycle rules: the store's own expiry, as a backstop behind the retention sweep.

Never the only mechanism: lifecycle engines run late (often once a day, sometimes much later), and
they count from an object's creation, not from when its person was processed. So the rules expire
current versions only after the policy's ceiling (``max_days``) plus a grace period — later than the
sweep ever would — and clean up what versioning leaves behind (noncurrent versions, orphaned delete
markers). If the sweep stops working, these rules bound how long anything can survive.
"""

from __future__ import annotations

from typing import Any

from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, NoncurrentVersionExpiration, Rule

from storage.retention import RetentionPolicy
from storage.store import ArtifactStore

BACKSTOP_CLASSES = ("uploads", "derived", "models")


def backstop_days(policy: RetentionPolicy, artifact: str, grace_days: int) -> int | None:
    """Days after creation at which the store itself expires an object of this class (None: never)."""
    if artifact in BACKSTOP_CLASSES:
        return policy.max_days + grace_days
    configured = [policy.days[artifact]] + [t[artifact] for t in policy.tenants.values() if artifact in t]
    if None in configured:
        return None  # some tenant keeps this class: the store must not expire it by age
    return policy.max_days + grace_days


def lifecycle_for(policy: RetentionPolicy, artifact: str, grace_days: int) -> LifecycleConfig | None:
    days = backstop_days(policy, artifact, grace_days)
    if days is None:
        return None
    everything = Filter(prefix="")
    return LifecycleConfig([
        Rule(ENABLED, rule_filter=everything, rule_id=f"headshots-{artifact}-expire",
             expiration=Expiration(days=days),
             noncurrent_version_expiration=NoncurrentVersionExpiration(noncurrent_days=max(1, grace_days))),
        Rule(ENABLED, rule_filter=everything, rule_id=f"headshots-{artifact}-delete-markers",
             expiration=Expiration(expired_object_delete_marker=True)),
    ])


def apply_lifecycle_rules(store: ArtifactStore, policy: RetentionPolicy, *, grace_days: int) -> dict[str, Any]:
    """Set the backstop rules on every artifact bucket that has one (idempotent). Returns what was set."""
    applied = {}
    for artifact in ("uploads", "derived", "models", "outputs"):
        config = lifecycle_for(policy, artifact, grace_days)
        if config is None:
            continue
        bucket = store.bucket(artifact)
        store.with_retry(lambda bucket=bucket, config=config: store.client.set_bucket_lifecycle(bucket, config),
                         artifact=artifact, action="cannot set the bucket's lifecycle rules")
        applied[artifact] = backstop_days(policy, artifact, grace_days)
    return applied


def read_lifecycle_days(store: ArtifactStore, artifact: str) -> int | None:
    bucket = store.bucket(artifact)
    config = store.with_retry(lambda: store.client.get_bucket_lifecycle(bucket), artifact=artifact,
                              action="cannot read the bucket's lifecycle rules")
    if config is None:
        return None
    for rule in config.rules:
        if rule.expiration is not None and rule.expiration.days:
            return rule.expiration.days
    return None
