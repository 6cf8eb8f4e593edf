"""Who a request is, which tenant it acts for, and whether it is within its rate limit.

- A tenant's key acts for its own tenant only. Naming another tenant (``X-Headshots-Tenant`` or
  ``?tenant=``) is refused with 403; ids of other tenants' batches simply are not found (404), because
  every key the API reads is built under the acting tenant's prefix.
- An admin key (``headshots tenants create-admin-key``) acts for the tenant it names.
- Verified keys are cached for ``api.auth_cache_s`` (a revocation takes effect within that time).
- Rate limits are token buckets per tenant in this process (``rate_limit_per_s``, bursts of up to
  twice that); a deployment with several API replicas divides each tenant's limit between them.
- Requests with a key that is not valid are limited per client address (an IPv6 client by its /64):
  ``BAD_KEY_BURST`` failures, then one more every ``1 / BAD_KEY_RATE_PER_S`` seconds; past that the
  address gets 429 with Retry-After before its key is even looked up, so keys cannot be guessed at
  speed and failures cost no store reads. A key this process verified before still passes (it is
  checked as usual), so a studio sharing an address with a guesser keeps working; its own limit is
  its tenant's.
"""

from __future__ import annotations

import hashlib
import ipaddress
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
BAD_KEY_BURST = 20
BAD_KEY_RATE_PER_S = 0.5
# Verified keys remembered (by digest) so that a throttled address still lets them through.
KNOWN_GOOD_S = 24 * 3600.0
MAX_TRACKED = 10_000
bearer_scheme = HTTPBearer(auto_error=False, description="an API key from `headshots tenants create`")


@dataclass(frozen=True)
class TenantContext:
    """The acting tenant of one request, and who is acting."""

    tenant: str
    principal: tenants.Principal
    record: tenants.TenantRecord


class TokenBuckets:
    """Per-name token buckets: ``rate`` tokens per second, at most ``capacity`` (default
    ``rate * BURST_FACTOR``) saved up. At most ``max_names`` buckets are kept: past that, full ones
    (which hold nothing a new bucket would not) are dropped, then all if that is not enough."""

    def __init__(self, clock=time.monotonic, *, max_names: int = 100_000):
        self._clock = clock
        self._max_names = max_names
        self._buckets: dict[str, tuple[float, float, float, float]] = {}  # tokens, last, rate, capacity
        self._lock = threading.Lock()

    def take(self, name: str, rate: float, capacity: float | None = None) -> float:
        """Take one token; returns 0 when allowed, else the seconds until a token is due."""
        return self._take(name, rate, capacity, take=True)

    def wait_s(self, name: str, rate: float, capacity: float | None = None) -> float:
        """0 when a token is there (none is taken), else the seconds until one is due."""
        return self._take(name, rate, capacity, take=False)

    def _take(self, name: str, rate: float, capacity: float | None, *, take: bool) -> float:
        capacity = max(1.0, rate * BURST_FACTOR if capacity is None else capacity)
        now = self._clock()
        with self._lock:
            if not take and name not in self._buckets:
                return 0.0  # a full bucket: nothing to remember
            tokens, last, _, _ = self._buckets.get(name, (capacity, now, rate, capacity))
            tokens = min(capacity, tokens + (now - last) * rate)
            allowed = tokens >= 1.0
            if take and allowed:
                tokens -= 1.0
            if name not in self._buckets and len(self._buckets) >= self._max_names:
                self._prune(now)
            self._buckets[name] = (tokens, now, rate, capacity)
            return 0.0 if allowed else (1.0 - tokens) / rate

    def _prune(self, now: float) -> None:
        full = [name for name, (tokens, last, rate, capacity) in self._buckets.items()
                if tokens + (now - last) * rate >= capacity]
        for name in full:
            del self._buckets[name]
        if len(self._buckets) >= self._max_names:
            self._buckets.clear()


def client_address(request: Request) -> str:
    """The peer the request came from, as the bad-key limiter counts it: an IPv4 address, or the /64
    of an IPv6 one (a single host usually holds a whole /64). Behind a proxy this is the proxy, unless
    uvicorn trusts it for X-Forwarded-For (``--forwarded-allow-ips``)."""
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class Authenticator:
    def __init__(self, store: ArtifactStore, *, cache_s: float):
        self.store = store
        self.cache_s = cache_s
        self._principals: dict[str, tuple[tenants.Principal | None, float]] = {}
        self._records: dict[str, tuple[tenants.TenantRecord | None, float]] = {}
        self._lock = threading.Lock()
        self.buckets = TokenBuckets()
        # Failed key checks per client address (see the module's docstring); the clock is the tests'.
        self.failures = TokenBuckets()
        self._known_good: dict[str, float] = {}

    def principal(self, credentials: HTTPAuthorizationCredentials | None, client: str = "unknown"
                  ) -> tenants.Principal:
        """The principal of a valid key.

        Raises:
            ApiError: 401 without a key or with one that is not valid; 429 when ``client`` sent too
                many keys that were not valid (``Retry-After`` says when to try again).
        """
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
        if cached is not None and cached[1] > now and cached[0] is not None:
            return cached[0]
        wait_s = self.failures.wait_s(client, BAD_KEY_RATE_PER_S, BAD_KEY_BURST)
        if wait_s > 0 and not self._known(digest, now):
            retry_after = max(1, round(wait_s + 0.5))
            raise ApiError(429, "too_many_invalid_keys", "too many requests with API keys that are not valid from "
                           f"this address; retry after {retry_after} s with a valid key", "Authorization",
                           headers={"Retry-After": str(retry_after)})
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            principal = tenants.authenticate(self.store, api_key)
            if self.cache_s:
                with self._lock:
                    if len(self._principals) > MAX_TRACKED:
                        self._principals.clear()
                    self._principals[digest] = (principal, now + self.cache_s)
        if principal is None:
            self.failures.take(client, BAD_KEY_RATE_PER_S, BAD_KEY_BURST)
            raise ApiError(401, "invalid_api_key", "this API key is not valid (unknown, revoked or mistyped); "
                           "ask the operator for a new one", "Authorization", headers={"WWW-Authenticate": "Bearer"})
        with self._lock:
            if len(self._known_good) > MAX_TRACKED:
                self._known_good = {key: until for key, until in self._known_good.items() if until > now}
                if len(self._known_good) > MAX_TRACKED:
                    self._known_good.clear()
            self._known_good[digest] = now + KNOWN_GOOD_S
        return principal

    def _known(self, digest: str, now: float) -> bool:
        """Whether this process verified the key with this digest lately (it is checked again anyway)."""
        with self._lock:
            return self._known_good.get(digest, 0.0) > now

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
        principal = self.principal(credentials, client_address(request))
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
