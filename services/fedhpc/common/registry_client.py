"""Client for the Registry service: push and pull model weights by either data path.

Transports:
  * ``presigned`` - bytes go straight between this process and object storage
    over a presigned URL the registry hands out (the default when available);
  * ``stream``    - bytes go through the registry's chunked gRPC streams (the
    fallback when storage is not reachable, or the store is a directory);
  * ``auto``      - presigned when the registry offers a URL, else stream.

Every pull is verified against the manifest's size and sha256 before the file
appears at its destination (the registry verified the per-tensor checksums when
the version was committed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

import grpc

from fedhpc.api.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from fedhpc.common.manifest import manifest_for_blob, timestamp_now
from fedhpc.common.streams import prefetch, read_ahead
from fedhpc.common.tensors import (
    FileTensorSource,
    SafetensorsError,
    SafetensorsHeader,
    VerifiedBlob,
    read_source_header,
    tensor_hashes_of_file,
    verify_file,
)

Transport = Literal["auto", "presigned", "stream"]
ProgressCallback = Callable[[int], None]
TRANSFER_CHUNK_BYTES = 1 << 20
_HTTP_TIMEOUT_S = 300.0


class RegistryClientError(RuntimeError):
    """A transfer failed outside gRPC (HTTP status, checksum, missing URL)."""


def parse_model_ref(text: str, default_version: str = "latest") -> common_pb2.ModelRef:
    """'model', 'model:version' or 'model:alias' -> ModelRef."""
    model, _, version = text.partition(":")
    return common_pb2.ModelRef(model=model, version=version or default_version)


def _http_connection(url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryClientError(f"unsupported presigned URL {url[:80]!r}")
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname, parts.port, timeout=_HTTP_TIMEOUT_S, blocksize=TRANSFER_CHUNK_BYTES)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return conn, target


class Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


def _file_chunks(
    f: io.BufferedIOBase,
    chunk_bytes: int,
    progress: ProgressCallback | None,
) -> Iterator[memoryview]:
    """The file in chunks read into one reused buffer: each view is valid until the next is asked for."""
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    while n := f.readinto(view):
        if progress:
            progress(n)
        yield view[:n]


def http_put_file(
    url: str,
    path: Path,
    progress: ProgressCallback | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> None:
    """PUT a file to a presigned URL, streaming it, with the headers the URL was signed for."""
    size = path.stat().st_size
    conn, target = _http_connection(url)
    try:
        with open(path, "rb") as f:
            chunks = _file_chunks(f, TRANSFER_CHUNK_BYTES, progress)
            conn.request("PUT", target, body=chunks, headers={**(headers or {}), "Content-Length": str(size)})
        response = conn.getresponse()
        reply = response.read(2048)
        if response.status // 100 != 2:
            text = reply.decode(errors="replace")
            if "BadDigest" in text or "Checksum" in text:
                raise RegistryClientError(
                    f"the object store refused the upload: the bytes sent do not match the sha256 the URL is "
                    f"bound to (file changed while uploading?): HTTP {response.status}"
                )
            raise RegistryClientError(f"presigned PUT failed with HTTP {response.status}: {text[:300]}")
    finally:
        conn.close()


def http_get_chunks(url: str) -> Iterator[memoryview]:
    """GET a presigned URL: the body in chunks, read ahead into reused buffers.

    Each view is valid until the next one is asked for.
    """
    conn, target = _http_connection(url)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        if response.status // 100 != 2:
            body = response.read(2048)
            raise RegistryClientError(
                f"presigned GET failed with HTTP {response.status}: {body.decode(errors='replace')[:300]}"
            )
        yield from read_ahead(response.readinto, TRANSFER_CHUNK_BYTES)
    finally:
        conn.close()


class RegistryClient:
    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = registry_pb2_grpc.RegistryStub(channel)

    @property
    def stub(self) -> registry_pb2_grpc.RegistryStub:
        return self._stub

    # -- models and metadata -------------------------------------------------------
    def create_model(self, name: str, description: str = "", *, exist_ok: bool = True) -> registry_pb2.Model:
        try:
            return self._stub.CreateModel(registry_pb2.CreateModelRequest(name=name, description=description))
        except grpc.RpcError as exc:
            if exist_ok and exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                return self._stub.GetModel(registry_pb2.GetModelRequest(name=name))
            raise

    def list_models(self) -> Iterator[registry_pb2.Model]:
        token = ""
        while True:
            page = self._stub.ListModels(
                registry_pb2.ListModelsRequest(page=common_pb2.PageRequest(page_token=token))
            )
            yield from page.models
            token = page.next_page_token
            if not token:
                return

    def list_versions(self, model: str) -> Iterator[registry_pb2.ModelVersion]:
        token = ""
        while True:
            page = self._stub.ListVersions(
                registry_pb2.ListVersionsRequest(model=model, page=common_pb2.PageRequest(page_token=token))
            )
            yield from page.versions
            token = page.next_page_token
            if not token:
                return

    def get_version(self, ref: common_pb2.ModelRef, *, presign: bool = False) -> registry_pb2.ModelVersion:
        return self._stub.GetVersion(registry_pb2.GetVersionRequest(ref=ref, presign=presign))

    def set_alias(self, model: str, name: str, version: str) -> registry_pb2.Alias:
        return self._stub.SetAlias(registry_pb2.SetAliasRequest(model=model, name=name, version=version))

    def list_aliases(self, model: str) -> list[registry_pb2.Alias]:
        return list(self._stub.ListAliases(registry_pb2.ListAliasesRequest(model=model)).aliases)

    # -- push ------------------------------------------------------------------------
    def push(
        self,
        model: str,
        path: Path,
        *,
        version: str = "",
        transport: Transport = "auto",
        parent: str = "",
        round_number: int = 0,
        algorithm: str = "init",
        producer: str = "",
        metrics: Mapping[str, float] | None = None,
        aliases: Sequence[str] = ("latest",),
        kind: common_pb2.BlobKind.ValueType = common_pb2.BLOB_KIND_MODEL,
        verified: VerifiedBlob | None = None,
        progress: ProgressCallback | None = None,
    ) -> registry_pb2.ModelVersion:
        """Upload a safetensors file as a new version and commit it.

        ``verified`` is the file's VerifiedBlob when the caller already has it:
        a producer that wrote the file with SafetensorsWriter (trainers, the
        aggregator) got its hashes while writing. Without it, the presigned path
        hashes the file first, because the URL is bound to its sha256 (the store
        itself then refuses any other bytes), and the stream path hashes the
        file while it goes out. Either way the registry checks everything at commit.
        """
        size = path.stat().st_size
        if verified is not None and verified.size != size:
            raise RegistryClientError(
                f"{path} has {size} bytes but the VerifiedBlob given for it {verified.size}"
            )
        if verified is None and transport != "stream":
            verified = _verify(path)
        # The stream path hashes while sending, so only the header is read up front.
        header = verified.header if verified is not None else _file_header(path)
        begun = self._stub.BeginUpload(
            registry_pb2.BeginUploadRequest(
                model=model,
                version=version,
                size_bytes=size,
                presign=transport != "stream",
                sha256=verified.sha256 if verified is not None else "",
            )
        )
        if transport == "presigned" and not begun.put_url:
            raise RegistryClientError(
                "the registry offered no presigned URL (its store has no HTTP endpoint); use --transport stream"
            )
        if begun.put_url and transport != "stream":
            missing = verified is not None and len(verified.tensor_sha256) < len(verified.header.entries)
            if missing and verified is not None:
                # A producer that skipped per-tensor hashes (the aggregator does, to finish
                # sooner) gets them here, read back while the upload runs.
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensor-hashes") as pool:
                    hashes = pool.submit(tensor_hashes_of_file, path, verified.header)
                    http_put_file(begun.put_url, path, progress, headers=dict(begun.put_headers))
                    verified = dataclasses.replace(verified, tensor_sha256=hashes.result())
            else:
                http_put_file(begun.put_url, path, progress, headers=dict(begun.put_headers))
        else:
            digest = hashlib.sha256() if verified is None else None
            self._upload_stream(begun, path, progress, digest)
            if digest is not None:
                # Per-tensor hashes are the registry's, taken as the bytes passed through it.
                verified = VerifiedBlob(size, digest.hexdigest(), header, {})
        assert verified is not None
        manifest = manifest_for_blob(
            verified,
            model=model,
            version=begun.version,
            parent=parent,
            round_number=round_number,
            algorithm=algorithm,
            producer=producer or f"cli/{os.environ.get('USER', 'unknown')}",
            metrics=metrics,
            kind=kind,
        )
        manifest.created_at.CopyFrom(timestamp_now())
        return self._stub.CommitVersion(
            registry_pb2.CommitVersionRequest(
                upload_id=begun.upload_id, manifest=manifest, aliases=list(aliases)
            )
        )

    def _upload_stream(
        self,
        begun: registry_pb2.BeginUploadResponse,
        path: Path,
        progress: ProgressCallback | None,
        digest: Digest | None,
    ) -> registry_pb2.UploadResponse:
        chunk_bytes = begun.max_chunk_bytes or TRANSFER_CHUNK_BYTES
        size = path.stat().st_size

        def messages() -> Iterator[registry_pb2.UploadChunk]:
            yield registry_pb2.UploadChunk(
                header=registry_pb2.UploadHeader(upload_id=begun.upload_id, size_bytes=size)
            )
            with open(path, "rb") as f:
                for chunk in _file_chunks(f, chunk_bytes, progress):
                    if digest is not None:
                        digest.update(chunk)
                    yield registry_pb2.UploadChunk(data=bytes(chunk))

        return self._stub.Upload(messages())

    # -- pull ------------------------------------------------------------------------
    def pull(
        self,
        ref: common_pb2.ModelRef,
        dest: Path,
        *,
        transport: Transport = "auto",
        progress: ProgressCallback | None = None,
    ) -> registry_pb2.ModelVersion:
        """Download a version to dest, verified against its manifest (written atomically)."""
        version = self.get_version(ref, presign=transport != "stream")
        if transport == "presigned" and not version.get_url:
            raise RegistryClientError(
                "the registry offered no presigned URL (its store has no HTTP endpoint); use --transport stream"
            )
        chunks: Iterator[bytes | memoryview]
        if version.get_url and transport != "stream":
            chunks = http_get_chunks(version.get_url)
        else:
            # Ask for the resolved version, not the alias: it may move meanwhile.
            resolved = common_pb2.ModelRef(model=version.manifest.model, version=version.manifest.version)
            chunks = prefetch(c.data for c in self._stub.Download(registry_pb2.DownloadRequest(ref=resolved)))
        _write_verified(chunks, dest, version.manifest, progress)
        return version


def _verify(path: Path) -> VerifiedBlob:
    try:
        return verify_file(path)
    except SafetensorsError as exc:
        raise RegistryClientError(f"{path} is not a valid safetensors file: {exc}") from exc


def _file_header(path: Path) -> SafetensorsHeader:
    try:
        with FileTensorSource(path) as source:
            header = read_source_header(source)
    except SafetensorsError as exc:
        raise RegistryClientError(f"{path} is not a valid safetensors file: {exc}") from exc
    if header.expected_size != path.stat().st_size:
        raise RegistryClientError(
            f"{path} is not a valid safetensors file: its header describes {header.expected_size} bytes, "
            f"the file has {path.stat().st_size}"
        )
    return header


def _write_verified(
    chunks: Iterator[bytes | memoryview],
    dest: Path,
    manifest: common_pb2.Manifest,
    progress: ProgressCallback | None,
) -> None:
    """Write chunks to dest via a temporary file; it appears only if size and sha256 match the manifest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
                size += len(chunk)
                if progress:
                    progress(len(chunk))
        if digest.hexdigest() != manifest.sha256 or size != manifest.size_bytes:
            raise RegistryClientError(
                f"downloaded {size} bytes with sha256 {digest.hexdigest()}; the manifest of "
                f"{manifest.model}:{manifest.version} says {manifest.size_bytes} bytes, {manifest.sha256}"
            )
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
