"""One configuration for a kvfabric node: a TOML or YAML file, validated into typed settings.

Every key can be overridden by an environment variable ``KVFABRIC_<SECTION>__<KEY>`` (nested keys joined with
``__``, e.g. ``KVFABRIC_STORE__RAM_BYTES=64GiB``). Precedence: environment > file > defaults. Sizes accept a number
of bytes or a string such as ``"64GiB"`` (binary units KiB/MiB/GiB/TiB, decimal units KB/MB/GB/TB). Secrets
(tokens, the server secret, object-store keys) are ``SecretStr`` and print masked. The full reference with every key
is ``docs/config.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from kvfabric.codec import Codec
from kvfabric.errors import ConfigError
from kvfabric.ids import MAX_NAMESPACE_BYTES
from kvfabric.store.config import DiskConfig, FsyncMode, NamespacePolicy, RamConfig, StoreConfig, WritePolicy
from kvfabric.store.object.config import AddressingStyle, ObjectTierConfig
from kvfabric.store.policy import POLICIES

ENV_PREFIX = "KVFABRIC_"
ENV_NESTED = "__"
CONFIG_PATH_ENV = "KVFABRIC_CONFIG"
"""When ``load_settings`` gets no path, it reads the file this variable names (if set)."""

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """``4096``, ``"4096"``, ``"64GiB"``, ``"1.5 GB"`` -> bytes. Bare K/M/G/T are binary (as in ``dd``).

    Raises ``ValueError`` for every bad input, wrong types included: pydantic reports ValueErrors (not TypeErrors)
    as validation errors naming the key."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '64GiB', not a boolean")  # noqa: TRY004
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"a size in bytes must be a whole number, got {value}")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = _UNITS.get(m.group(2).lower()) if m else None
        if m is None or unit is None:
            raise ValueError(f"invalid size {value!r}: expected bytes or a string like '64GiB', '512MiB', '10GB'")
        n = int(float(m.group(1)) * unit)
    else:
        raise ValueError(f"a size must be bytes or a string like '64GiB', got {type(value).__name__}")  # noqa: TRY004
    if n < 0:
        raise ValueError(f"a size cannot be negative, got {n}")
    return n


def format_size(n: int) -> str:
    """Bytes -> the shortest exact binary form: ``1073741824`` -> ``"1GiB"``; otherwise plain bytes."""
    for suffix, unit in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
PositiveSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]
Scope = Literal["read", "write", "admin"]


def _codec_name(value: object) -> str:
    return Codec.parse(value).name.lower()  # type: ignore[arg-type]


CodecName = Annotated[str, BeforeValidator(_codec_name)]
"""A codec as the files spell it (``shuffle_zstd``); the store's types hold the ``Codec`` itself."""


def _known_ram_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"unknown RAM eviction policy {name!r}; known: {sorted(POLICIES)}")
    return name


RamPolicyName = Annotated[str, AfterValidator(_known_ram_policy)]


def default_of(config_type: type, name: str) -> Any:
    """The default of field ``name`` of the store's config dataclass ``config_type``: the settings below take every
    store default from there, so the file's defaults and the store's are one."""
    for f in fields(config_type):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise ValueError(f"{config_type.__name__}.{name} has no default")
    raise AttributeError(f"{config_type.__name__} has no field {name!r}")


def _check_namespace(name: str) -> str:
    if name != "*" and not 0 < len(name.encode()) <= MAX_NAMESPACE_BYTES:
        raise ValueError(f"namespace {name!r} must be 1..{MAX_NAMESPACE_BYTES} UTF-8 bytes")
    return name


