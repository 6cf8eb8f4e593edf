"""One typed configuration object, loaded once at the edge (CLI, actor start) and passed down.

Sources, later ones winning:
  1. the defaults below (the embedded local stack with the built-in ``tiny`` model),
  2. a YAML file (``--config``, ``$HEADSHOTS_CONFIG`` or ``$HEADSHOTS_HOME/config.yaml``),
  3. environment variables ``HEADSHOTS_<SECTION>_<KEY>`` (e.g. ``HEADSHOTS_STORE_ENDPOINT``).

Environment variables are read here and nowhere else. Every error names the key (or the variable)
and the value, and says what is allowed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

ENV_PREFIX = "HEADSHOTS_"
ARTIFACT_CLASSES = ("uploads", "derived", "models", "outputs", "state", "receipts")
# Never echoed in an error message or a repr.
SECRET_KEYS = ("store.secret_key", "security.master_key")


class ConfigError(ValueError):
    """A configuration key has a value that is not allowed."""


@dataclass(frozen=True)
class StoreConfig:
    """Where artifacts and job state live (any S3-compatible store reachable with the minio SDK)."""

    # Empty endpoint: the CLI starts an embedded SeaweedFS server on loopback.
    endpoint: str = ""
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    secure: bool = False
    region: str = "us-east-1"
    # A CA bundle for a private TLS endpoint (MinIO with an internal CA).
    ca_file: str = ""
    bucket_uploads: str = "headshots-uploads"
    bucket_derived: str = "headshots-derived"
    bucket_models: str = "headshots-models"
    bucket_outputs: str = "headshots-outputs"
    bucket_state: str = "headshots-state"
    bucket_receipts: str = "headshots-receipts"
    # Ask the server to encrypt every object it stores without a person's own key (SSE-S3): outputs,
    # state, receipts. The server must have SSE-S3 configured (MinIO: a KMS; the embedded SeaweedFS
    # has it built in and the local stack turns this on).
    server_side_encryption: bool = False
    # How long every store call keeps retrying while the server is unreachable or answers "busy"
    # (a restart, a failover) before it fails; waits back off exponentially, capped at a few seconds.
    outage_tolerance_s: float = 120.0
    # Where clients reach the store, for presigned download URLs (host:port; the internal endpoint is
    # usually not reachable from outside). Empty: the endpoint above. Signing needs no network.
    public_endpoint: str = ""
    public_secure: bool = False

    def __post_init__(self) -> None:
        if self.public_endpoint and ("://" in self.public_endpoint or "/" in self.public_endpoint):
            raise ConfigError(f"store.public_endpoint must be host:port without a scheme or path but is "
                              f"{self.public_endpoint!r}; set store.public_secure to choose https")
        if not self.outage_tolerance_s > 0:
            raise ConfigError(
                f"store.outage_tolerance_s must be a number of seconds > 0 but is {self.outage_tolerance_s}")
        if self.endpoint:
            if "://" in self.endpoint or "/" in self.endpoint:
                raise ConfigError(
                    f"store.endpoint must be host:port without a scheme or path but is {self.endpoint!r}; "
                    "set store.secure to choose https"
                )
            if not self.secure and not is_loopback_endpoint(self.endpoint):
                raise ConfigError(
                    f"store.endpoint {self.endpoint!r} is not on loopback, so store.secure must be true: "
                    "photos may only travel over TLS"
                )
        for artifact in ARTIFACT_CLASSES:
            name = getattr(self, f"bucket_{artifact}")
            if not (3 <= len(name) <= 63) or not all(c.islower() or c.isdigit() or c in "-." for c in name):
                raise ConfigError(
                    f"store.bucket_{artifact} must be a valid S3 bucket name (3-63 lowercase letters, "
                    f"digits, '-' or '.') but is {name!r}"
                )

    @property
    def buckets(self) -> dict[str, str]:
        """Artifact class → bucket name."""
        return {artifact: getattr(self, f"bucket_{artifact}") for artifact in ARTIFACT_CLASSES}


@dataclass(frozen=True)
class RayConfig:
    """How to reach (or start) the Ray cluster."""

    # Empty: the CLI starts a local head (`ray start --head`) under $HEADSHOTS_HOME.
    address: str = ""
    namespace: str = "headshots"
    # Fake GPUs the local head declares on a CPU-only machine; real clusters report their own.
    num_gpus: int = 2
    num_cpus: int = 0  # 0: let Ray count the machine's cores

    def __post_init__(self) -> None:
        if self.num_gpus < 0 or self.num_gpus > 64:
            raise ConfigError(f"ray.num_gpus must be between 0 and 64 but is {self.num_gpus}")
        if self.num_cpus < 0:
            raise ConfigError(f"ray.num_cpus must be 0 (auto) or positive but is {self.num_cpus}")


@dataclass(frozen=True)
class IngestConfig:
    max_pixels: int = 25_000_000
    max_bytes: int = 30 * 1024 * 1024
    min_side_px: int = 64
    # A person needs this many accepted photos, otherwise it ends in `needs_photos`.
    min_photos: int = 4
    # Face embeddings (dlib, 128-d) farther than this from the person's medoid are "not the same person";
    # also the bar a generated headshot must pass. dlib's own same-person threshold is 0.6.
    max_identity_distance: float = 0.6
    # Generated images that fail the identity check are regenerated with new seeds, up to this many
    # times the requested count per style.
    regeneration_budget: float = 3.0

    def __post_init__(self) -> None:
        _require_range("ingest.max_pixels", self.max_pixels, 10_000, 400_000_000)
        _require_range("ingest.max_bytes", self.max_bytes, 1024, 1 << 31)
        _require_range("ingest.min_side_px", self.min_side_px, 8, 4096)
        _require_range("ingest.min_photos", self.min_photos, 1, 100)
        if not 0.1 <= self.max_identity_distance <= 1.5:
            raise ConfigError(f"ingest.max_identity_distance must be between 0.1 and 1.5 but is "
                              f"{self.max_identity_distance}")
        if not 1.0 <= self.regeneration_budget <= 10.0:
            raise ConfigError(f"ingest.regeneration_budget must be between 1 and 10 but is {self.regeneration_budget}")


@dataclass(frozen=True)
class TrainingConfig:
    """Per-person LoRA fine-tune. 0 means "auto": a profile chosen by base model (see ``resolved``)."""

    steps: int = 0
    rank: int = 0
    learning_rate: float = 0.0
    # 0: the base model's native resolution.
    resolution: int = 0
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _require_range("training.steps", self.steps, 0, 100_000)
        _require_range("training.rank", self.rank, 0, 256)
        _require_range("training.checkpoint_every", self.checkpoint_every, 0, 100_000)
        if not (0 <= self.learning_rate < 1):
            raise ConfigError(f"training.learning_rate must be 0 (auto) or between 0 and 1 but is {self.learning_rate}")
        if self.resolution and (self.resolution % 8 or not 64 <= self.resolution <= 2048):
            raise ConfigError(
                f"training.resolution must be 0 (native) or a multiple of 8 in 64..2048 but is {self.resolution}"
            )

    def resolved(self, *, tiny_model: bool) -> "TrainingConfig":
        """Fill "auto" fields: a few quick steps for the built-in tiny test model, DreamBooth-LoRA
        settings that suit SD1.5/SDXL otherwise (800 steps, rank 16, 1e-4)."""
        profile = TINY_TRAINING_PROFILE if tiny_model else MODEL_TRAINING_PROFILE
        return dataclasses.replace(self, **{name: value for name, value in profile.items()
                                            if not getattr(self, name)})


TINY_TRAINING_PROFILE = {"steps": 30, "rank": 4, "learning_rate": 1e-3, "checkpoint_every": 10}
MODEL_TRAINING_PROFILE = {"steps": 800, "rank": 16, "learning_rate": 1e-4, "checkpoint_every": 100}


@dataclass(frozen=True)
class GenerationConfig:
    batch_size: int = 4
    image_format: str = "PNG"
    # 0: every preset at the model's native size (what the tiny model needs); else force this size.
    size_override: int = 0
    # Overrides every preset's step count when > 0 (the tiny model needs only a few).
    steps_override: int = 0
    # A user YAML of extra/overriding style presets.
    styles_file: str = ""
    # Identity checks on generated images: "auto" (on for real models, not_applicable for the built-in
    # tiny model, whose images are noise), "on", or "off".
    output_checks: str = "auto"

    def __post_init__(self) -> None:
        _require_range("generation.batch_size", self.batch_size, 1, 64)
        if self.image_format not in ("PNG", "JPEG"):
            raise ConfigError(f"generation.image_format must be PNG or JPEG but is {self.image_format!r}")
        _require_range("generation.steps_override", self.steps_override, 0, 200)
        if self.output_checks not in ("auto", "on", "off"):
            raise ConfigError(f"generation.output_checks must be auto, on or off but is {self.output_checks!r}")
        if self.size_override and self.size_override % 8:
            raise ConfigError(f"generation.size_override must be a multiple of 8 but is {self.size_override}")


@dataclass(frozen=True)
class WorkersConfig:
    # GPU workers to start (0: one per GPU the cluster reports).
    gpu_workers: int = 0
    # torch threads per worker; on a small CPU machine more threads only fight each other.
    torch_threads: int = 1
    # Where workers cache base models copied from s3:// (and nothing else that outlives a person).
    cache_dir: str = ""
    # Worker actors per GPU (each asks Ray for 1/slots of a GPU and keeps its own base model): >1 packs
    # several small fine-tunes onto one large GPU.
    slots_per_gpu: int = 1
    # A stage that raises this many times for one person fails the person (poison input); the batch
    # goes on. Worker processes lost mid-stage (preemption, OOM kill) count separately, against
    # max_worker_losses: a pool under chaos must not fail healthy persons.
    max_stage_attempts: int = 3
    max_worker_losses: int = 20
    # Weighted fair share of GPU time between tenants while they compete (unlisted tenants: 1.0), and
    # an optional cap on the GPUs one tenant holds at once. YAML mappings; in the environment
    # "tenant=value,tenant=value".
    tenant_weights: dict[str, float] = field(default_factory=dict)
    tenant_quota: dict[str, int] = field(default_factory=dict)
    # Elastic pool (KubeRay autoscaling): ask Ray for GPU bundles while work queues, release them when
    # idle. gpu_workers then is the most workers started; min_gpu_workers stay up.
    autoscale: bool = False
    min_gpu_workers: int = 1
    scale_down_idle_s: int = 300

    def __post_init__(self) -> None:
        _require_range("workers.gpu_workers", self.gpu_workers, 0, 1024)
        _require_range("workers.torch_threads", self.torch_threads, 1, 256)
        _require_range("workers.slots_per_gpu", self.slots_per_gpu, 1, 16)
        _require_range("workers.max_stage_attempts", self.max_stage_attempts, 1, 100)
        _require_range("workers.max_worker_losses", self.max_worker_losses, 1, 1000)
        _require_range("workers.min_gpu_workers", self.min_gpu_workers, 0, 1024)
        _require_range("workers.scale_down_idle_s", self.scale_down_idle_s, 1, 7 * 24 * 3600)
        if self.autoscale and self.gpu_workers and self.min_gpu_workers > self.gpu_workers:
            raise ConfigError(f"workers.min_gpu_workers ({self.min_gpu_workers}) must not exceed "
                              f"workers.gpu_workers ({self.gpu_workers}), the most the pool scales to")
        for key, mapping, number in (("workers.tenant_weights", self.tenant_weights, float),
                                     ("workers.tenant_quota", self.tenant_quota, int)):
            if not isinstance(mapping, Mapping):
                raise ConfigError(f"{key} must be a mapping of tenant id to {number.__name__} but is {mapping!r}")
            for tenant, value in mapping.items():
                if not isinstance(tenant, str) or not tenant:
                    raise ConfigError(f"{key} keys must be tenant ids but one is {tenant!r}")
                valid = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and (
                    number is float or isinstance(value, int))
                if not valid:
                    kind = "a number > 0" if number is float else "an integer >= 1 (GPUs)"
                    raise ConfigError(f"{key}.{tenant} must be {kind} but is {value!r}")


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    # 0: pick a free port when the stack starts (recorded in $HEADSHOTS_HOME/stack.json).
    port: int = 0
    # The retention controller's own /metrics (it runs apart from the coordinator); 0: a free port.
    retention_port: int = 0

    def __post_init__(self) -> None:
        _require_range("metrics.port", self.port, 0, 65535)
        _require_range("metrics.retention_port", self.retention_port, 0, 65535)
        if self.port and self.port == self.retention_port:
            raise ConfigError(f"metrics.port and metrics.retention_port must differ but both are {self.port}")


@dataclass(frozen=True)
class SecurityConfig:
    """Crypto-erasure: each person's uploads, crops and models are encrypted with a data key of their
    own, wrapped by this master key; deleting the person destroys the data key (see storage/crypto.py)."""

    # Base64 of 32 random bytes. Empty: the local stack generates one into $HEADSHOTS_HOME/master-key;
    # a deployment with its own store must set it (HEADSHOTS_SECURITY_MASTER_KEY from a secret).
    # Losing it makes every stored person artifact unreadable. Kept out of repr.
    master_key: str = field(default="", repr=False)
    encrypt_person_artifacts: bool = True

    def __post_init__(self) -> None:
        if self.master_key:
            # Imported here: parsing lives with the key (storage.crypto), and only a set key needs it.
            from storage.crypto import MasterKey, MasterKeyError

            try:
                MasterKey.from_base64(self.master_key)
            except MasterKeyError as error:  # names the key; never echoes the secret value
                raise ConfigError(str(error)) from None


@dataclass(frozen=True)
class RetentionConfig:
    """How the privacy promises are enforced over time (see storage/retention_policy.yaml)."""

    # A retention policy YAML (per-class days, per-tenant overrides); empty: the built-in policy.
    policy_file: str = ""
    sweep_interval_s: int = 3600
    # Bucket lifecycle backstop: the store itself expires objects max_days + this many days after creation.
    lifecycle_grace_days: int = 7
    # After an early deletion, sweeps list the person's prefixes again for this long and remove any
    # version a writer that died between its write and its barrier check left (storage/barrier.py).
    late_write_audit_s: int = 24 * 3600
    # A deletion waits this long, at most, for the GPU workers to confirm their purge (all asked at
    # once); a worker that does not answer in time (its node down or cut off, or hung) is recorded in the
    # receipt as not confirmed, with how its node is covered (cluster/purge.py).
    worker_purge_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _require_range("retention.sweep_interval_s", self.sweep_interval_s, 10, 7 * 24 * 3600)
        _require_range("retention.worker_purge_timeout_s", self.worker_purge_timeout_s, 1, 600)
        _require_range("retention.lifecycle_grace_days", self.lifecycle_grace_days, 1, 365)
        _require_range("retention.late_write_audit_s", self.late_write_audit_s, 0, 30 * 24 * 3600)


@dataclass(frozen=True)
class WebhooksConfig:
    """Delivery of batch webhooks (see cluster/webhooks.py): retries with exponential backoff and jitter,
    in threads of their own, so a receiver that is slow or down never holds up a batch."""

    # A delivery is given up after this many attempts, or once it is max_age_s old, whichever comes first.
    max_attempts: int = 20
    max_age_s: float = 24 * 3600.0
    # Waits between attempts: first_retry_delay_s, doubling up to max_retry_delay_s (each with jitter).
    first_retry_delay_s: float = 1.0
    max_retry_delay_s: float = 3600.0
    # Per request (connect, send, answer): short, since a receiver only has to acknowledge.
    timeout_s: float = 5.0
    # Deliver to receivers whose host resolves to a loopback, private, link-local (cloud metadata),
    # shared, multicast or reserved address. Off: such a delivery is refused and given up at once, so a
    # tenant cannot make the head pod call its own ports, the cluster network or the metadata service.
    # Turn it on for the local stack with a receiver on 127.0.0.1, for tests, or for receivers inside
    # your own network.
    allow_private_addresses: bool = False

    def __post_init__(self) -> None:
        _require_range("webhooks.max_attempts", self.max_attempts, 1, 1000)
        for key, value, low, high in (("webhooks.max_age_s", self.max_age_s, 1.0, 30 * 24 * 3600.0),
                                      ("webhooks.first_retry_delay_s", self.first_retry_delay_s, 0.01, 3600.0),
                                      ("webhooks.max_retry_delay_s", self.max_retry_delay_s, 0.01, 24 * 3600.0),
                                      ("webhooks.timeout_s", self.timeout_s, 0.1, 60.0)):
            if not low <= value <= high:
                raise ConfigError(f"{key} must be a number of seconds between {low:g} and {high:g} but is {value}")
        if self.max_retry_delay_s < self.first_retry_delay_s:
            raise ConfigError(f"webhooks.max_retry_delay_s ({self.max_retry_delay_s}) must not be less than "
                              f"webhooks.first_retry_delay_s ({self.first_retry_delay_s})")


@dataclass(frozen=True)
class ApiConfig:
    """The studios' HTTP API (`headshots serve`, headshots/api/)."""

    host: str = "127.0.0.1"
    port: int = 8080
    # Largest JSON request body (a batch manifest) and largest photo, in bytes.
    max_request_bytes: int = 1024 * 1024
    max_photo_bytes: int = 30 * 1024 * 1024
    # Presigned download URLs expire after this long.
    presign_expiry_s: int = 900
    # Self-service deletion links expire after this long (default 30 days).
    deletion_link_ttl_s: int = 30 * 24 * 3600
    # Limits a new tenant gets (each tenant's record can carry its own).
    default_rate_limit_per_s: float = 20.0
    default_max_concurrent_batches: int = 10
    # A verified API key is trusted for this long before its record is read again (so a revocation
    # takes effect within this time); 0: read on every request.
    auth_cache_s: float = 5.0
    # Base models a batch created over the API may name (local folders and store prefixes are the
    # operator's to choose: a client must not probe the server's files or other tenants' prefixes).
    base_models: list[str] = field(default_factory=lambda: ["tiny"])
    # Largest page `GET /v1/batches` returns.
    max_page_size: int = 200
    # The address clients reach the API at (e.g. https://api.studio.example, optionally with a path
    # prefix): the origin of every URL the API hands out (self-service deletion links, redirects). The
    # request's Host header is never used. Empty: the server's own address (http://<bound ip>:<port>),
    # which suits the local stack only. https:// unless the host is on loopback.
    public_base_url: str = ""

    def __post_init__(self) -> None:
        _require_range("api.port", self.port, 0, 65535)
        _require_range("api.max_request_bytes", self.max_request_bytes, 1024, 64 * 1024 * 1024)
        _require_range("api.max_photo_bytes", self.max_photo_bytes, 1024, 1 << 31)
        _require_range("api.presign_expiry_s", self.presign_expiry_s, 1, 7 * 24 * 3600)
        _require_range("api.deletion_link_ttl_s", self.deletion_link_ttl_s, 60, 365 * 24 * 3600)
        _require_range("api.default_max_concurrent_batches", self.default_max_concurrent_batches, 1, 100_000)
        _require_range("api.max_page_size", self.max_page_size, 1, 10_000)
        if not 0 < self.default_rate_limit_per_s <= 100_000:
            raise ConfigError(f"api.default_rate_limit_per_s must be between 0 (exclusive) and 100000 but is "
                              f"{self.default_rate_limit_per_s}")
        if not 0 <= self.auth_cache_s <= 3600:
            raise ConfigError(f"api.auth_cache_s must be between 0 and 3600 seconds but is {self.auth_cache_s}")
        if not isinstance(self.base_models, list) or not all(isinstance(m, str) and m for m in self.base_models):
            raise ConfigError(f"api.base_models must be a list of base model names but is {self.base_models!r}")
        if self.public_base_url:
            _check_public_base_url("api.public_base_url", self.public_base_url)


