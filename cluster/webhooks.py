"""Batch webhooks: signed event deliveries to the URLs a batch registered, retried with backoff, in
threads of their own so that a receiver that is slow or down never holds up the pipeline.

Events (ids and states only, never names or emails): ``batch.completed``, ``person.needs_photos``,
``person.failed`` (the coordinator), ``deletion.completed`` (the retention controller).

Delivery is at-least-once. :meth:`WebhookDispatcher.emit` only puts the event in an in-memory queue;
the dispatcher's scheduler thread resolves the batch's subscriptions, writes one pending record per
delivery under ``_system/webhooks/pending/<source>/`` and hands it to a small pool of sender threads.
A record is removed once its delivery succeeded (any 2xx) or was given up (``webhooks.max_attempts`` or
``webhooks.max_age_s``); a dispatcher that starts picks up its source's records and tries them at
once, so deliveries survive a restart. Receivers drop repeats by ``X-Headshots-Delivery`` (the event
id, the same on every attempt; event ids are derived from the facts they report, so an event emitted
twice, e.g. around a crash, carries the same id). The window in which an event can be lost is between
the state change it reports and its pending record being written (milliseconds).

Signature: ``X-Headshots-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>`` with
``X-Headshots-Timestamp`` in unix seconds; :func:`verify_signature` checks it for a receiver. The secret
is the tenant's ``webhook_secret`` (its tenant record), or for tenants without a record (batches an
operator submitted from the CLI) the stack's own, generated once into ``_system/webhooks/default-secret``.

Receiver addresses (SSRF): at every attempt the receiver's host is resolved once and each address is
checked; a host that resolves to a loopback, private, link-local (e.g. the cloud metadata service
169.254.169.254), shared, multicast or reserved address is refused and the delivery given up at once,
unless ``webhooks.allow_private_addresses`` is on. The connection then goes to the checked addresses
themselves (TLS still verifies the URL's host name), so a second DNS answer between the check and the
connection (DNS rebinding) cannot send it elsewhere.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import hmac
import http.client
import ipaddress
import itertools
import json
import logging
import random
import secrets
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from monitoring.metrics import WEBHOOK_EVENTS, WebhookMetrics
from storage import keys
from storage.store import ArtifactStore, ObjectExists, ObjectNotFound, StoreError, utc_now_iso

logger = logging.getLogger(__name__)

EVENT_TYPES = WEBHOOK_EVENTS
# Person states that are announced (as ``person.<state>``) when a person reaches them.
PERSON_EVENT_STATES = ("needs_photos", "failed")
# The only keys an event's data may carry: ids, states and counts, never a name, an email or free text.
DATA_FIELDS = ("tenant", "batch_id", "person_id", "state", "receipt_id", "kind", "classes", "persons_by_state")
MAX_WEBHOOKS_PER_BATCH = 5
MAX_URL_LENGTH = 2048
WEBHOOK_FIELDS = ("url", "events")
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
# Sender threads per dispatcher: one receiver timing out holds one of them, not the others.
DELIVERY_THREADS = 8
# How long a tenant's secret and a batch's subscriptions are reused before being read again.
CACHE_TTL_S = 60.0
MAX_CACHED_BATCHES = 1000
# Deliveries this process has delivered, remembered so that the same event emitted again (e.g. a person
# the coordinator moved to needs_photos, and then read again by the submit's own announcement) is not
# posted twice. Bounded: an event older than this many deliveries is posted again (receivers dedupe by id).
REMEMBERED_DELIVERIES = 10_000
# Bytes of a receiver's answer that are read (and thrown away): only the status matters.
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "headshots-webhooks/1"


# --- registration -------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_problem(url: Any) -> str | None:
    """Why ``url`` cannot receive webhooks, or None when it can."""
    if not isinstance(url, str) or not url:
        return f"must be an https:// URL but is {url!r}"
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters but has {len(url)}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as error:
        return f"is not a valid URL ({error}): {url!r}"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"must be an https:// URL with a host but is {url!r}"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@): deliveries are signed instead"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return (f"must use https (plain http is allowed only on loopback, e.g. http://127.0.0.1): deliveries "
                f"carry no secrets, but batch and person ids should be encrypted in transit; got {url!r}")
    return None


def parse_webhooks(raw: Any, *, where: str = "field 'webhooks'") -> tuple[list[dict[str, Any]], list[str]]:
    """Validate a batch's ``webhooks: [{url, events}]`` registration.

    Args:
        raw: the field's value (None: no webhooks).
        where: how problems name the field (e.g. ``"team.yaml: field 'webhooks'"``).

    Returns:
        ``(webhooks, problems)``: the normalised list (``events`` filled in with every event type when
        left out, in the order of :data:`EVENT_TYPES`) and every problem found (empty when valid).
    """
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [f"{where} must be a list of {{url, events}} entries but is {type(raw).__name__}"]
    if len(raw) > MAX_WEBHOOKS_PER_BATCH:
        return [], [f"{where} has {len(raw)} entries; at most {MAX_WEBHOOKS_PER_BATCH} per batch"]
    problems: list[str] = []
    webhooks: list[dict[str, Any]] = []
    for position, entry in enumerate(raw):
        entry_where = f"{where}[{position}]"
        if not isinstance(entry, dict):
            problems.append(f"{entry_where} must be a mapping with keys {', '.join(WEBHOOK_FIELDS)}")
            continue
        unknown = sorted(map(str, set(entry) - set(WEBHOOK_FIELDS)))
        if unknown:
            problems.append(f"{entry_where} has unknown key(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(WEBHOOK_FIELDS)}")
        problem = url_problem(entry.get("url"))
        if problem:
            problems.append(f"{entry_where}.url {problem}")
        events = entry.get("events")
        if events is None:
            events = list(EVENT_TYPES)
        elif isinstance(events, str):
            events = [part.strip() for part in events.split(",") if part.strip()]
        if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
            problems.append(f"{entry_where}.events must be a non-empty list of event types (leave it out for all): "
                            f"{', '.join(EVENT_TYPES)}")
            continue
        wrong = [event for event in events if event not in EVENT_TYPES]
        if wrong:
            problems.append(f"{entry_where}.events names unknown event type(s) {', '.join(map(repr, wrong))}; "
                            f"allowed: {', '.join(EVENT_TYPES)}")
            continue
        if not problem and not unknown:
            webhooks.append({"url": entry["url"], "events": [e for e in EVENT_TYPES if e in events]})
    urls = [w["url"] for w in webhooks]
    if len(set(urls)) != len(urls):
        problems.append(f"{where} lists a URL twice; list each URL once, with all its events")
    return (webhooks if not problems else []), problems


# --- events and signatures -----------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookEvent:
    """One event, as delivered: ``{"id", "type", "created_at", "data"}``."""

    id: str
    type: str
    created_at: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"webhook event type must be one of {', '.join(EVENT_TYPES)} but is {self.type!r}")
        keys.validate_id(self.id, field="webhook event id")
        extra = sorted(set(self.data) - set(DATA_FIELDS))
        if extra:
            raise ValueError(f"webhook event data may carry only {', '.join(DATA_FIELDS)} (ids, states, counts: "
                             f"never names or emails) but has {', '.join(extra)}")
        keys.validate_id(self.data.get("tenant"), field="tenant")
        keys.validate_id(self.data.get("batch_id"), field="batch_id")
        if self.data.get("person_id") is not None:
            keys.validate_id(self.data["person_id"], field="person_id")

    @property
    def tenant(self) -> str:
        return self.data["tenant"]

    @property
    def batch_id(self) -> str:
        return self.data["batch_id"]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "created_at": self.created_at, "data": dict(self.data)}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> "WebhookEvent":
        return cls(id=document["id"], type=document["type"], created_at=document["created_at"],
                   data=dict(document["data"]))

    def body(self) -> bytes:
        """The exact bytes delivered (and signed)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


