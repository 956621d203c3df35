"""The ObjectStore interface every storage backend implements.

Keys are '/'-separated relative paths ("models/exp1/v3/weights.safetensors").
Backends stream: nothing here needs a whole object in memory except the
explicit ``*_bytes`` helpers meant for small objects (manifests, aliases).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO, ClassVar

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_KEY_BYTES = 1024
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9._\-=+@,:]+$")


class StorageError(Exception):
    """An object store operation failed (after retries, for transient errors)."""


class ObjectNotFound(StorageError, KeyError):
    """The key does not exist."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object not found: {key}")
        self.key = key

    def __str__(self) -> str:  # KeyError would repr() the message
        return f"object not found: {self.key}"


class InvalidKey(StorageError, ValueError):
    """The key is not a safe relative object key."""


@dataclass(frozen=True)
class PresignedPut:
    """A presigned upload: PUT the body to url with exactly these headers."""

    url: str
    headers: dict[str, str]


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime | None = None


def validate_key(key: str) -> str:
    """Return key if it is a safe object key, else raise InvalidKey naming the problem."""
    if not key:
        raise InvalidKey("object key is empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidKey(f"object key is longer than {MAX_KEY_BYTES} bytes: {key[:60]}...")
    if key.startswith("/") or key.endswith("/"):
        raise InvalidKey(f"object key must not start or end with '/': {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(f"object key has an empty, '.' or '..' segment: {key!r}")
        if not _KEY_SEGMENT.match(segment):
            raise InvalidKey(f"object key has characters outside [A-Za-z0-9._-=+@,:]: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key-like path that may end with '/'."""
    if prefix:
        validate_key(prefix.rstrip("/"))
    return prefix


class ObjectStore(ABC):
    """Blob storage. Implementations: FileObjectStore ("file"), S3ObjectStore ("s3")."""

    kind: ClassVar[str]

    # -- writing ---------------------------------------------------------------
    @abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes] | BinaryIO, size: int | None = None) -> ObjectInfo:
        """Store an object from a byte stream without holding it whole.

        ``chunks`` is an iterable of byte chunks or a binary file object;
        ``size`` (when known) lets the backend pick a single PUT or multipart.
        The object becomes visible only once complete (no partial objects).
        """

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Store a small object."""
        return self.put_stream(key, [data], size=len(data))

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        with open(path, "rb") as f:
            return self.put_stream(key, f, size=path.stat().st_size)

    # -- reading ---------------------------------------------------------------
    @abstractmethod
    def iter_range(
        self, key: str, offset: int = 0, length: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[bytes]:
        """Yield the object's bytes [offset, offset+length) in chunks of at most chunk_bytes.

        ``length=None`` reads to the end. Raises ObjectNotFound for a missing key
        (on the first next(), at the latest).
        """

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes at ``offset`` (fewer only at the end of the object)."""
        return b"".join(self.iter_range(key, offset, length))

    def get_bytes(self, key: str) -> bytes:
        """Read a small object whole."""
        return b"".join(self.iter_range(key))

    def get_file(self, key: str, path: Path) -> ObjectInfo:
        """Download to path (written to a temporary name, then renamed)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            with open(tmp, "wb") as f:
                for chunk in self.iter_range(key):
                    f.write(chunk)
            tmp.replace(path)
        except BaseException:
            # A missing key or a broken download must not leave a stray .part file.
            tmp.unlink(missing_ok=True)
            raise
        return self.stat(key)

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and etag; raises ObjectNotFound."""

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Every object whose key starts with prefix, in lexicographic key order."""

    @abstractmethod
    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        """The immediate "sub-directories" below prefix (which should end with '/'), each ending with '/'."""

    # -- deleting --------------------------------------------------------------
    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under prefix; returns how many."""
        keys = [info.key for info in self.list(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    # -- direct access for clients that never see credentials --------------------
    @abstractmethod
    def presign_get(self, key: str, ttl: timedelta) -> str | None:
        """A URL that GETs this one object until ttl passes; None if the backend has no HTTP endpoint."""

    @abstractmethod
    def presign_put(self, key: str, ttl: timedelta) -> str | None:
        """A URL that PUTs this one object until ttl passes; None if the backend has no HTTP endpoint."""

    def presign_put_sha256(self, key: str, ttl: timedelta, sha256_hex: str) -> PresignedPut | None:
        """A presigned PUT the store accepts only with a body whose sha256 is sha256_hex.

        None when the backend has no HTTP endpoint or cannot make the store enforce it.
        """
        return None

    def local_path(self, key: str) -> Path | None:
        """A filesystem path holding the object, for backends that have one (file); else None."""
        return None

    def writable_path(self, key: str) -> Path | None:
        """Where a local writer (a trainer next to a file store) may create the object; the
        store serves it from there afterwards. None for backends without a filesystem."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