NamespaceName = Annotated[str, BeforeValidator(_check_namespace)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- server ------------------------------------------------------------------------------------------------------
class TLSSettings(_Section):
    cert: Path | None = None
    """PEM certificate chain; TLS is on when both ``cert`` and ``key`` are set."""
    key: Path | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TLSSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls needs both 'cert' and 'key', or neither")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert is not None


class TokenSettings(_Section):
    """One bearer token and what it may do."""

    token: SecretStr = Field(min_length=16)
    tenant: str = Field(min_length=1, max_length=MAX_NAMESPACE_BYTES)
    scopes: frozenset[Scope] = frozenset({"read"})
    """``read`` (stats, lookups, gets), ``write`` (puts, deletes, pins, in its namespaces), ``admin`` (everything,
    including node-wide operations: eviction, compaction, TTL and quota changes)."""

    @field_serializer("scopes")
    def _scopes_sorted(self, scopes: frozenset[str]) -> list[str]:
        return sorted(scopes)

    namespaces: tuple[NamespaceName, ...] | None = None
    """Namespaces the token may touch; ``["*"]`` for all. Default: only the namespace named like its tenant."""

    @property
    def allowed_namespaces(self) -> tuple[str, ...]:
        return self.namespaces if self.namespaces is not None else (self.tenant,)

    def may_access(self, namespace: str) -> bool:
        allowed = self.allowed_namespaces
        return "*" in allowed or namespace in allowed


class AuthSettings(_Section):
    enabled: bool = False
    """Off: every request is anonymous with every scope (a single-user node). On: requests need a bearer token."""
    tokens: tuple[TokenSettings, ...] = ()

    @model_validator(mode="after")
    def _tokens_unique(self) -> AuthSettings:
        secrets = [t.token.get_secret_value() for t in self.tokens]
        if len(set(secrets)) != len(secrets):
            raise ValueError("the same token appears twice in auth.tokens")
        if self.enabled and not self.tokens:
            raise ValueError("auth is enabled but auth.tokens is empty: no one could connect")
        return self


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(9500, ge=0, le=65535)
    """Data-plane (TCP) port; 0 picks a free one."""
    admin_port: int = Field(9501, ge=0, le=65535)
    """Admin REST API, ``/metrics`` and dashboard port; 0 picks a free one."""
    admin_host: str | None = None
    """Interface for the admin API; default: ``host``."""
    admin_max_body_bytes: PositiveSize = 4 << 20
    """Largest admin API request body (413 past it, before it is read); 4 MiB holds a 128K-token routing request."""
    tls: TLSSettings = TLSSettings()
    auth: AuthSettings = AuthSettings()
    server_secret: SecretStr | None = None
    """The keying secret: keys the per-tenant salt of prefix hashes. Must stay the same across restarts, and be the
    same on every node sharing an object tier, or stored blocks become unreachable (a node refuses to start over
    blocks keyed with another secret: ``kvfabric.keying``). Required with auth or an object tier, unless
    ``secret_file`` is set. Unset on a single node without either: generated once in ``store.data_dir``."""
    secret_file: Path | None = None
    """A file holding the keying secret (e.g. a mounted Kubernetes Secret); wins over ``server_secret``."""
    max_frame_bytes: PositiveSize = 256 << 20
    """Largest payload of one data-plane frame (a PUT or a GET reply); clients split larger batches."""
    max_batch: int = Field(1024, gt=0)
    """Most blocks (hashes) in one data-plane request."""
    max_connections: int = Field(4096, gt=0)
    """Data-plane connections in all (also kept below the descriptor limit, less a reserve for the store)."""
    max_connections_per_peer: int = Field(512, gt=0)
    fd_reserve: int = Field(256, ge=0)
    """File descriptors kept for the store (segments, RocksDB, registries): connections stop below the limit less
    this many."""
    handshake_timeout_s: float = Field(10.0, ge=0)
    """A data-plane connection must authenticate (HELLO) within this; 0: no limit."""
    frame_timeout_s: float = Field(60.0, ge=0)
    """A started frame whose bytes stop arriving for this long closes its connection; 0: no limit."""
    idle_timeout_s: float = Field(900.0, ge=0)
    """A connection with nothing in progress for this long is closed; 0: never."""
    max_inflight_bytes: PositiveSize = 2 << 30
    """PUT payload bytes being received at once, node-wide; past it a PUT waits. At least ``max_frame_bytes``."""
    max_models_per_tenant: int = Field(64, gt=0)
    stats_interval_s: float = Field(5.0, gt=0)
    """How often the admin app samples stats into its history (the dashboard's over-time charts)."""
    stats_history: int = Field(720, gt=1)
    """Samples kept in the history ring buffer (720 x 5 s = 1 hour)."""

    @model_validator(mode="after")
    def _inflight_fits_a_frame(self) -> ServerSettings:
        if self.max_inflight_bytes < self.max_frame_bytes:
            raise ValueError("max_inflight_bytes must be at least max_frame_bytes, or no PUT of that size could start")
        return self

    @model_validator(mode="after")
    def _secret_with_auth(self) -> ServerSettings:
        has_secret = self.secret_file is not None or (
            self.server_secret is not None and bool(self.server_secret.get_secret_value())
        )
        if self.auth.enabled and not has_secret:
            raise ValueError(
                "auth is enabled, so server_secret (or secret_file) must be set (it keys the per-tenant hash salt)"
            )
        return self


# --- store -------------------------------------------------------------------------------------------------------
# Keys of one tier are spelled as in the file (``ram_bytes``), documented and defaulted by the store's own config
# types (``kvfabric.store.config``); StoreConfig takes these spellings as they are.
class CodecSettings(_Section):
    """Payload codec per tier; RAM always holds raw payloads (the engine reads them in place)."""

    disk: CodecName = default_of(DiskConfig, "codec").name.lower()
    object: CodecName = default_of(ObjectTierConfig, "codec").name.lower()


class WritePolicySettings(_Section):
    disk: WritePolicy = default_of(StoreConfig, "write_policy")["disk"]
    """write-through: a put returns once the disk tier holds the block (per ``fsync``); write-back: puts land in
    RAM and reach disk in the background (faster, loses un-flushed blocks on a crash)."""


class StoreSettings(_Section):
    data_dir: Path | None = default_of(StoreConfig, "data_dir")
    """Where the disk tier lives; unset: RAM only."""
    ram_bytes: PositiveSize = default_of(RamConfig, "bytes")
    disk_bytes: Size | None = default_of(DiskConfig, "bytes")
    """Disk tier capacity; unset with a ``data_dir``: 64 GiB."""
    fsync: FsyncMode = default_of(DiskConfig, "fsync")
    group_commit_ms: float = Field(default_of(DiskConfig, "group_commit_ms"), gt=0)
    max_block_bytes: PositiveSize = default_of(StoreConfig, "max_block_bytes")
    codec: CodecSettings = CodecSettings()
    write_policy: WritePolicySettings = WritePolicySettings()
    node_id: str = Field(default_of(StoreConfig, "node_id"), min_length=1)
    ram_policy: RamPolicyName = default_of(RamConfig, "policy")
    ram_high_watermark: float = Field(default_of(RamConfig, "high_watermark"), gt=0, le=1)
    ram_low_watermark: float = Field(default_of(RamConfig, "low_watermark"), gt=0, le=1)
    shm_dir: str | None = default_of(RamConfig, "shm_dir")
    ram_prefault: bool = default_of(RamConfig, "prefault")
    flush_interval_s: float = Field(default_of(StoreConfig, "flush_interval_s"), gt=0)
    writeback_backlog_max: int = Field(default_of(StoreConfig, "writeback_backlog_max"), gt=0)

    @model_validator(mode="after")
    def _the_store_accepts_it(self) -> StoreSettings:
        # The store's own checks (watermark order, ...) at load time, so a bad file fails before anything opens.
        try:
            self.store_config()
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return self

    def store_config(self, **more: Any) -> StoreConfig:
        """This section as the store's config; ``more``: the parts other sections give (object tier, namespaces)."""
        flat = self.model_dump(exclude={"codec", "write_policy"})
        return StoreConfig(**flat, disk_codec=self.codec.disk, **more)


# --- object tier -------------------------------------------------------------------------------------------------
_OBJECT_OWN = frozenset({"upload", "startup_wait_s", "access_key_id", "secret_access_key"})
"""``[object]`` keys that are not ``ObjectTierConfig`` fields of the same name and meaning."""


class ObjectSettings(_Section):
    """The S3-compatible shared tier; on when ``bucket`` is set."""

    endpoint_url: str | None = default_of(ObjectTierConfig, "endpoint_url")
    """e.g. ``http://127.0.0.1:8333`` (SeaweedFS) or unset for AWS."""
    bucket: str | None = None
    prefix: str = default_of(ObjectTierConfig, "prefix")
    """Key prefix of everything this node writes; one writer per prefix."""
    region: str | None = default_of(ObjectTierConfig, "region")
    profile: str | None = default_of(ObjectTierConfig, "profile")
    storage_class: str | None = default_of(ObjectTierConfig, "storage_class")
    addressing_style: AddressingStyle = default_of(ObjectTierConfig, "addressing_style")
    access_key_id: SecretStr | None = None
    """Unset: boto3's usual chain (env ``AWS_ACCESS_KEY_ID``, profile, instance role)."""
    secret_access_key: SecretStr | None = None
    upload: WritePolicy = default_of(StoreConfig, "write_policy")["object"]
    """write-back: blocks reach the object tier in the background (S3 latency and outages never reach engines);
    write-through: a put returns once its block's segment and manifest are in the bucket."""
    segment_bytes: PositiveSize = default_of(ObjectTierConfig, "segment_bytes")
    """Blocks are packed into segment objects of this size."""
    seal_after_s: float | None = Field(default_of(ObjectTierConfig, "seal_after_s"), gt=0)
    """An open segment older than this is sealed and uploaded, bounding what a crash loses."""
    backlog_bytes: PositiveSize = default_of(ObjectTierConfig, "backlog_bytes")
    """Most bytes held in memory awaiting upload; beyond it the object tier refuses writes until it catches up."""
    create_bucket: bool = default_of(ObjectTierConfig, "create_bucket")
    """Create the bucket on start when missing (development setups)."""
    startup_wait_s: float = Field(30.0, ge=0)
    """How long ``kvfabric serve`` retries an unreachable object store at start (with a countdown) before it gives up."""

    @model_validator(mode="after")
    def _keys_together(self) -> ObjectSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("object needs both access_key_id and secret_access_key, or neither")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.bucket)

    def tier_config(self, codec: str) -> ObjectTierConfig | None:
        """This section as the object tier's config, or ``None`` when the tier is off."""
        if not self.enabled:
            return None
        same = self.model_dump(exclude=_OBJECT_OWN)
        return ObjectTierConfig(
            **same,
            access_key_id=self.access_key_id.get_secret_value() if self.access_key_id else None,
            secret_access_key=self.secret_access_key.get_secret_value() if self.secret_access_key else None,
            codec=Codec.parse(codec),
            durable_put=self.upload is WritePolicy.WRITE_THROUGH,
        )