def new_event(event_type: str, *, tenant: str, batch_id: str, facts: Iterable[Any] = (), **data: Any
              ) -> WebhookEvent:
    """An event whose id is derived from ``event_type``, the ids and ``facts`` (e.g. the time a person was
    processed): announcing the same thing twice gives the same id, so receivers drop the repeat."""
    data = {"tenant": tenant, "batch_id": batch_id, **{k: v for k, v in data.items() if v is not None}}
    seed = json.dumps([event_type, tenant, batch_id, data.get("person_id"), data.get("receipt_id"), list(facts)],
                      default=str)
    event_id = "evt-" + hashlib.sha256(seed.encode()).hexdigest()[:32]
    return WebhookEvent(id=event_id, type=event_type, created_at=utc_now_iso(), data=data)


def person_event(person) -> WebhookEvent:
    """``person.needs_photos`` / ``person.failed`` for a person (a :class:`storage.state.PersonState`)."""
    return new_event(f"person.{person.state}", tenant=person.tenant, batch_id=person.batch_id,
                     person_id=person.person_id, state=person.state, facts=[person.processed_at])


def batch_completed_event(batch, persons_by_state: Mapping[str, int] | None = None) -> WebhookEvent:
    """``batch.completed`` for a batch (a :class:`storage.state.BatchState`) that just became done."""
    return new_event("batch.completed", tenant=batch.tenant, batch_id=batch.batch_id, state=batch.state,
                     persons_by_state=dict(persons_by_state) if persons_by_state else None,
                     facts=[batch.finished_at])


