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
as YAML, so ``FEDHPC_REGISTRY__SERVER__AUTH__ADMIN_TOKENS='[t1, t2]'`` gives a list.
Every error names the offending key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

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
    public_secure: bool | None = Field(default=None, description="HTTPS for public_endpoint (default: secure).")

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
    client_ca_file: Path | None = Field(default=None, description="PEM CA bundle for client certificates (mTLS).")


class SiteToken(_Model):
    """A bearer token scoped to one site and (optionally) one experiment."""

    token: SecretStr
    site: str
    experiment: str = Field(default="*", description="Experiment id the token may act on; '*' = any.")


class AuthConfig(_Model):
    """Bearer-token authentication. Disabled means every caller is an admin (local mode only)."""

    enabled: bool = False
    admin_tokens: list[SecretStr] = Field(default_factory=list, description="Tokens with full access.")
    site_tokens: list[SiteToken] = Field(default_factory=list, description="Per-site tokens.")


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
    max_presign_ttl_seconds: int = Field(default=6 * 3600, ge=10, description="Upper bound on any URL lifetime.")
    max_chunk_bytes: int = Field(
        default=4 << 20, ge=64 << 10, le=64 << 20, description="Largest data chunk in Upload/Download streams."
    )
    upload_ttl_seconds: int = Field(
        default=24 * 3600, ge=60, description="How long an upload may stay uncommitted before it is garbage."
    )


class LogConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=True, alias="json", description="JSON lines (true) or plain text.")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FedhpcConfig(_Model):
    """The whole configuration file."""

    store: StoreConfig = Field(default_factory=FileStoreConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
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


def env_overrides(env: Mapping[str, str], prefix: str = ENV_PREFIX) -> dict[str, Any]:
    """Nested dict from FEDHPC_A__B=value variables (FEDHPC_CONFIG itself excluded)."""
    tree: dict[str, Any] = {}
    for name, raw in sorted(env.items()):
        if not name.startswith(prefix) or name == ENV_CONFIG_FILE:
            continue
        path = [p.lower() for p in name[len(prefix) :].split("__") if p]
        if not path:
            continue
        # Only flow collections are parsed; scalars stay strings and pydantic
        # coerces them, so a secret like "0123" is never turned into a number.
        value: Any = raw
        if raw.strip().startswith(("[", "{")):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"environment variable {name} is not a valid YAML list/mapping: {exc}") from exc
        _set_path(tree, path, value)
    return tree


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        lines.append(f"  {key}: {item['msg']}")
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
            raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(loaded).__name__}")
        data = loaded
    from_env = env_overrides(env)
    if from_env:
        source += " + FEDHPC_* environment"
        data = _merge(data, from_env)
    if overrides:
        data = _merge(data, overrides)
    try:
        return FedhpcConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
