"""Objects as files under a directory: the embedded backend for local runs and single hosts.

Key ``a/b/c`` is the file ``root/a/b/c``. Writes go to a temporary file in the
target directory and are renamed into place, so readers and listings never see
a partial object and concurrent writers of one key leave exactly one complete
version (the last rename wins).

A filesystem cannot hold a file and a directory of the same name, so unlike S3
this backend cannot store both ``a`` and ``a/b``; the second put fails with
StorageError.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import stat as stat_mod
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO, ClassVar

from fedhpc.common.storage.base import (
    DEFAULT_CHUNK_BYTES,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    validate_key,
    validate_prefix,
)

# '~' is outside the key alphabet (validate_key), so a temp file can never be
# mistaken for, or hide, a real object.
_TEMP_MARK = ".tmp~"
_READ_BYTES = 1 << 20
_MKDIR_ATTEMPTS = 5


def _is_object_name(name: str) -> bool:
    """Whether a directory entry can be (part of) an object key; temp files and strays cannot."""
    if _TEMP_MARK in name:
        return False
    try:
        validate_key(name)
    except InvalidKey:
        return False
    return True


def iter_source(chunks: Iterable[bytes] | BinaryIO, read_bytes: int = _READ_BYTES) -> Iterator[bytes]:
    """The byte chunks of put_stream's input, whether a chunk iterable or a binary file object."""
    if isinstance(chunks, bytes | bytearray | memoryview):
        # Iterating bytes yields ints; catch the mistake here rather than deep in a write.
        raise TypeError(
            "put_stream takes an iterable of byte chunks or a binary file; use put_bytes for bytes"
        )
    read = getattr(chunks, "read", None)
    if callable(read):
        while True:
            block = read(read_bytes)
            if not block:
                return
            yield bytes(block) if not isinstance(block, bytes) else block
    else:
        for chunk in chunks:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"put_stream chunks must be bytes, not {type(chunk).__name__}")
            if chunk:
                yield bytes(chunk) if not isinstance(chunk, bytes) else chunk