@dataclass(frozen=True)
class Config:
    home: str = ""
    store: StoreConfig = field(default_factory=StoreConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        return _build(cls, data, "")

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


def is_loopback_endpoint(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_public_base_url(key: str, url: str) -> None:
    """An absolute http(s) origin with an optional path: https:// unless the host is on loopback."""
    from urllib.parse import urlsplit

    allowed = ("must be an absolute URL such as https://api.studio.example (optionally with a path "
               "prefix; http:// only on loopback), without user, query or fragment")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in 0-65535)
    except ValueError:
        raise ConfigError(f"{key} {allowed} but is {url!r}") from None
    if (parts.scheme not in ("http", "https") or not host or parts.username is not None or parts.password is not None
            or parts.query or parts.fragment or "?" in url or "#" in url or any(c.isspace() for c in url)):
        raise ConfigError(f"{key} {allowed} but is {url!r}")
    if parts.scheme != "https" and not is_loopback_endpoint(f"[{host}]:0" if ":" in host else f"{host}:0"):
        raise ConfigError(f"{key} {url!r} is not on loopback, so it must start with https://: the links it "
                          "makes carry deletion tokens")


def default_home(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get(ENV_PREFIX + "HOME") or str(Path("~/.headshots").expanduser())


def load_config(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Load the configuration.

    Args:
        path: a YAML file; None looks at ``$HEADSHOTS_CONFIG`` then ``$HEADSHOTS_HOME/config.yaml``.
        environ: the environment to read overrides from (tests pass their own).

    Returns:
        The validated config.

    Raises:
        ConfigError: a file cannot be read or a key or value is not allowed.
    """
    environ = os.environ if environ is None else environ
    home = default_home(environ)
    data: dict[str, Any] = {}
    if path is None:
        path = environ.get(ENV_PREFIX + "CONFIG") or None
        if path is None and (Path(home) / "config.yaml").is_file():
            path = Path(home) / "config.yaml"
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded
    data = _apply_env_overrides(data, environ)
    data.setdefault("home", home)
    if not data["home"]:
        data["home"] = home
    return Config.from_dict(data)


def _apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    merged = {key: (dict(value) if isinstance(value, dict) else value) for key, value in data.items()}
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for variable, raw in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable in (ENV_PREFIX + "CONFIG", ENV_PREFIX + "HOME"):
            continue
        rest = variable[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in sections or not key or section == "home":
            continue  # other HEADSHOTS_* variables (e.g. test switches) are not config
        section_type = _resolve_type(Config, section)
        known = {f.name for f in dataclasses.fields(section_type)}
        if key not in known:
            raise ConfigError(
                f"environment variable {variable} names no config key; {section} has: {', '.join(sorted(known))}"
            )
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise ConfigError(f"config section {section} must be a mapping")
        merged[section][key] = _parse_env_value(variable, raw, _resolve_type(section_type, key))
    if ENV_PREFIX + "HOME" in environ:
        merged["home"] = environ[ENV_PREFIX + "HOME"]
    return merged


def _parse_env_value(variable: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if typing.get_origin(kind) is list:
            # "tiny,s3://models/sd15": comma-separated.
            return [part.strip() for part in raw.split(",") if part.strip()]
        if typing.get_origin(kind) is dict:
            # "tenant=2,other=0.5": the value type comes from the annotation (dict[str, float]).
            value_type = typing.get_args(kind)[1]
            parsed = {}
            for item in filter(None, (part.strip() for part in raw.split(","))):
                name, separator, value = item.partition("=")
                if not separator or not name.strip():
                    raise ValueError
                parsed[name.strip()] = value_type(value.strip())
            return parsed
    except ValueError:
        expected = "list of tenant=value pairs" if typing.get_origin(kind) is dict else kind.__name__
        raise ConfigError(f"environment variable {variable}={raw!r} is not a valid {expected}") from None
    return raw


def _resolve_type(owner: type, name: str) -> type:
    return typing.get_type_hints(owner)[name]


def _build(cls: type, data: Mapping[str, Any], path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {path or '<root>'} must be a mapping but is {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        where = path or "the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(sorted(map(str, unknown)))} in {where}; allowed: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value or {}, key_path)
            continue
        kwargs[name] = _coerce(key_path, value, kind)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config section {path or '<root>'}: {error}") from None


def _coerce(key_path: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key_path} must be true or false but is {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key_path} must be an integer but is {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key {key_path} must be a number but is {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        if key_path in SECRET_KEYS:
            raise ConfigError(f"config key {key_path} must be a string but is of type "
                              f"{type(value).__name__} (value not shown: it is a secret)")
        raise ConfigError(f"config key {key_path} must be a string but is {value!r}")
    return value


def _require_range(key: str, value: int, low: int, high: int) -> None:
    if not (low <= value <= high):
        raise ConfigError(f"{key} must be between {low} and {high} but is {value}")
