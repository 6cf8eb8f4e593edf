"""Who a request is, which tenant it acts for, and whether it is within its rate limit.

- A tenant's key acts for its own tenant only. Naming another tenant (``X-Headshots-Tenant`` or
  ``?tenant=``) is refused with 403; ids of other tenants' batches simply are not found (404), because
  every key the API reads is built under the acting tenant's prefix.
- An admin key (``headshots tenants create-admin-key``) acts for the tenant it names.
- Verified keys are cached for ``api.auth_cache_s`` (a revocation takes effect within that time).
- Rate limits are token buckets per tenant in this process (``rate_limit_per_s``, bursts of up to
  twice that); a deployment with several API replicas divides each tenant's limit between them.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from headshots import tenants
from headshots.api.errors import ApiError
from storage import keys
from storage.store import ArtifactStore

TENANT_HEADER = "X-Headshots-Tenant"
BURST_FACTOR = 2.0
bearer_scheme = HTTPBearer(auto_error=False, description="an API key from `headshots tenants create`")


@dataclass(frozen=True)
class TenantContext:
    """The acting tenant of one request, and who is acting."""

    tenant: str
    principal: tenants.Principal
    record: tenants.TenantRecord


class TokenBuckets:
    """Per-name token buckets: ``rate`` tokens per second, at most ``rate * BURST_FACTOR`` saved up."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, name: str, rate: float) -> float:
        """Take one token; returns 0 when allowed, else the seconds until a token is due."""
        capacity = max(1.0, rate * BURST_FACTOR)
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(name, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / rate


class Authenticator:
    def __init__(self, store: ArtifactStore, *, cache_s: float):
        self.store = store
        self.cache_s = cache_s
        self._principals: dict[str, tuple[tenants.Principal | None, float]] = {}
        self._records: dict[str, tuple[tenants.TenantRecord | None, float]] = {}
        self._lock = threading.Lock()
        self.buckets = TokenBuckets()

    def principal(self, credentials: HTTPAuthorizationCredentials | None) -> tenants.Principal:
        if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
            raise ApiError(401, "unauthenticated", "send an API key as `Authorization: Bearer hs_...` "
                           "(`headshots tenants create` makes one)", "Authorization",
                           headers={"WWW-Authenticate": "Bearer"})
        api_key = credentials.credentials
        # Cached by a digest of the key, so the cache never holds a usable key.
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            cached = self._principals.get(digest)
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            principal = tenants.authenticate(self.store, api_key)
            if self.cache_s:
                with self._lock:
                    if len(self._principals) > 10_000:
                        self._principals.clear()
                    self._principals[digest] = (principal, now + self.cache_s)
        if principal is None:
            raise ApiError(401, "invalid_api_key", "this API key is not valid (unknown, revoked or mistyped); "
                           "ask the operator for a new one", "Authorization", headers={"WWW-Authenticate": "Bearer"})
        return principal

    def tenant_record(self, tenant: str) -> tenants.TenantRecord | None:
        now = time.monotonic()
        with self._lock:
            cached = self._records.get(tenant)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            record = tenants.load_tenant(self.store, tenant)
        except tenants.TenantNotFound:
            record = None
        if self.cache_s:
            with self._lock:
                self._records[tenant] = (record, now + self.cache_s)
        return record

    def context(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> TenantContext:
        """The acting tenant, after authentication and the rate limit."""
        principal = self.principal(credentials)
        named = request.headers.get(TENANT_HEADER) or request.query_params.get("tenant")
        if principal.is_admin:
            if not named:
                raise ApiError(400, "tenant_required", f"an admin key must name the tenant it acts for with the "
                               f"{TENANT_HEADER} header (or ?tenant=)", TENANT_HEADER)
            try:
                keys.validate_id(named, field="tenant")
            except keys.InvalidId as error:
                raise ApiError(422, "invalid_id", str(error), TENANT_HEADER) from None
            tenant = named
        else:
            tenant = principal.tenant
            if named and named != tenant:
                raise ApiError(403, "forbidden", "this API key acts for its own tenant only; leave out "
                               f"{TENANT_HEADER} (or use an admin key)", TENANT_HEADER)
        record = self.tenant_record(tenant)
        if record is None:
            if principal.is_admin:
                raise ApiError(404, "tenant_not_found", f"no tenant {tenant!r}: `headshots tenants list`",
                               TENANT_HEADER)
            raise ApiError(401, "invalid_api_key", "this API key's tenant no longer exists", "Authorization")
        if not principal.is_admin:
            wait_s = self.buckets.take(tenant, record.rate_limit_per_s)
            if wait_s > 0:
                raise ApiError(429, "rate_limited", f"more than {record.rate_limit_per_s:g} requests per second "
                               f"for tenant {tenant}; retry after {wait_s:.2f} s", None,
                               headers={"Retry-After": str(max(1, round(wait_s + 0.5)))})
        return TenantContext(tenant=tenant, principal=principal, record=record)
