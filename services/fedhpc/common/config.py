"""Configuration: pydantic models, loaded from YAML plus environment overrides.

One file configures every service::

    store:
      kind: s3
      endpoint: minio.example.org:9000
      bucket: fedhpc
      access_key: fedhpc
      secret_key: change-me
    registry:
      server: {host: 0.0.0.0, port: 50051, metrics_port: 9101}

Environment variables override the file: ``FEDHPC_`` + the key path in upper
case with ``__`` between levels, e.g. ``FEDHPC_STORE__BUCKET=models`` or
``FEDHPC_REGISTRY__SERVER__PORT=6000``. Values starting with ``[`` or ``{`` are parsed
as YAML flow collections whose scalars stay strings (pydantic converts them), so
``FEDHPC_REGISTRY__SERVER__AUTH__ADMIN_TOKENS='[t1, 0042]'`` gives two string tokens.
Names without ``__`` (``FEDHPC_TOKEN``, ``FEDHPC_REGISTRY``, ``FEDHPC_CONFIG``) are client
and CLI settings, never configuration keys. Every error names the offending key (and the
variable it came from).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "FEDHPC_"
ENV_CONFIG_FILE = "FEDHPC_CONFIG"


class ConfigError(ValueError):
    """Invalid configuration; the message names every bad key."""


class _Model(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileStoreConfig(_Model):
    """Objects as files under a directory: the embedded default for local runs."""

    kind: Literal["file"] = "file"
    root: Path = Field(default=Path(".fedhpc/store"), description="Directory holding every object.")


class S3StoreConfig(_Model):
    """Any S3-compatible store (MinIO, AWS S3, SeaweedFS) through the minio client."""

    kind: Literal["s3"] = "s3"
    endpoint: str = Field(description="host:port of the S3 API, e.g. 127.0.0.1:9000 (no scheme).")
    bucket: str = Field(default="fedhpc", description="Bucket holding every fedhpc object.")
    access_key: str = Field(description="S3 access key.")
    secret_key: SecretStr = Field(description="S3 secret key.")
    secure: bool = Field(default=False, description="Use HTTPS to the S3 endpoint.")
    region: str | None = Field(default=None, description="Bucket region (AWS); None lets the server decide.")
    create_bucket: bool = Field(default=True, description="Create the bucket at start-up when missing.")
    part_size_mb: int = Field(default=16, ge=5, le=5120, description="Multipart upload part size (MiB).")
    max_retries: int = Field(default=5, ge=0, le=20, description="Retries on transient errors, with backoff.")
    public_endpoint: str | None = Field(
        default=None,
        description="host:port presigned URLs should name when clients reach S3 at another address.",
    )
    public_secure: bool | None = Field(
        default=None, description="HTTPS for public_endpoint (default: secure)."
    )

    @field_validator("endpoint", "public_endpoint")
    @classmethod
    def _no_scheme(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            raise ValueError("give host:port without a scheme; set secure: true for HTTPS")
        return value


StoreConfig = Annotated[FileStoreConfig | S3StoreConfig, Field(discriminator="kind")]


class TLSConfig(_Model):
    """Server TLS. With client_ca_file set, clients must present a certificate (mTLS)."""

    cert_file: Path = Field(description="PEM server certificate chain.")
    key_file: Path = Field(description="PEM private key.")
    client_ca_file: Path | None = Field(
        default=None, description="PEM CA bundle for client certificates (mTLS)."
    )


def _check_token(token: SecretStr) -> SecretStr:
    value = token.get_secret_value()
    # An empty token would match "Bearer " and whitespace cannot travel in the header.
    if not value or any(c.isspace() for c in value):
        raise ValueError("a token must be non-empty and contain no whitespace")
    return token


class SiteToken(_Model):
    """A bearer token scoped to one site and (optionally) one experiment."""

    token: SecretStr
    site: str = Field(min_length=1)
    experiment: str = Field(
        default="*", min_length=1, description="Experiment id the token may act on; '*' = any."
    )

    @field_validator("token")
    @classmethod
    def _token_ok(cls, value: SecretStr) -> SecretStr:
        return _check_token(value)


class AuthConfig(_Model):
    """Bearer-token authentication. Disabled means every caller is an admin (local mode only)."""

    enabled: bool = False
    admin_tokens: list[SecretStr] = Field(default_factory=list, description="Tokens with full access.")
    site_tokens: list[SiteToken] = Field(default_factory=list, description="Per-site tokens.")

    @field_validator("admin_tokens")
    @classmethod
    def _admin_tokens_ok(cls, value: list[SecretStr]) -> list[SecretStr]:
        return [_check_token(token) for token in value]

    @model_validator(mode="after")
    def _consistent(self) -> AuthConfig:
        if self.enabled and not self.admin_tokens and not self.site_tokens:
            raise ValueError("auth is enabled but no admin_tokens or site_tokens are configured")
        # The same token twice would make the caller's identity depend on list order.
        seen: set[str] = set()
        for token in [*self.admin_tokens, *(st.token for st in self.site_tokens)]:
            if token.get_secret_value() in seen:
                raise ValueError("the same token appears more than once in admin_tokens/site_tokens")
            seen.add(token.get_secret_value())
        return self


class ServerConfig(_Model):
    """A gRPC server: address, TLS, auth, metrics."""

    host: str = Field(default="127.0.0.1", description="Address to bind (0.0.0.0 in containers).")
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus /metrics port; None disables it, 0 picks one."
    )
    max_workers: int = Field(default=16, ge=1, le=1024, description="Threads serving RPCs.")
    grace_seconds: float = Field(default=10.0, ge=0, description="How long SIGTERM waits for RPCs in flight.")
    max_message_mb: int = Field(default=8, ge=1, le=1024, description="Largest gRPC message (MiB).")
    tls: TLSConfig | None = None
    auth: AuthConfig = Field(default_factory=AuthConfig)


class RegistryConfig(_Model):
    """The model registry service."""

    server: ServerConfig = Field(default_factory=lambda: ServerConfig(port=50051, metrics_port=9101))
    presign_ttl_seconds: int = Field(default=900, ge=10, description="Default lifetime of presigned URLs.")
    max_presign_ttl_seconds: int = Field(
        default=6 * 3600, ge=10, description="Upper bound on any URL lifetime."
    )
    max_chunk_bytes: int = Field(
        default=4 << 20,
        ge=64 << 10,
        le=64 << 20,
        description="Largest data chunk in Upload/Download streams.",
    )
    upload_ttl_seconds: int = Field(
        default=24 * 3600, ge=60, description="How long an upload may stay uncommitted before it is garbage."
    )


class LogConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=True, alias="json", description="JSON lines (true) or plain text.")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AggregatorConfig(_Model):
    """The aggregator service: reads base and updates from the store, writes through the registry."""

    server: ServerConfig = Field(default_factory=lambda: ServerConfig(port=50052, metrics_port=9102))
    registry_address: str = Field(default="127.0.0.1:50051", description="Registry gRPC address host:port.")
    registry_token: SecretStr | None = Field(
        default=None, description="Bearer token for the registry (admin)."
    )
    registry_tls_ca: Path | None = Field(default=None, description="PEM CA bundle for a TLS registry.")
    spool_dir: Path | None = Field(
        default=None,
        description="Where new weights are written before upload (default: the system temp dir).",
    )
    threads: int = Field(default=4, ge=1, le=64, description="Worker threads reading and summing chunks.")
    chunk_mb: int = Field(
        default=8, ge=1, le=256, description="Bytes of each update read per request from the store (MiB)."
    )


class CoordinatorConfig(_Model):
    """The coordinator: experiments, sites and tasks, persisted in SQLite under data_dir."""

    server: ServerConfig = Field(default_factory=lambda: ServerConfig(port=50053, metrics_port=9103))
    data_dir: Path = Field(
        default=Path(".fedhpc/coordinator"),
        description="State (coordinator.db, SQLite WAL) and the local sites' spools.",
    )
    registry_address: str = Field(default="127.0.0.1:50051", description="Registry gRPC address host:port.")
    registry_token: SecretStr | None = Field(
        default=None, description="Bearer token for the registry (admin)."
    )
    registry_tls_ca: Path | None = Field(default=None, description="PEM CA bundle for a TLS registry.")
    aggregator_address: str = Field(
        default="127.0.0.1:50052", description="Aggregator gRPC address host:port."
    )
    aggregator_token: SecretStr | None = Field(default=None, description="Bearer token for the aggregator.")
    aggregator_tls_ca: Path | None = Field(default=None, description="PEM CA bundle for a TLS aggregator.")
    trainer_registry_address: str | None = Field(
        default=None,
        description="Registry address trainers use for the registry-stream transport (default: registry_address).",
    )
    tick_seconds: float = Field(
        default=0.1, gt=0, le=10, description="How often dispatchers and timers are checked when idle."
    )
    presign_ttl_seconds: int = Field(
        default=3600, ge=60, description="Lifetime of the model/update URLs handed to trainers."
    )
    aggregation_timeout_seconds: float = Field(
        default=1800, gt=0, description="Longest an Aggregate call may take before the round is retried."
    )


class FedhpcConfig(_Model):
    """The whole configuration file."""

    store: StoreConfig = Field(default_factory=FileStoreConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    log: LogConfig = Field(default_factory=LogConfig)


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _env_paths(env: Mapping[str, str], prefix: str = ENV_PREFIX) -> dict[tuple[str, ...], str]:
    """Config key path -> variable name, for every FEDHPC_A__B... variable."""
    paths: dict[tuple[str, ...], str] = {}
    for name in sorted(env):
        # Without "__" a variable is a client/CLI setting (FEDHPC_TOKEN, FEDHPC_REGISTRY):
        # every top-level key is a section, so a config override always has "__".
        if not name.startswith(prefix) or "__" not in name:
            continue
        path = tuple(p.lower() for p in name[len(prefix) :].split("__") if p)
        if path:
            paths[path] = name
    return paths


def env_overrides(env: Mapping[str, str], prefix: str = ENV_PREFIX) -> dict[str, Any]:
    """Nested dict from FEDHPC_A__B=value variables (names without "__" are not config)."""
    tree: dict[str, Any] = {}
    for path, name in _env_paths(env, prefix).items():
        raw = env[name]
        # Scalars stay strings and pydantic coerces them, so a secret like "0123" is
        # never turned into a number; BaseLoader keeps that true inside [..] and {..}.
        value: Any = raw
        if raw.strip().startswith(("[", "{")):
            try:
                value = yaml.load(raw, Loader=yaml.BaseLoader)
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"environment variable {name} is not a valid YAML list/mapping: {exc}"
                ) from exc
        _set_path(tree, list(path), value)
    return tree


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _key_path(loc: tuple[int | str, ...], data: Any) -> tuple[int | str, ...]:
    """The key path as the user wrote it: pydantic puts the union tag in the location
    (store.s3.endpoint), the file has none (store.endpoint)."""
    path: list[int | str] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and part == node.get("kind"):
            continue
        path.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(path)


def errors_by_key(error: ValidationError, root: str = "(all)") -> str:
    """One line naming every bad key: ``a.b: message; c: message`` (``root`` for the whole document)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in item['loc']) or root}: {item['msg']}" for item in error.errors()
    )


