"""Moving weights for a trainer: fetch the global model, put the update.

The task names one source and one target (common/contracts.py). Every byte of the global model
is checked against the task's sha256 and size before anything loads it, whichever way it came:

* ``url``      - a presigned GET straight from object storage (the default);
* ``path``     - a staged file (file store, Globus Transfer destination), hashed in place;
* ``registry`` - the registry's chunked gRPC Download stream (the fallback).

Updates go to a presigned PUT ``url`` or are written atomically to a ``path``.
"""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import torch

from fedhpc.api.v1 import common_pb2
from fedhpc.common.contracts import ModelSource, UpdateTarget
from fedhpc.common.grpc_client import make_channel
from fedhpc.common.registry_client import RegistryClient, RegistryClientError, http_get_chunks, http_put_file
from fedhpc.common.tensors import VerifiedBlob, write_safetensors_file

__all__ = ["TransferError", "fetch_model", "put_update", "redact_url"]

_HASH_CHUNK_BYTES = 1 << 20
# Failures of the network or the filesystem that mean "the transfer failed", not "a bug".
_TRANSFER_ERRORS = (OSError, http.client.HTTPException, RegistryClientError)


class TransferError(RuntimeError):
    """The model could not be fetched or verified, or the update could not be stored."""


def redact_url(url: str) -> str:
    """The URL without its query: presigned signatures must not end up in results or logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# -- fetching the global model ------------------------------------------------------------------


def _check_digest(sha256: str, size: int, source: ModelSource, where: str) -> None:
    if size != source.size_bytes:
        raise TransferError(
            f"global model {source.model}:{source.version} from {where} has {size} bytes, "
            f"the task says {source.size_bytes}"
        )
    if sha256 != source.sha256:
        raise TransferError(
            f"global model {source.model}:{source.version} from {where} has sha256 {sha256}, "
            f"the task says {source.sha256}; refusing to use it"
        )


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _staged_file(source: ModelSource, path: Path) -> Path:
    """A staged model is used where it lies (no copy): it is immutable once staged."""
    if not path.is_file():
        raise TransferError(f"global model file {path} does not exist (or is not a file)")
    # The size is free to check and catches a half-staged file before hashing it.
    if path.stat().st_size != source.size_bytes:
        raise TransferError(
            f"global model file {path} has {path.stat().st_size} bytes, the task says {source.size_bytes} "
            "(still being staged?)"
        )
    sha256, size = _hash_file(path)
    _check_digest(sha256, size, source, str(path))
    return path


def _write_checked(chunks: Iterable[bytes | memoryview], dest: Path, source: ModelSource, where: str) -> Path:
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as f:
        for chunk in chunks:
            size += len(chunk)
            # Stop a runaway body before it fills the disk.
            if size > source.size_bytes:
                raise TransferError(
                    f"global model from {where} is larger than the {source.size_bytes} bytes the task says"
                )
            digest.update(chunk)
            f.write(chunk)
    _check_digest(digest.hexdigest(), size, source, where)
    return dest


def _download_url(source: ModelSource, url: str, dest: Path) -> Path:
    where = redact_url(url)
    try:
        return _write_checked(http_get_chunks(url), dest, source, where)
    except _TRANSFER_ERRORS as exc:
        raise TransferError(f"download of the global model from {where} failed: {exc}") from exc


def _download_registry(
    source: ModelSource, target: str, dest: Path, token: str | None, ca_file: Path | None
) -> Path:
    channel = make_channel(target, token=token or None, tls_ca_file=ca_file)
    try:
        version = RegistryClient(channel).pull(
            common_pb2.ModelRef(model=source.model, version=source.version), dest, transport="stream"
        )
    except grpc.RpcError as exc:
        code = exc.code().name if callable(getattr(exc, "code", None)) else "UNKNOWN"
        details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        raise TransferError(
            f"download of {source.model}:{source.version} from the registry at {target} failed: {code}: {details}"
        ) from exc
    except _TRANSFER_ERRORS as exc:
        raise TransferError(
            f"download of {source.model}:{source.version} from the registry at {target} failed: {exc}"
        ) from exc
    finally:
        channel.close()
    # pull() checked the bytes against the registry's manifest; the task must name the same bytes.
    _check_digest(version.manifest.sha256, version.manifest.size_bytes, source, f"the registry at {target}")
    return dest


def fetch_model(
    source: ModelSource, work_dir: Path, *, token: str | None = None, registry_ca_file: Path | None = None
) -> Path:
    """A local safetensors file holding the global model, verified against ``source.sha256``.

    Downloads go into ``work_dir`` (the caller removes it); a staged ``path`` is used in place.
    Raises :class:`TransferError` with a message naming the source (never a URL's signature).
    """
    dest = work_dir / "global.safetensors"
    if source.path is not None:
        return _staged_file(source, Path(source.path))
    if source.url is not None:
        return _download_url(source, source.url, dest)
    assert source.registry is not None  # ModelSource guarantees exactly one source
    return _download_registry(source, source.registry, dest, token, registry_ca_file)


# -- putting the update --------------------------------------------------------------------------


def put_update(
    target: UpdateTarget, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], work_dir: Path
) -> VerifiedBlob:
    """Write ``tensors`` as safetensors (hashing while writing) and store them at ``target``.

    A ``path`` target is written atomically (temporary file in the same directory, then rename),
    so an aggregator never sees half a file; a ``url`` target gets a presigned PUT with the
    target's headers. Raises :class:`TransferError`.
    """
    if target.path is not None:
        dest = Path(target.path)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            return write_safetensors_file(dest, tensors, metadata)
        except OSError as exc:
            raise TransferError(f"writing the update to {dest} failed: {exc}") from exc
    assert target.url is not None  # UpdateTarget guarantees exactly one target
    local = work_dir / "update.safetensors"
    try:
        # No fsync: the file only lives until it is uploaded.
        blob = write_safetensors_file(local, tensors, metadata, fsync=False)
        http_put_file(target.url, local, headers=target.headers)
    except _TRANSFER_ERRORS as exc:
        raise TransferError(f"upload of the update to {redact_url(target.url)} failed: {exc}") from exc
    return blob