def deletion_events(receipt) -> list[WebhookEvent]:
    """One ``deletion.completed`` per person a deletion receipt (:class:`storage.receipts.Receipt`) covers."""
    events = []
    seen = set()
    for person in receipt.persons:
        ref = (person["tenant"], person["batch_id"], person["person_id"])
        if ref in seen:
            continue
        seen.add(ref)
        prefix = "/".join(ref) + "/"
        classes = sorted({item["artifact"] for item in receipt.objects if item.get("key", "").startswith(prefix)})
        events.append(new_event("deletion.completed", tenant=ref[0], batch_id=ref[1], person_id=ref[2],
                                state="deleted" if receipt.kind == "request" else None,
                                receipt_id=receipt.receipt_id, kind=receipt.kind, classes=classes))
    return events


def submitted_person_events(store: ArtifactStore, tenant: str, batch_id: str) -> list[WebhookEvent]:
    """``person.needs_photos`` for persons the submit itself left there (no usable photo at the edge):
    they never pass through the coordinator's transitions, so they are announced when the batch starts."""
    from storage.state import StateStore

    states = StateStore(store)
    batch = states.load_batch(tenant, batch_id)
    return [person_event(person) for person in states.load_persons(batch) if person.state in PERSON_EVENT_STATES]


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``X-Headshots-Signature`` value: ``v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>``."""
    message = f"{timestamp}.".encode() + body
    return f"{SIGNATURE_VERSION}=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify_signature(secret: str, timestamp: str | int, body: bytes | str, signature: str,
                     tolerance_s: float = DEFAULT_TOLERANCE_S, *, now: float | None = None) -> bool:
    """Whether a delivery is authentic and fresh (for receivers).

    Args:
        secret: the tenant's ``webhook_secret`` (or the stack's default secret).
        timestamp: the ``X-Headshots-Timestamp`` header (unix seconds).
        body: the raw request body, exactly as received.
        signature: the ``X-Headshots-Signature`` header (``v1=<hex>``; several, comma-separated, are
            accepted: any one matching is enough).
        tolerance_s: reject timestamps further than this from ``now`` (replayed or very late requests).
        now: the current unix time (default: the clock).

    Returns:
        True only if the timestamp is within ``tolerance_s`` and a ``v1`` signature matches (compared in
        constant time).
    """
    try:
        sent_at = int(str(timestamp).strip())
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent_at) > tolerance_s:
        return False
    if isinstance(body, str):
        body = body.encode()
    expected = sign(secret, sent_at, body).encode()
    matched = False
    for candidate in str(signature or "").split(","):
        candidate = candidate.strip()
        if candidate.startswith(f"{SIGNATURE_VERSION}="):
            # Every candidate is compared (no early exit), in constant time.
            matched |= hmac.compare_digest(candidate.encode(), expected)
    return matched


# --- secrets -------------------------------------------------------------------------------------


def default_secret(store: ArtifactStore) -> str:
    """The stack's own signing secret, generated on first use (a create-only write: of two processes
    generating it at once, one wins and the other reads the winner's)."""
    try:
        return store.get("state", keys.WEBHOOK_DEFAULT_SECRET_KEY).decode().strip()
    except ObjectNotFound:
        pass
    candidate = secrets.token_hex(32)
    try:
        store.put("state", keys.WEBHOOK_DEFAULT_SECRET_KEY, candidate.encode(), content_type="text/plain",
                  if_absent=True)
        return candidate
    except ObjectExists:
        return store.get("state", keys.WEBHOOK_DEFAULT_SECRET_KEY).decode().strip()