# --- namespaces, index -------------------------------------------------------------------------------------------
class NamespaceSettings(_Section):
    ttl_s: float | None = Field(None, gt=0)
    """Blocks older than this are dropped; unset: kept until evicted."""
    quota_bytes: Size | None = None
    """Most bytes the namespace may hold in the node's persistent tiers; unset: no quota."""


def _default_bandwidth() -> dict[str, int]:
    return {"gpu": 200 << 30, "ram": 20 << 30, "disk": 3 << 30, "object": 500 << 20}


class VllmEngineSettings(_Section):
    """One vLLM engine whose KV events (``--kv-events-config``, ZMQ) the node's index subscribes to."""

    engine: str = Field(min_length=1, max_length=255)
    """The engine's name as a routing target (what ``POST /v1/route`` answers)."""
    endpoint: str = Field(min_length=1)
    """ZMQ endpoint of the engine's event publisher, e.g. ``tcp://10.0.0.5:5557``."""
    bind: bool = False
    """false: connect to the engine, whose publisher binds (vLLM's default); true: bind ``endpoint`` here and let
    the engine connect."""
    namespace: NamespaceName = "default"
    """The tenant whose key space the engine's blocks belong to (their hashes take that tenant's salt)."""
    model: dict[str, Any]
    """The engine's ``ModelSpec`` fields (model, num_layers, kv_heads, head_dim, dtype, block_size, ...): blocks are
    re-keyed to kvfabric hashes of this model."""

    @field_validator("model")
    @classmethod
    def _model_spec(cls, v: dict[str, Any]) -> dict[str, Any]:
        from kvfabric.spec import ModelSpec

        try:
            ModelSpec.from_dict(v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a valid model spec: {exc}") from exc
        return v


class IndexSettings(_Section):
    """Router calibration: predicted TTFT = queueing + prefill of unmatched tokens + load time of matched blocks."""

    prefill_tokens_per_s: float = Field(8000.0, gt=0)
    """Prefill throughput of one engine, tokens per second."""
    tier_bandwidth: dict[str, PositiveSize] = Field(default_factory=_default_bandwidth)
    """Load bandwidth per tier in bytes per second (sizes: ``"3GiB"`` means 3 GiB/s). ``gpu`` is not a fabric
    medium (engines' own caches count as their local prefix), so the router loads only from the other tiers."""
    vllm_engines: tuple[VllmEngineSettings, ...] = ()
    """vLLM engines whose KV events feed the index (their GPU caches become routable)."""


# --- the whole thing ---------------------------------------------------------------------------------------------
class Settings(BaseSettings):
    """Effective configuration of a node. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED, extra="forbid", frozen=True, case_sensitive=False
    )

    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    object: ObjectSettings = ObjectSettings()
    namespaces: dict[NamespaceName, NamespaceSettings] = Field(default_factory=dict)
    index: IndexSettings = IndexSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: the environment overrides the file (passed as init kwargs by load_settings).
        return (env_settings, init_settings)

    def store_config(self) -> StoreConfig:
        """The store's plain-data config (``kvfabric.store.config.StoreConfig``)."""
        return self.store.store_config(
            object=self.object_tier_config(),
            write_policy={"disk": self.store.write_policy.disk, "object": self.object.upload},
            namespaces={
                name: NamespacePolicy(ttl_s=ns.ttl_s, quota_bytes=ns.quota_bytes)
                for name, ns in self.namespaces.items()
            },
        )

    def object_tier_config(self) -> ObjectTierConfig | None:
        """The object tier's config (``kvfabric.store.object.ObjectTierConfig``), or ``None`` when it is off."""
        return self.object.tier_config(self.store.codec.object)

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain JSON-able data, secrets masked, unset keys left out."""
        return _drop_none(self.model_dump(mode="json"))

    def overridden(self, **sections: dict[str, Any]) -> Settings:
        """These settings with keys of whole sections replaced, e.g. ``overridden(store={"ram_bytes": n})``, and
        validated as the file's values are; ``None`` values are left out. For command-line flags, which win over the
        file and the environment (building ``Settings`` again would let the environment win)."""
        update: dict[str, BaseModel] = {}
        for name, values in sections.items():
            given = {k: v for k, v in values.items() if v is not None}
            if not given:
                continue
            section = getattr(self, name)
            try:
                update[name] = type(section).model_validate({**section.model_dump(), **given})
            except ValidationError as exc:
                bad = "; ".join(
                    f"{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors(include_url=False)
                )
                raise ConfigError(f"invalid setting from the command line: {bad}") from exc
        return self.model_copy(update=update)


# --- loading -----------------------------------------------------------------------------------------------------
def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a mapping, without validating it."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
    try:
        if suffix == ".toml":
            data: object = tomllib.loads(raw.decode())
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(raw) or {}
        else:
            raise ConfigError(f"config file {p} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} is not valid {suffix.lstrip('.').upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections at the top, got {type(data).__name__}")
    return data


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Defaults, overridden by the file at ``path`` (or ``$KVFABRIC_CONFIG``), overridden by ``KVFABRIC_*``
    environment variables. Raises :class:`ConfigError` naming the bad key."""
    if path is None:
        path = os.environ.get(CONFIG_PATH_ENV) or None
    data = read_config_file(path) if path is not None else {}
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, path)) from exc
    except SettingsError as exc:
        raise ConfigError(f"invalid {ENV_PREFIX}* environment variable: {exc}") from exc