def check_range(offset: int, length: int | None, chunk_bytes: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    if length is not None and length < 0:
        raise ValueError(f"length must be >= 0 or None, not {length}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, not {chunk_bytes}")


class FileObjectStore(ObjectStore):
    """Objects under ``root``; ``fsync`` makes every completed put durable before it is visible."""

    kind: ClassVar[str] = "file"

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root).absolute()
        self._fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"file store: cannot create root directory {self.root}: {exc}") from exc

    def __repr__(self) -> str:
        return f"FileObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _dir(self, dir_key: str) -> Path:
        return self.root.joinpath(*dir_key.split("/")) if dir_key else self.root

    # -- writing ---------------------------------------------------------------
    def put_stream(self, key: str, chunks: Iterable[bytes] | BinaryIO, size: int | None = None) -> ObjectInfo:
        path = self._path(key)
        if size is not None and size < 0:
            raise ValueError(f"size must be >= 0 or None, not {size}")
        source = iter_source(chunks)
        fd, tmp = self._open_temp(key, path)
        try:
            written = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in source:
                    written += len(chunk)
                    if size is not None and written > size:
                        raise StorageError(
                            f"file store: stream for {key} is longer than its declared size {size}"
                        )
                    try:
                        f.write(chunk)
                    except OSError as exc:
                        raise StorageError(f"file store: cannot write {key}: {exc}") from exc
                if size is not None and written != size:
                    raise StorageError(f"file store: stream for {key} ended after {written} of {size} bytes")
                try:
                    f.flush()
                    if self._fsync:
                        os.fsync(f.fileno())
                    # Taken before the rename: a concurrent writer may replace the key right after.
                    st = os.fstat(f.fileno())
                except OSError as exc:
                    raise StorageError(f"file store: cannot write {key}: {exc}") from exc
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise StorageError(f"file store: cannot store {key}: {exc}") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self._fsync:
            self._fsync_dir(path.parent)
        return self._info(key, st)

    def _open_temp(self, key: str, path: Path) -> tuple[int, Path]:
        tmp = path.with_name(f".{path.name[:100]}{_TEMP_MARK}{uuid.uuid4().hex}")
        for _ in range(_MKDIR_ATTEMPTS):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                raise StorageError(
                    f"file store: cannot store {key}: a parent of it is an object "
                    "(this backend cannot hold both 'a' and 'a/b')"
                ) from exc
            except OSError as exc:
                raise StorageError(f"file store: cannot create directory for {key}: {exc}") from exc
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
            except FileNotFoundError:
                # A concurrent delete pruned the freshly made (still empty) directory.
                continue
            except OSError as exc:
                raise StorageError(f"file store: cannot create a temporary file for {key}: {exc}") from exc
        raise StorageError(f"file store: directory for {key} keeps disappearing (concurrent deletes)")

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------
    def iter_range(
        self, key: str, offset: int = 0, length: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[bytes]:
        path = self._path(key)
        check_range(offset, length, chunk_bytes)
        # Checked now so that a missing key fails at the call, not only on first next().
        self._stat_path(key, path)
        return self._read(key, path, offset, length, chunk_bytes)

    def _read(
        self, key: str, path: Path, offset: int, length: int | None, chunk_bytes: int
    ) -> Iterator[bytes]:
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StorageError(f"file store: cannot read {key}: {exc}") from exc
        with f:
            remaining = length
            try:
                f.seek(offset)
                while remaining is None or remaining > 0:
                    want = chunk_bytes if remaining is None else min(chunk_bytes, remaining)
                    block = f.read(want)
                    if not block:
                        return
                    if remaining is not None:
                        remaining -= len(block)
                    yield block
            except OSError as exc:
                raise StorageError(f"file store: cannot read {key}: {exc}") from exc

    def _stat_path(self, key: str, path: Path) -> os.stat_result:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StorageError(f"file store: cannot stat {key}: {exc}") from exc
        if not stat_mod.S_ISREG(st.st_mode):
            raise ObjectNotFound(key)
        return st

    @staticmethod
    def _info(key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=f"{st.st_mtime_ns:x}-{st.st_size:x}",
            last_modified=datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC),
        )

    def stat(self, key: str) -> ObjectInfo:
        return self._info(key, self._stat_path(key, self._path(key)))

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        return self._walk(prefix.rpartition("/")[0], prefix, start_after)

    def _scan(self, dir_key: str) -> builtins.list[tuple[str, str, os.DirEntry[str]]]:
        """(sort key, object key, entry) for the usable entries of one directory, in key order."""
        try:
            with os.scandir(self._dir(dir_key)) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StorageError(f"file store: cannot list {dir_key or '/'}: {exc}") from exc
        items = []
        for entry in entries:
            if not _is_object_name(entry.name):
                continue
            key = f"{dir_key}/{entry.name}" if dir_key else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    # A directory sorts as "name/" so its keys land where a sort of full keys puts
                    # them: sorting bare names would walk "a/x" before "a.b", but "a.b" < "a/x".
                    items.append((key + "/", key, entry))
                elif entry.is_file(follow_symlinks=False):
                    items.append((key, key, entry))
            except OSError:
                continue
        items.sort(key=lambda item: item[0])
        return items

    def _walk(self, dir_key: str, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        for sort_key, key, entry in self._scan(dir_key):
            if sort_key.endswith("/"):
                if not (sort_key.startswith(prefix) or prefix.startswith(sort_key)):
                    continue
                if (
                    start_after is not None
                    and sort_key < start_after
                    and not start_after.startswith(sort_key)
                ):
                    continue  # every key below sorts before start_after
                yield from self._walk(key, prefix, start_after)
            else:
                if not key.startswith(prefix) or (start_after is not None and key <= start_after):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while listing
                yield self._info(key, st)

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        base, _, partial = prefix.rpartition("/")
        for sort_key, key, _entry in self._scan(base):
            if not sort_key.endswith("/") or not key.rpartition("/")[2].startswith(partial):
                continue
            # S3 has no empty "directories"; one left behind by a racing put/delete is not a prefix.
            if next(self._walk(key, sort_key, None), None) is not None:
                yield sort_key

    # -- deleting --------------------------------------------------------------
    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as exc:
            raise StorageError(f"file store: cannot delete {key}: {exc}") from exc
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or gone): stop pruning
            parent = parent.parent

    # -- direct access -----------------------------------------------------------
    def presign_get(self, key: str, ttl: timedelta) -> str | None:
        validate_key(key)
        return None

    def presign_put(self, key: str, ttl: timedelta) -> str | None:
        validate_key(key)
        return None

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def writable_path(self, key: str) -> Path | None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