def tenant_secret(store: ArtifactStore, tenant: str) -> str:
    """The secret that signs ``tenant``'s deliveries: its record's ``webhook_secret``, or the stack's
    default secret for a tenant without a record (or whose record has no secret)."""
    try:
        record = store.get_json("state", keys.tenant_record_key(tenant))
    except ObjectNotFound:
        return default_secret(store)
    secret = record.get("webhook_secret") if isinstance(record, dict) else None
    if isinstance(secret, str) and secret:
        return secret
    logger.warning("tenant %s has a record without a webhook_secret; signing with the stack's default secret",
                   tenant)
    return default_secret(store)


# --- delivery ------------------------------------------------------------------------------------


@dataclass
class Delivery:
    """One event to one URL, and how far its delivery got (persisted as the pending record)."""

    delivery_id: str
    event: WebhookEvent
    url: str
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"delivery_id": self.delivery_id, "event": self.event.to_json(), "url": self.url,
                "attempts": self.attempts, "created_at": self.created_at, "last_error": self.last_error}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> "Delivery":
        return cls(delivery_id=document["delivery_id"], event=WebhookEvent.from_json(document["event"]),
                   url=document["url"], attempts=int(document.get("attempts", 0)),
                   created_at=float(document.get("created_at", time.time())), last_error=document.get("last_error"))


class ReceiverRefused(Exception):
    """The receiver's host resolves to an address deliveries may not go to (see :func:`address_problem`)."""


# Address resolution for receivers: ``(host, port) -> [IP address, ...]``; tests pass a stub.
Resolver = Callable[[str, int], list[str]]
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, RFC 6052): judged by that address.
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


def address_problem(address: str) -> str | None:
    """Why deliveries may not go to ``address`` (an IP address), or None when it is public unicast.

    IPv6 addresses that embed an IPv4 one (IPv4-mapped, 6to4, NAT64) are judged by the IPv4 address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0: the zone does not matter
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64_PREFIX else None)
        if embedded is not None:
            problem = address_problem(str(embedded))
            return f"{problem}, as {embedded}" if problem else None
    for kind, flagged in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                          ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                          ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if flagged:
            return kind
    if not ip.is_global:  # e.g. 100.64.0.0/10, the carrier-grade NAT range
        return "not globally routable"
    return None


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order (an IP literal is itself).

    Raises:
        OSError: the name does not resolve (socket.gaierror), worth another attempt later.
    """
    addresses: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    return addresses


def receiver_addresses(url: str, *, allow_private: bool, resolve: Resolver = resolve_host) -> list[str]:
    """Resolve the receiver of ``url`` once and check every address it resolves to.

    A host with any refused address is refused as a whole: a name that mixes public and private
    answers is either misconfigured or trying to be picked on the private one.

    Args:
        url: the receiver's URL (already passed :func:`url_problem`).
        allow_private: ``webhooks.allow_private_addresses``: skip the check.
        resolve: the resolver.

    Returns:
        The addresses to connect to (see :func:`post`).

    Raises:
        ReceiverRefused: an address is not public unicast and ``allow_private`` is off.
        OSError: the host does not resolve.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    addresses = resolve(host, _port(parts))
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    if not allow_private:
        for address in addresses:
            problem = address_problem(address)
            if problem:
                raise ReceiverRefused(f"{host} resolves to {address} ({problem})")
    return addresses


def _port(parts) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def _connect_first(addresses: list[str], port: int, timeout_s: float) -> socket.socket:
    failure: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout_s)
        except OSError as error:
            failure = error
    assert failure is not None  # addresses is never empty (receiver_addresses)
    raise failure


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP to checked addresses, never resolving the host again; the Host header is the URL's."""

    def __init__(self, host: str, port: int, addresses: list[str], *, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self) -> None:
        self.sock = _connect_first(self._addresses, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to checked addresses; the certificate is still verified against the URL's host name."""

    def __init__(self, host: str, port: int, addresses: list[str], *, timeout: float):
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._addresses = addresses

    def connect(self) -> None:
        self.sock = self._tls.wrap_socket(_connect_first(self._addresses, self.port, self.timeout),
                                          server_hostname=self.host)


def post(url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float, addresses: list[str]) -> int:
    """POST ``body`` to ``url``, connecting only to ``addresses`` (from :func:`receiver_addresses`), and
    return the HTTP status. Redirects are not followed (a 3xx is a failed attempt).

    Raises:
        OSError, http.client.HTTPException: the receiver could not be reached or answered garbage.
    """
    parts = urlsplit(url)
    connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    # The port is always given: http.client would read the last group of an IPv6 literal as one.
    connection = connection_class(parts.hostname, _port(parts), addresses, timeout=timeout_s)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path, body=body, headers=dict(headers))
        response = connection.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        return response.status
    finally:
        connection.close()