def _explain(exc: ValidationError, path: str | os.PathLike[str] | None) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif isinstance(err.get("input"), (str, int, float)) and repr(err["input"]) not in msg:
            msg = f"{msg}, got {err['input']!r}"
        env = ENV_PREFIX + ENV_NESTED.join(str(p) for p in err["loc"]).upper()
        where = f" (from environment variable {env})" if env in {k.upper() for k in os.environ} else ""
        if not where and path is not None:
            where = f" (in {path})"
        lines.append(f"{key}: {msg}{where}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


# --- showing -----------------------------------------------------------------------------------------------------
def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def dumps_json(settings: Settings) -> str:
    return json.dumps(settings.masked(), indent=2, sort_keys=False)


def dumps_toml(settings: Settings) -> str:
    """The effective configuration as TOML (secrets masked); reading it back gives the same settings, except that
    masked secrets must be filled in again."""
    return toml_of(settings.masked())


def toml_of(config: dict[str, Any]) -> str:
    """Plain configuration data (``Settings.masked()``, or a node's ``/v1/config``) as TOML."""
    out: list[str] = []
    _toml_table(out, [], config)
    return "\n".join(out).strip() + "\n"


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_table(out: list[str], path: list[str], table: dict[str, Any]) -> None:
    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not is_table_array(v)}
    if path and (scalars or not table):
        out.append(f"\n[{'.'.join(_toml_key(p) for p in path)}]")
    for k, v in scalars.items():
        out.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in table.items():
        if isinstance(v, dict):
            _toml_table(out, [*path, k], v)
        elif is_table_array(v):
            for item in v:
                out.append(f"\n[[{'.'.join(_toml_key(p) for p in [*path, k])}]]")
                for ik, iv in item.items():
                    out.append(f"{_toml_key(ik)} = {_toml_value(iv)}")