def format_validation_error(
    error: ValidationError,
    source: str,
    data: Any = None,
    env_paths: Mapping[tuple[str, ...], str] | None = None,
) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        path = _key_path(tuple(item["loc"]), data)
        key = ".".join(str(p) for p in path) or "<root>"
        line = f"  {key}: {item['msg']}"
        for env_path, name in (env_paths or {}).items():
            # The variable that set this key or one of its parents (or children, for
            # an unknown or missing section).
            n = min(len(env_path), len(path))
            if n and tuple(str(p) for p in path[:n]) == env_path[:n]:
                line += f" (from {name})"
                break
        lines.append(line)
    return "\n".join(lines)


def load_config(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> FedhpcConfig:
    """Load YAML (path, else $FEDHPC_CONFIG, else defaults) + FEDHPC_* env + explicit overrides."""
    env = os.environ if env is None else env
    if path is None and env.get(ENV_CONFIG_FILE):
        path = env[ENV_CONFIG_FILE]
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping at the top level, not {type(loaded).__name__}"
            )
        data = loaded
    from_env = env_overrides(env)
    env_paths = _env_paths(env)
    if from_env:
        source += " + FEDHPC_* environment"
        data = _merge(data, from_env)
    if overrides:
        data = _merge(data, overrides)
    try:
        return FedhpcConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, data, env_paths)) from None