class WebhookDispatcher:
    """Delivers events in the background; see the module docstring.

    Args:
        store: the artifact store (pending records, secrets, batch subscriptions).
        config: the ``webhooks`` config section.
        source: who emits (``coordinator``, ``retention``): each process picks up only its own records.
        metrics: counts attempts in ``headshots_webhook_deliveries_total{event,outcome}``.
        threads: sender threads.
        resolve: resolves receivers' hosts (tests pass a stub).
    """

    def __init__(self, store: ArtifactStore, config, *, source: str, metrics: WebhookMetrics | None = None,
                 threads: int = DELIVERY_THREADS, resolve: Resolver = resolve_host):
        self.store = store
        self.config = config
        self._resolve = resolve
        self.source = keys.validate_id(source, field="webhook source")
        self.metrics = metrics
        self._threads = threads
        self._cond = threading.Condition()
        # Each entry yields (event, the batch's webhooks or None: read them) when the scheduler gets to it.
        self._inbox: list[Callable[[], list[tuple[WebhookEvent, list[dict[str, Any]] | None]]]] = []
        self._due: list[tuple[float, int, Delivery]] = []
        self._sequence = itertools.count()
        # Deliveries known and not finished (queued, waiting for a retry, or being sent).
        self._active: set[str] = set()
        self._delivered: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._events_waiting = 0
        self._stopping = threading.Event()
        self._scheduler: threading.Thread | None = None
        self._senders: ThreadPoolExecutor | None = None
        self._secrets: dict[str, tuple[float, str]] = {}
        self._subscriptions: dict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = {}

    # --- public ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler (idempotent); it first picks up pending records left by an earlier process."""
        with self._cond:
            if self._scheduler is not None:
                return
            self._stopping.clear()
            self._senders = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix=f"webhook-{self.source}")
            self._scheduler = threading.Thread(target=self._run, name=f"webhooks-{self.source}", daemon=True)
            self._scheduler.start()

    def emit(self, event: WebhookEvent, webhooks: list[dict[str, Any]] | None = None) -> None:
        """Queue ``event`` for the batch's webhooks and return at once (never blocks on the store or a
        receiver). ``webhooks``: the batch's registrations when the caller has them; None reads them
        from the batch state (in the dispatcher's thread)."""
        subscriptions = None if webhooks is None else list(webhooks)
        self._enqueue(lambda: [(event, subscriptions)])

    def emit_from(self, events: Callable[[], list[WebhookEvent]]) -> None:
        """Like :meth:`emit`, for events that take store reads to find: ``events`` runs in the
        dispatcher's thread (e.g. :func:`submitted_person_events`)."""
        self._enqueue(lambda: [(event, None) for event in events()])

    def _enqueue(self, entry: Callable[[], list[tuple[WebhookEvent, list[dict[str, Any]] | None]]]) -> None:
        with self._cond:
            self._inbox.append(entry)
            self._events_waiting += 1
            self._cond.notify_all()
        if self._scheduler is None:
            self.start()

    def stop(self) -> None:
        """Stop scheduling (pending records stay in the store for the next dispatcher); attempts already
        being sent finish in the background."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
            scheduler, senders = self._scheduler, self._senders
            self._scheduler = self._senders = None
        if scheduler is not None:
            scheduler.join(timeout=5.0)
        if senders is not None:
            senders.shutdown(wait=False, cancel_futures=True)

    def pending(self) -> set[str]:
        """Ids of deliveries not finished yet (queued, waiting for a retry or being sent)."""
        with self._cond:
            return set(self._active)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every emitted event is delivered or given up; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._active or self._events_waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # --- scheduler ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._pick_up_pending()
        except Exception:  # the store is unreachable for longer than its own retries: try the rest later
            logger.exception("webhooks: could not read pending deliveries; they are picked up at the next start")
        while not self._stopping.is_set():
            with self._cond:
                while not self._stopping.is_set() and not self._inbox and not (
                        self._due and self._due[0][0] <= time.monotonic()):
                    self._cond.wait(None if not self._due else max(0.0, self._due[0][0] - time.monotonic()))
                if self._stopping.is_set():
                    return
                inbox, self._inbox = self._inbox, []
                due = []
                while self._due and self._due[0][0] <= time.monotonic():
                    due.append(heapq.heappop(self._due)[2])
            for entry in inbox:
                try:
                    for event, webhooks in entry():
                        self._accept(event, webhooks)
                except Exception:
                    logger.exception("webhooks: events could not be queued")
                finally:
                    with self._cond:
                        self._events_waiting -= 1
                        self._cond.notify_all()
            for delivery in due:
                self._submit(delivery)

    def _pick_up_pending(self) -> None:
        prefix = keys.webhook_pending_prefix(self.source)
        found = 0
        for key in list(self.store.list_keys("state", prefix)):
            try:
                delivery = Delivery.from_json(self.store.get_json("state", key))
            except ObjectNotFound:
                continue  # finished meanwhile
            except (ValueError, KeyError, TypeError):
                logger.warning("webhooks: unreadable pending record %s removed", key)
                self._remove_record_key(key)
                continue
            with self._cond:
                if delivery.delivery_id in self._active:
                    continue
                self._active.add(delivery.delivery_id)
            found += 1
            self._schedule(delivery, 0.0)
        if found:
            logger.info("webhooks: %d pending deliveries picked up", found)

    def _accept(self, event: WebhookEvent, webhooks: list[dict[str, Any]] | None) -> None:
        """Turn an event into deliveries: one per subscribed URL, each recorded before its first attempt."""
        if webhooks is None:
            webhooks = self._batch_webhooks(event.tenant, event.batch_id)
        for index, webhook in enumerate(webhooks):
            if event.type not in webhook.get("events", EVENT_TYPES):
                continue
            delivery = Delivery(delivery_id=f"{event.id}-{index}", event=event, url=webhook["url"])
            with self._cond:
                if delivery.delivery_id in self._active or delivery.delivery_id in self._delivered:
                    continue  # the same event again, while its delivery is under way or once it is delivered
                self._active.add(delivery.delivery_id)
            try:
                self.store.put_json("state", keys.webhook_pending_key(self.source, delivery.delivery_id),
                                    delivery.to_json())
            except StoreError:
                # Delivered from memory all the same; only a restart before it finishes would lose it.
                logger.warning("webhooks: pending record of %s not written; delivering without it",
                               delivery.delivery_id)
            self._schedule(delivery, 0.0)

    def _batch_webhooks(self, tenant: str, batch_id: str) -> list[dict[str, Any]]:
        cached = self._subscriptions.get((tenant, batch_id))
        if cached is not None and time.monotonic() - cached[0] < CACHE_TTL_S:
            return cached[1]
        try:
            document = self.store.get_json("state", keys.batch_state_key(tenant, batch_id))
            webhooks = list(document.get("webhooks") or [])
        except ObjectNotFound:
            webhooks = []  # never committed, or gone: nobody to tell
        now = time.monotonic()
        if len(self._subscriptions) > MAX_CACHED_BATCHES:  # a long-lived process sees many batches
            self._subscriptions = {k: v for k, v in self._subscriptions.items() if now - v[0] < CACHE_TTL_S}
        self._subscriptions[(tenant, batch_id)] = (now, webhooks)
        return webhooks

    def _schedule(self, delivery: Delivery, delay_s: float) -> None:
        with self._cond:
            heapq.heappush(self._due, (time.monotonic() + delay_s, next(self._sequence), delivery))
            self._cond.notify_all()

    def _submit(self, delivery: Delivery) -> None:
        senders = self._senders
        if senders is None or self._stopping.is_set():
            return
        try:
            senders.submit(self._attempt, delivery)
        except RuntimeError:
            pass  # shutting down: the pending record stays for the next start

    # --- one attempt (a sender thread) -------------------------------------------------------------

    def _attempt(self, delivery: Delivery) -> None:
        event = delivery.event
        # Host only in logs: a URL's path or query may hold a receiver's token.
        host = urlsplit(delivery.url).hostname
        if url_problem(delivery.url):  # registrations are checked at submit; a record could be edited since
            logger.warning("webhooks: %s has a URL that is not allowed (https, or http on loopback); given up",
                           delivery.delivery_id)
            self._count(event.type, "failed")
            self._finish(delivery)
            return
        error = None
        try:
            # Resolved and checked before anything else; the connection goes to these addresses only.
            addresses = receiver_addresses(delivery.url, allow_private=self.config.allow_private_addresses,
                                           resolve=self._resolve)
            body = event.body()
            timestamp = int(time.time())
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                       "X-Headshots-Event": event.type, "X-Headshots-Delivery": event.id,
                       "X-Headshots-Timestamp": str(timestamp),
                       "X-Headshots-Signature": sign(self._secret(event.tenant), timestamp, body)}
            status = post(delivery.url, body, headers, timeout_s=self.config.timeout_s, addresses=addresses)
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except ReceiverRefused as refusal:
            # Final: the same host would be refused at every attempt (and retrying would probe the network).
            logger.warning("webhooks: giving up %s (%s): receiver refused, %s; deliveries go to public addresses "
                           "only unless webhooks.allow_private_addresses is on", delivery.delivery_id, event.type,
                           refusal)
            self._count(event.type, "failed")
            self._finish(delivery)
            return
        except Exception as failure:  # the receiver, the network or the store: all worth another attempt
            error = type(failure).__name__
        delivery.attempts += 1
        if error is None:
            self._count(event.type, "delivered")
            self._finish(delivery, delivered=True)
            return
        delivery.last_error = error
        too_old = time.time() - delivery.created_at >= self.config.max_age_s
        if delivery.attempts >= self.config.max_attempts or too_old:
            self._count(event.type, "failed")
            logger.warning("webhooks: giving up %s (%s) to %s after %d attempt(s): %s", delivery.delivery_id,
                           event.type, host, delivery.attempts, error)
            self._finish(delivery)
            return
        self._count(event.type, "retried")
        delay_s = self._retry_delay_s(delivery.attempts)
        logger.info("webhooks: %s (%s) to %s failed (%s); attempt %d in %.1f s", delivery.delivery_id, event.type,
                    host, error, delivery.attempts + 1, delay_s)
        try:
            self.store.put_json("state", keys.webhook_pending_key(self.source, delivery.delivery_id),
                                delivery.to_json())
        except StoreError:
            pass  # the older record still says "pending": enough to pick it up after a restart
        if not self._stopping.is_set():
            self._schedule(delivery, delay_s)

    def _retry_delay_s(self, attempts: int) -> float:
        """first_retry_delay_s doubling per attempt up to max_retry_delay_s, with jitter (between half and
        all of it), so deliveries failing together do not come back in step."""
        delay = min(self.config.first_retry_delay_s * 2.0 ** (attempts - 1), self.config.max_retry_delay_s)
        return delay * random.uniform(0.5, 1.0)

    def _finish(self, delivery: Delivery, *, delivered: bool = False) -> None:
        self._remove_record_key(keys.webhook_pending_key(self.source, delivery.delivery_id))
        with self._cond:
            if delivered:
                self._delivered[delivery.delivery_id] = None
                while len(self._delivered) > REMEMBERED_DELIVERIES:
                    self._delivered.popitem(last=False)
            self._active.discard(delivery.delivery_id)
            self._cond.notify_all()

    def _remove_record_key(self, key: str) -> None:
        try:
            # Every version: a record rewritten at each retry leaves noncurrent versions behind.
            for name, version_id, _ in self.store.list_versions("state", key):
                if name == key:
                    self.store.remove_version("state", key, version_id=version_id)
        except StoreError:
            logger.warning("webhooks: pending record %s not removed; it may be delivered again after a restart", key)

    def _secret(self, tenant: str) -> str:
        cached = self._secrets.get(tenant)
        if cached is not None and time.monotonic() - cached[0] < CACHE_TTL_S:
            return cached[1]
        secret = tenant_secret(self.store, tenant)
        self._secrets[tenant] = (time.monotonic(), secret)
        return secret

    def _count(self, event_type: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.deliveries_total.labels(event=event_type, outcome=outcome).inc()
