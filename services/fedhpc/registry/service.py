"""The Registry gRPC servicer: model versions stored in an ObjectStore, nothing kept in memory.

Every call reads what it needs from the store, so replicas and restarts need
no coordination: a version exists exactly when its manifest.json does.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram

from fedhpc.api.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from fedhpc.common.auth import Principal, Role, principal_from_context
from fedhpc.common.config import RegistryConfig
from fedhpc.common.logging import get_logger
from fedhpc.common.manifest import (
    check_name,
    manifest_disagreements,
    manifest_from_json,
    manifest_to_json,
    tensor_infos,
    timestamp_now,
)
from fedhpc.common.storage import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    validate_key,
)
from fedhpc.common.streams import prefetch
from fedhpc.common.tensors import (
    SafetensorsError,
    SafetensorsHeader,
    StreamVerifier,
    TrailingDataError,
    TruncatedError,
    VerifiedBlob,
    read_header,
)
from fedhpc.registry import layout

log = get_logger(__name__)

SERVICE_NAME = "fedhpc.v1.Registry"
_METHOD = f"/{SERVICE_NAME}/"
# Calls a site token may make (reads of its own experiment's models, presigned
# URLs for its own updates). Everything else needs an admin token.
METHOD_ROLES: dict[str, Role] = {
    _METHOD + name: Role.SITE
    for name in ("GetModel", "GetVersion", "Download", "ListVersions", "ListAliases", "PresignBlob")
}
# Headers are parsed in memory; real checkpoints with 100k tensors stay well below this.
MAX_HEADER_BYTES = 16 << 20
# Upload chunks received ahead of the store: enough to fill the next S3 part while the
# current one is being sent (16 MiB parts / 4 MiB chunks, plus slack).
UPLOAD_READ_AHEAD = 8
# Large reads when re-hashing a blob at commit: fewer round trips to the store.
VERIFY_CHUNK_BYTES = 4 << 20
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Assumed worst-case client bandwidth when sizing an upload URL's lifetime.
_SLOW_CLIENT_BYTES_PER_S = 10 << 20
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

REGISTRY_BYTES = Counter(
    "fedhpc_registry_bytes_total",
    "Bytes moved through the registry's own gRPC streams.",
    ["direction"],
)
REGISTRY_COMMITS = Counter("fedhpc_registry_commits_total", "CommitVersion outcomes.", ["outcome"])
REGISTRY_VERIFY_SECONDS = Histogram(
    "fedhpc_registry_verify_seconds",
    "Time to verify an uploaded blob at commit (re-reading it when it bypassed the registry).",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
# Every series exists from the start at 0: increase() cannot see a counter's first increment.
for _outcome in ("committed", "duplicate", "rejected"):
    REGISTRY_COMMITS.labels(_outcome)
for _direction in ("in", "out"):
    REGISTRY_BYTES.labels(_direction)


@dataclass(frozen=True)
class _Reservation:
    """An uncommitted version: who may upload to it, until when, and what came through us."""

    upload_id: str
    model: str
    version: str
    expires_at: float
    received: dict[str, Any] | None = None
    # sha256 every presigned PUT URL of this upload is bound to (the store refuses other bodies).
    store_checked_sha256: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "upload_id": self.upload_id,
                "model": self.model,
                "version": self.version,
                "expires_at": self.expires_at,
                "received": self.received,
                "store_checked_sha256": self.store_checked_sha256,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> _Reservation:
        raw = json.loads(data)
        return cls(
            upload_id=raw["upload_id"],
            model=raw["model"],
            version=raw["version"],
            expires_at=float(raw["expires_at"]),
            received=raw.get("received"),
            store_checked_sha256=raw.get("store_checked_sha256"),
        )


def _timestamp(epoch: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromtimestamp(epoch, UTC))
    return stamp


def _new_version_id() -> str:
    # Sortable by time, unique without coordination between replicas.
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def _blob_record(blob: VerifiedBlob, info: ObjectInfo) -> dict[str, Any]:
    return {
        "size": blob.size,
        "sha256": blob.sha256,
        "tensor_sha256": blob.tensor_sha256,
        "etag": info.etag,
    }


class RegistryService(registry_pb2_grpc.RegistryServicer):
    def __init__(self, store: ObjectStore, config: RegistryConfig) -> None:
        self._store = store
        self._config = config
        self._producer = f"registry/{socket.gethostname()}"

    # -- helpers ---------------------------------------------------------------
    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        log.info("request refused", extra={"code": code.name, "reason": message})
        context.abort(code, message)

    def _check_name(self, context: grpc.ServicerContext, kind: str, value: str) -> str:
        problem = check_name(kind, value)
        if problem:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        return value

    def _authorize_model(self, context: grpc.ServicerContext, model: str) -> Principal:
        principal = principal_from_context(context)
        if not principal.may_act_on(model):
            self._abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token is scoped to site {principal.site!r} of experiment {principal.experiment!r}; "
                f"it may not read model {model!r}",
            )
        return principal

    def _storage_failed(self, context: grpc.ServicerContext, what: str, exc: StorageError) -> NoReturn:
        log.error("object store error", extra={"during": what, "error": str(exc)})
        self._abort(context, grpc.StatusCode.UNAVAILABLE, f"object store error while {what}: {exc}")

    def _require_model(self, context: grpc.ServicerContext, model: str) -> registry_pb2.Model:
        self._check_name(context, "model name", model)
        try:
            raw = self._store.get_bytes(layout.model_meta_key(model))
        except ObjectNotFound:
            self._abort(context, grpc.StatusCode.NOT_FOUND, f"model {model!r} does not exist")
        except StorageError as exc:
            self._storage_failed(context, f"reading model {model!r}", exc)
        return self._model_from_json(raw)

    @staticmethod
    def _model_from_json(raw: bytes) -> registry_pb2.Model:
        data = json.loads(raw)
        return registry_pb2.Model(
            name=data["name"],
            description=data.get("description", ""),
            created_at=_timestamp(data["created_at"]),
            labels=data.get("labels", {}),
        )

    def _load_manifest(self, model: str, version: str) -> common_pb2.Manifest | None:
        try:
            return manifest_from_json(self._store.get_bytes(layout.manifest_key(model, version)))
        except ObjectNotFound:
            return None

    def _resolve(self, context: grpc.ServicerContext, ref: common_pb2.ModelRef) -> common_pb2.Manifest:
        """Manifest of ref.version, or of the version an alias of that name points at."""
        self._require_model(context, ref.model)
        name = ref.version or "latest"
        self._check_name(context, "version or alias", name)
        try:
            manifest = self._load_manifest(ref.model, name)
            if manifest is not None:
                return manifest
            try:
                alias = json.loads(self._store.get_bytes(layout.alias_key(ref.model, name)))
            except ObjectNotFound:
                self._abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"model {ref.model!r} has no committed version or alias named {name!r}",
                )
            manifest = self._load_manifest(ref.model, alias["version"])
        except StorageError as exc:
            self._storage_failed(context, f"resolving {ref.model}:{name}", exc)
        if manifest is None:
            self._abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"alias {ref.model}:{name} points at version {alias['version']!r}, which does not exist",
            )
        return manifest

    def _aliases_by_version(self, model: str) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for alias in self._list_aliases(model):
            result.setdefault(alias.version, []).append(alias.name)
        return result

    def _list_aliases(self, model: str) -> list[registry_pb2.Alias]:
        aliases = []
        for info in self._store.list(layout.alias_prefix(model)):
            try:
                data = json.loads(self._store.get_bytes(info.key))
            except ObjectNotFound:  # deleted while listing
                continue
            aliases.append(
                registry_pb2.Alias(
                    model=model,
                    name=data["name"],
                    version=data["version"],
                    updated_at=_timestamp(data["updated_at"]),
                )
            )
        return aliases

    def _write_alias(self, model: str, name: str, version: str) -> registry_pb2.Alias:
        now = time.time()
        self._store.put_bytes(
            layout.alias_key(model, name),
            json.dumps({"name": name, "version": version, "updated_at": now}).encode(),
        )
        return registry_pb2.Alias(model=model, name=name, version=version, updated_at=_timestamp(now))

    def _version_message(
        self, manifest: common_pb2.Manifest, *, presign: bool, aliases: Iterable[str] = ()
    ) -> registry_pb2.ModelVersion:
        key = layout.weights_key(manifest.model, manifest.version)
        message = registry_pb2.ModelVersion(manifest=manifest, object_key=key, aliases=sorted(aliases))
        if presign:
            ttl = self._config.presign_ttl_seconds
            url = self._store.presign_get(key, timedelta(seconds=ttl))
            if url:
                message.get_url = url
                message.url_expires_at.CopyFrom(_timestamp(time.time() + ttl))
        return message

    @staticmethod
    def _page(request_page: common_pb2.PageRequest, total: int) -> tuple[int, int]:
        size = request_page.page_size or DEFAULT_PAGE_SIZE
        size = max(1, min(size, MAX_PAGE_SIZE))
        start = int(request_page.page_token) if request_page.page_token.isdigit() else 0
        return start, min(total, start + size)

    # -- models ----------------------------------------------------------------
    def CreateModel(
        self, request: registry_pb2.CreateModelRequest, context: grpc.ServicerContext
    ) -> registry_pb2.Model:
        self._check_name(context, "model name", request.name)
        key = layout.model_meta_key(request.name)
        try:
            if self._store.exists(key):
                self._abort(context, grpc.StatusCode.ALREADY_EXISTS, f"model {request.name!r} already exists")
            now = time.time()
            record = {
                "name": request.name,
                "description": request.description,
                "labels": dict(request.labels),
                "created_at": now,
            }
            self._store.put_bytes(key, json.dumps(record).encode())
        except StorageError as exc:
            self._storage_failed(context, f"creating model {request.name!r}", exc)
        log.info("model created", extra={"model": request.name})
        return self._model_from_json(json.dumps(record).encode())

    def GetModel(
        self, request: registry_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> registry_pb2.Model:
        self._authorize_model(context, request.name)
        return self._require_model(context, request.name)

    def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        try:
            names = sorted(
                p[len(layout.MODELS) :].rstrip("/") for p in self._store.list_prefixes(layout.MODELS)
            )
            start, end = self._page(request.page, len(names))
            models = []
            for name in names[start:end]:
                try:
                    models.append(self._model_from_json(self._store.get_bytes(layout.model_meta_key(name))))
                except ObjectNotFound:  # a prefix without model.json: not a model
                    continue
        except StorageError as exc:
            self._storage_failed(context, "listing models", exc)
        return registry_pb2.ListModelsResponse(
            models=models, next_page_token=str(end) if end < len(names) else ""
        )

    # -- uploads ---------------------------------------------------------------
    def BeginUpload(
        self, request: registry_pb2.BeginUploadRequest, context: grpc.ServicerContext
    ) -> registry_pb2.BeginUploadResponse:
        self._require_model(context, request.model)
        version = request.version or _new_version_id()
        self._check_name(context, "version", version)
        if request.size_bytes < 0:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "size_bytes must not be negative")
        if request.sha256 and not _SHA256_HEX.match(request.sha256):
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sha256 must be 64 hex digits, not {request.sha256!r}",
            )
        ttl = self._config.presign_ttl_seconds
        if request.size_bytes:
            ttl = max(ttl, 2 * request.size_bytes // _SLOW_CLIENT_BYTES_PER_S)
        ttl = min(ttl, self._config.max_presign_ttl_seconds)
        now = time.time()
        try:
            if self._store.exists(layout.manifest_key(request.model, version)):
                self._abort(
                    context,
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"version {request.model}:{version} is already committed; versions are immutable",
                )
            try:
                previous = _Reservation.from_json(
                    self._store.get_bytes(layout.upload_key(request.model, version))
                )
            except ObjectNotFound:
                previous = None
            if previous is not None and previous.expires_at > now:
                self._abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"version {request.model}:{version} is being uploaded (upload {previous.upload_id} "
                    f"expires in {previous.expires_at - now:.0f} s); commit it or choose another version",
                )
            key = layout.weights_key(request.model, version)
            url, headers, checked_sha = None, {}, None
            if request.presign and request.sha256:
                bound = self._store.presign_put_sha256(key, timedelta(seconds=ttl), request.sha256)
                if bound is not None:
                    url, headers, checked_sha = bound.url, bound.headers, request.sha256
            if request.presign and url is None:
                url = self._store.presign_put(key, timedelta(seconds=ttl))
            reservation = _Reservation(
                upload_id=f"{request.model}:{version}:{secrets.token_hex(8)}",
                model=request.model,
                version=version,
                expires_at=now + ttl,
                store_checked_sha256=checked_sha,
            )
            self._store.put_bytes(layout.upload_key(request.model, version), reservation.to_json())
        except StorageError as exc:
            self._storage_failed(context, f"reserving {request.model}:{version}", exc)
        log.info(
            "upload begun",
            extra={
                "model": request.model,
                "version": version,
                "presigned": bool(url),
                "store_checked": bool(checked_sha),
            },
        )
        return registry_pb2.BeginUploadResponse(
            upload_id=reservation.upload_id,
            model=request.model,
            version=version,
            object_key=key,
            put_url=url or "",
            expires_at=_timestamp(reservation.expires_at),
            max_chunk_bytes=self._config.max_chunk_bytes,
            put_headers=headers,
        )

    def _reservation(self, context: grpc.ServicerContext, upload_id: str) -> _Reservation:
        parts = upload_id.split(":")
        if len(parts) != 3 or check_name("model", parts[0]) or check_name("version", parts[1]):
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed upload_id {upload_id!r}")
        model, version, _ = parts
        try:
            reservation = _Reservation.from_json(self._store.get_bytes(layout.upload_key(model, version)))
        except ObjectNotFound:
            if self._store.exists(layout.manifest_key(model, version)):
                self._abort(
                    context,
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"version {model}:{version} is already committed; versions are immutable",
                )
            self._abort(context, grpc.StatusCode.NOT_FOUND, f"unknown upload {upload_id!r}")
        except StorageError as exc:
            self._storage_failed(context, f"reading upload {upload_id!r}", exc)
        if reservation.upload_id != upload_id:
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"upload {upload_id!r} was superseded by a newer upload of {model}:{version}",
            )
        return reservation

    def Upload(
        self, request_iterator: Iterator[registry_pb2.UploadChunk], context: grpc.ServicerContext
    ) -> registry_pb2.UploadResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            self._abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "the first Upload message must be the header"
            )
        reservation = self._reservation(context, first.header.upload_id)
        limit = self._config.max_chunk_bytes
        verifier = StreamVerifier(max_header_bytes=MAX_HEADER_BYTES)
        refusal: list[tuple[grpc.StatusCode, str]] = []
        verified: list[VerifiedBlob] = []

        def chunks() -> Iterator[bytes]:
            # Raising inside the generator makes the store abandon the object:
            # a refused upload never leaves partial weights behind.
            for message in request_iterator:
                if message.WhichOneof("part") != "data":
                    refusal.append(
                        (grpc.StatusCode.INVALID_ARGUMENT, "only the first Upload message may be a header")
                    )
                    raise _UploadRefused
                if len(message.data) > limit:
                    refusal.append(
                        (
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"upload chunk of {len(message.data)} bytes exceeds max_chunk_bytes={limit}",
                        )
                    )
                    raise _UploadRefused
                try:
                    verifier.feed(message.data)
                except SafetensorsError as exc:
                    refusal.append(
                        (
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"upload is not a valid safetensors file: {_explain(exc)}",
                        )
                    )
                    raise _UploadRefused from exc
                REGISTRY_BYTES.labels("in").inc(len(message.data))
                yield message.data
            if first.header.size_bytes and verifier.bytes_seen != first.header.size_bytes:
                refusal.append(
                    (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"upload ended after {verifier.bytes_seen} bytes; the header announced {first.header.size_bytes}",
                    )
                )
                raise _UploadRefused
            try:
                verified.append(verifier.finish())
            except SafetensorsError as exc:
                refusal.append(
                    (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"upload is not a valid safetensors file: {_explain(exc)}",
                    )
                )
                raise _UploadRefused from exc

        key = layout.weights_key(reservation.model, reservation.version)
        size = first.header.size_bytes or None
        try:
            # Receiving+verifying and sending to the store run on two threads.
            info = self._store.put_stream(key, prefetch(chunks(), depth=UPLOAD_READ_AHEAD), size=size)
        except _UploadRefused:
            code, message = refusal[0]
            self._abort(context, code, message)
        except StorageError as exc:
            if refusal:  # a backend may wrap the generator's exception
                self._abort(context, *refusal[0])
            self._storage_failed(context, f"storing {key}", exc)
        blob = verified[0]
        received = _Reservation(
            upload_id=reservation.upload_id,
            model=reservation.model,
            version=reservation.version,
            expires_at=reservation.expires_at,
            received=_blob_record(blob, info),
            store_checked_sha256=reservation.store_checked_sha256,
        )
        self._store.put_bytes(layout.upload_key(reservation.model, reservation.version), received.to_json())
        log.info("upload received", extra={"object_key": key, "bytes": blob.size})
        return registry_pb2.UploadResponse(
            upload_id=reservation.upload_id, object_key=key, size_bytes=blob.size, sha256=blob.sha256
        )

    def _verify_stored(
        self, context: grpc.ServicerContext, reservation: _Reservation, manifest: common_pb2.Manifest
    ) -> VerifiedBlob:
        """What the stored weights are, established as cheaply as is sound:

        * bytes that came through Upload were hashed on the way; if the object is
          unchanged since (etag), only its header is re-read;
        * bytes PUT through a URL bound to a sha256 were checked by the store
          itself; the header is re-read and the size checked, and the per-tensor
          checksums are the uploader's (pinned by that whole-file sha256);
        * anything else is read back in full and hashed.
        """
        key = layout.weights_key(reservation.model, reservation.version)
        try:
            info = self._store.stat(key)
        except ObjectNotFound:
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no weights were uploaded for {reservation.model}:{reservation.version} (expected {key})",
            )
        received = reservation.received
        started = time.perf_counter()
        try:
            if received and received["etag"] == info.etag and received["size"] == info.size:
                return VerifiedBlob(
                    size=received["size"],
                    sha256=received["sha256"],
                    header=self._stored_header(key, info.size),
                    tensor_sha256=received["tensor_sha256"],
                )
            if reservation.store_checked_sha256:
                header = self._stored_header(key, info.size)
                if header.expected_size != info.size:
                    raise (TruncatedError if info.size < header.expected_size else TrailingDataError)(
                        f"the header describes {header.expected_size} bytes, the stored object has {info.size}"
                    )
                claimed = {t.name: t.sha256.lower() for t in manifest.tensors if t.sha256}
                return VerifiedBlob(
                    size=info.size,
                    sha256=reservation.store_checked_sha256,
                    header=header,
                    tensor_sha256={e.name: claimed.get(e.name, "") for e in header.entries},
                )
            verifier = StreamVerifier(max_header_bytes=MAX_HEADER_BYTES)
            for chunk in prefetch(self._store.iter_range(key, chunk_bytes=VERIFY_CHUNK_BYTES)):
                verifier.feed(chunk)
            return verifier.finish()
        except SafetensorsError as exc:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"uploaded weights for {reservation.model}:{reservation.version} are not a valid "
                f"safetensors file: {_explain(exc)}",
            )
        except StorageError as exc:
            self._storage_failed(context, f"verifying {key}", exc)
        finally:
            REGISTRY_VERIFY_SECONDS.observe(time.perf_counter() - started)

    def _stored_header(self, key: str, size: int) -> SafetensorsHeader:
        return read_header(
            lambda offset, length: self._store.read_range(key, offset, length),
            file_size=size,
            max_header_bytes=MAX_HEADER_BYTES,
        )

    def CommitVersion(
        self, request: registry_pb2.CommitVersionRequest, context: grpc.ServicerContext
    ) -> registry_pb2.ModelVersion:
        reservation = self._reservation(context, request.upload_id)
        manifest = common_pb2.Manifest()
        manifest.CopyFrom(request.manifest)
        if not manifest.model:
            manifest.model = reservation.model
        if not manifest.version:
            manifest.version = reservation.version
        if (manifest.model, manifest.version) != (reservation.model, reservation.version):
            REGISTRY_COMMITS.labels("rejected").inc()
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"manifest names {manifest.model}:{manifest.version} but upload {request.upload_id!r} "
                f"is for {reservation.model}:{reservation.version}",
            )
        for alias in request.aliases:
            self._check_name(context, "alias", alias)
        if manifest.parent and self._load_manifest(manifest.model, manifest.parent) is None:
            REGISTRY_COMMITS.labels("rejected").inc()
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"parent version {manifest.model}:{manifest.parent} is not committed",
            )
        blob = self._verify_stored(context, reservation, manifest)
        problems = manifest_disagreements(manifest, blob)
        if problems:
            REGISTRY_COMMITS.labels("rejected").inc()
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"manifest for {manifest.model}:{manifest.version} disagrees with the uploaded weights: "
                + "; ".join(problems),
            )
        # Record what the registry verified, whatever the client sent.
        del manifest.tensors[:]
        manifest.tensors.extend(tensor_infos(blob))
        manifest.sha256 = blob.sha256
        if not manifest.HasField("created_at"):
            manifest.created_at.CopyFrom(timestamp_now())
        if not manifest.producer:
            manifest.producer = self._producer
        if manifest.kind == common_pb2.BLOB_KIND_UNSPECIFIED:
            manifest.kind = common_pb2.BLOB_KIND_MODEL
        try:
            # The manifest is the commit point; a concurrent committer of the same
            # upload loses here (the store offers no compare-and-set to all backends,
            # so the window between this check and the write is kept to one call).
            if self._store.exists(layout.manifest_key(manifest.model, manifest.version)):
                REGISTRY_COMMITS.labels("duplicate").inc()
                self._abort(
                    context,
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"version {manifest.model}:{manifest.version} is already committed; versions are immutable",
                )
            self._store.put_bytes(
                layout.manifest_key(manifest.model, manifest.version), manifest_to_json(manifest)
            )
            self._store.delete(layout.upload_key(manifest.model, manifest.version))
            for alias in request.aliases:
                self._write_alias(manifest.model, alias, manifest.version)
        except StorageError as exc:
            self._storage_failed(context, f"committing {manifest.model}:{manifest.version}", exc)
        REGISTRY_COMMITS.labels("committed").inc()
        log.info(
            "version committed",
            extra={"model": manifest.model, "version": manifest.version, "bytes": manifest.size_bytes},
        )
        return self._version_message(manifest, presign=False, aliases=request.aliases)

    # -- reading ---------------------------------------------------------------
    def GetVersion(
        self, request: registry_pb2.GetVersionRequest, context: grpc.ServicerContext
    ) -> registry_pb2.ModelVersion:
        self._authorize_model(context, request.ref.model)
        manifest = self._resolve(context, request.ref)
        aliases = self._aliases_by_version(manifest.model).get(manifest.version, [])
        return self._version_message(manifest, presign=request.presign, aliases=aliases)

    def Download(
        self, request: registry_pb2.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[registry_pb2.DownloadChunk]:
        self._authorize_model(context, request.ref.model)
        manifest = self._resolve(context, request.ref)
        if request.offset < 0 or request.length < 0 or request.offset > manifest.size_bytes:
            self._abort(
                context,
                grpc.StatusCode.OUT_OF_RANGE,
                f"range offset={request.offset} length={request.length} is outside the "
                f"{manifest.size_bytes}-byte weights",
            )
        chunk_bytes = min(request.chunk_bytes or self._config.max_chunk_bytes, self._config.max_chunk_bytes)
        length = request.length or None
        key = layout.weights_key(manifest.model, manifest.version)
        # No server-side hashing here: readers verify the manifest's sha256 end to end
        # (RegistryClient.pull does), so hashing again would only cost registry CPU.
        return self._download_chunks(context, manifest, key, request.offset, length, chunk_bytes)

    def _download_chunks(
        self,
        context: grpc.ServicerContext,
        manifest: common_pb2.Manifest,
        key: str,
        offset: int,
        length: int | None,
        chunk_bytes: int,
    ) -> Iterator[registry_pb2.DownloadChunk]:
        first = True
        try:
            for data in prefetch(self._store.iter_range(key, offset, length, chunk_bytes=chunk_bytes)):
                REGISTRY_BYTES.labels("out").inc(len(data))
                if first:
                    first = False
                    yield registry_pb2.DownloadChunk(manifest=manifest, data=data)
                else:
                    yield registry_pb2.DownloadChunk(data=data)
        except StorageError as exc:
            self._storage_failed(context, f"reading {key}", exc)
        if first:
            yield registry_pb2.DownloadChunk(manifest=manifest)

    def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: grpc.ServicerContext
    ) -> registry_pb2.ListVersionsResponse:
        self._authorize_model(context, request.model)
        self._require_model(context, request.model)
        try:
            manifests = []
            for prefix in self._store.list_prefixes(layout.model_prefix(request.model)):
                version = prefix[len(layout.model_prefix(request.model)) :].rstrip("/")
                manifest = self._load_manifest(request.model, version)
                if manifest is not None:
                    manifests.append(manifest)
            aliases = self._aliases_by_version(request.model)
        except StorageError as exc:
            self._storage_failed(context, f"listing versions of {request.model!r}", exc)
        manifests.sort(key=lambda m: (m.created_at.seconds, m.created_at.nanos, m.version))
        start, end = self._page(request.page, len(manifests))
        return registry_pb2.ListVersionsResponse(
            versions=[
                self._version_message(m, presign=False, aliases=aliases.get(m.version, []))
                for m in manifests[start:end]
            ],
            next_page_token=str(end) if end < len(manifests) else "",
        )

    # -- aliases ---------------------------------------------------------------
    def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: grpc.ServicerContext
    ) -> registry_pb2.Alias:
        self._require_model(context, request.model)
        self._check_name(context, "alias", request.name)
        self._check_name(context, "version", request.version)
        if self._load_manifest(request.model, request.version) is None:
            self._abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"cannot point alias {request.name!r} at {request.model}:{request.version}: no such committed version",
            )
        return self._write_alias(request.model, request.name, request.version)

    def DeleteAlias(
        self, request: registry_pb2.DeleteAliasRequest, context: grpc.ServicerContext
    ) -> registry_pb2.DeleteAliasResponse:
        self._require_model(context, request.model)
        self._check_name(context, "alias", request.name)
        key = layout.alias_key(request.model, request.name)
        if not self._store.exists(key):
            self._abort(
                context, grpc.StatusCode.NOT_FOUND, f"model {request.model!r} has no alias {request.name!r}"
            )
        self._store.delete(key)
        return registry_pb2.DeleteAliasResponse()

    def ListAliases(
        self, request: registry_pb2.ListAliasesRequest, context: grpc.ServicerContext
    ) -> registry_pb2.ListAliasesResponse:
        self._authorize_model(context, request.model)
        self._require_model(context, request.model)
        return registry_pb2.ListAliasesResponse(
            aliases=sorted(self._list_aliases(request.model), key=lambda a: a.name)
        )

    # -- other blobs -----------------------------------------------------------
    def PresignBlob(
        self, request: registry_pb2.PresignBlobRequest, context: grpc.ServicerContext
    ) -> registry_pb2.PresignBlobResponse:
        key = request.object_key
        try:
            validate_key(key)
        except InvalidKey as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not key.startswith(layout.BLOB_PREFIXES):
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"PresignBlob serves keys under {' or '.join(layout.BLOB_PREFIXES)} only, not {key!r}; "
                "model versions go through BeginUpload/CommitVersion",
            )
        principal = principal_from_context(context)
        if not principal.is_admin:
            experiment = key.split("/")[1]
            if not key.startswith("updates/") or not principal.may_act_on(experiment):
                self._abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"a site token may presign only updates/<its experiment>/...; {key!r} is outside "
                    f"experiment {principal.experiment!r}",
                )
        if request.method not in (registry_pb2.PRESIGN_METHOD_GET, registry_pb2.PRESIGN_METHOD_PUT):
            self._abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "method must be PRESIGN_METHOD_GET or _PUT"
            )
        if request.ttl_seconds < 0:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "ttl_seconds must not be negative")
        ttl = min(
            request.ttl_seconds or self._config.presign_ttl_seconds, self._config.max_presign_ttl_seconds
        )
        presign = (
            self._store.presign_get
            if request.method == registry_pb2.PRESIGN_METHOD_GET
            else self._store.presign_put
        )
        url = presign(key, timedelta(seconds=ttl))
        if url is None:
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the {self._store.kind!r} object store has no HTTP endpoint to presign; use the registry streams",
            )
        return registry_pb2.PresignBlobResponse(url=url, expires_at=_timestamp(time.time() + ttl))


def _explain(exc: SafetensorsError) -> str:
    if isinstance(exc, TruncatedError):
        return f"truncated: {exc}"
    if isinstance(exc, TrailingDataError):
        return f"trailing bytes: {exc}"
    return str(exc)


class _UploadRefused(Exception):
    """Raised inside the upload generator to make the store abandon a refused upload."""
