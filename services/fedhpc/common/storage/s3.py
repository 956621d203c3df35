"""Any S3-compatible store (AWS S3, MinIO, SeaweedFS, Ceph RGW) through the ``minio`` client.

Retries: urllib3 is told not to retry (one policy in one place); every operation
here is retried with exponential backoff and jitter, up to ``max_retries`` times,
on transient failures only (connection and timeout errors, 5xx, SlowDown...),
never on NoSuchKey, AccessDenied and the like. An upload is only retried when
its input can be replayed: bytes held in memory (every object of at most one
part), or a seekable file object; a multipart upload from a one-shot iterator
fails on the first error that outlives the request, and minio aborts it. A
download that breaks mid-stream resumes from the last byte it yielded, pinned
to the same object version with If-Match.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import http.client
import io
import logging
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any, BinaryIO, ClassVar, TypeVar, cast

import certifi
import minio
import urllib3
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from fedhpc.common.config import S3StoreConfig
from fedhpc.common.storage import sigv4
from fedhpc.common.storage.base import (
    DEFAULT_CHUNK_BYTES,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    PresignedPut,
    StorageError,
    validate_key,
    validate_prefix,
)
from fedhpc.common.storage.file import check_range

log = logging.getLogger(__name__)

T = TypeVar("T")
CHECKSUM_HEADER = "x-amz-checksum-sha256"
# Where the checksum-enforcement probe writes (and at once deletes) its tiny object.
PROBE_PREFIX = "_fedhpc/probe/"

TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "OperationAborted",
        "XMinioServerNotInitialized",
    }
)
TRANSIENT_HTTP_STATUS = frozenset({429, 500, 502, 503, 504})
NOT_FOUND_S3_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"})
_TRANSIENT_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.TimeoutError,  # connect/read timeouts, refused/unreachable (NewConnectionError)
    urllib3.exceptions.ProtocolError,  # connection reset/aborted, truncated body
    urllib3.exceptions.IncompleteRead,
    urllib3.exceptions.ProxyError,
    http.client.IncompleteRead,
    ConnectionError,
    TimeoutError,
)
MIN_PRESIGN_TTL = timedelta(seconds=1)
MAX_PRESIGN_TTL = timedelta(days=7)  # the SigV4 limit
_WRAPPED_ERRORS = (
    MinioException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
    ValueError,
)


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", None)
        return status if isinstance(status, int) else None
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        # minio keeps the status only in a private attribute; a proxy's HTML 502 lands here.
        code = getattr(exc, "_code", None)
        return code if isinstance(code, int) else None
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request may succeed (network trouble, overload, 5xx)."""
    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT_S3_CODES or _status_of(exc) in TRANSIENT_HTTP_STATUS
    if isinstance(exc, ServerError | InvalidResponseError):
        return _status_of(exc) in TRANSIENT_HTTP_STATUS
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        return exc.reason is None or is_transient(exc.reason)
    if isinstance(exc, urllib3.exceptions.SSLError):
        return False  # a certificate problem does not heal by retrying
    return isinstance(exc, _TRANSIENT_NETWORK_ERRORS)


def is_not_found(exc: BaseException) -> bool:
    if isinstance(exc, S3Error):
        return exc.code in NOT_FOUND_S3_CODES
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}" if exc.message else str(exc.code)
    if isinstance(exc, ServerError | InvalidResponseError):
        return f"HTTP {_status_of(exc)}: {exc}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return _describe(exc.reason)
    return f"{type(exc).__name__}: {exc}"


class _SourceFailed(Exception):
    """The caller's input stream raised; carries its exception through minio untouched."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


class _StreamReader:
    """A read(n) file interface over put_stream's input, for minio's put_object.

    Holds at most the caller's current chunk plus one pushed-back part, never the
    whole object; checks the byte count against the declared size.
    """

    def __init__(self, chunks: Iterable[bytes] | BinaryIO, key: str, size: int | None) -> None:
        read = getattr(chunks, "read", None)
        self._read_file: Callable[[int], bytes] | None = read if callable(read) else None
        self._chunks: Iterator[bytes] | None = None if self._read_file else iter(chunks)
        self._key = key
        self._size = size
        # memoryviews: taking a part off a large chunk must not copy the rest of the chunk.
        self._pending: deque[memoryview] = deque()
        self._eof = False
        self.total = 0

    def _next_block(self, want: int) -> bytes | None:
        try:
            if self._read_file is not None:
                block: bytes | None = self._read_file(want)
            else:
                assert self._chunks is not None
                block = next(self._chunks, None)
                while block is not None and len(block) == 0:
                    block = next(self._chunks, None)
        except Exception as exc:
            raise _SourceFailed(exc) from exc
        if not block:
            return None
        if not isinstance(block, bytes | bytearray | memoryview):
            raise TypeError(f"put_stream chunks must be bytes, not {type(block).__name__}")
        return block if isinstance(block, bytes) else bytes(block)

    def at_eof(self) -> bool:
        if self._pending:
            return False
        if self._eof:
            return True
        block = self._next_block(DEFAULT_CHUNK_BYTES)
        if block is None:
            self._eof = True
            return True
        self._pending.append(memoryview(block))
        return False

    def pushback(self, data: bytes) -> None:
        if data:
            self._pending.appendleft(memoryview(data))
            self.total -= len(data)

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            raise ValueError("read() needs a size: the object is never read whole")
        parts: list[memoryview] = []
        got = 0
        while got < n:
            if self._pending:
                block = self._pending.popleft()
            elif self._eof:
                break
            else:
                fetched = self._next_block(n - got)
                if fetched is None:
                    self._eof = True
                    break
                block = memoryview(fetched)
            take = n - got
            if len(block) > take:
                self._pending.appendleft(block[take:])
                block = block[:take]
            parts.append(block)
            got += len(block)
        data = b"".join(parts)
        self.total += len(data)
        self._check_size(len(data) < n)
        return data

    def _check_size(self, short_read: bool) -> None:
        if self._size is None:
            return
        if self.total > self._size or (self.total == self._size and not self.at_eof()):
            raise StorageError(f"s3: stream for {self._key} is longer than its declared size {self._size}")
        if short_read and self.total < self._size:
            raise StorageError(f"s3: stream for {self._key} ended after {self.total} of {self._size} bytes")


class S3ObjectStore(ObjectStore):
    """Objects in one bucket of an S3-compatible service.

    Creates the bucket at construction when ``create_bucket`` is set (a network
    call; StorageError when the service cannot be reached). Thread-safe.
    """

    kind: ClassVar[str] = "s3"

    def __init__(
        self,
        config: S3StoreConfig,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        backoff_base: float = 0.2,
        backoff_max: float = 10.0,
        parallel_uploads: int = 1,
        max_pool_connections: int = 32,
    ) -> None:
        self.config = config
        self.bucket = config.bucket
        self.part_size = config.part_size_mb << 20
        self.max_retries = config.max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        # minio's parallel upload pool leaks its threads when an upload fails, so the
        # default uploads parts one by one on the calling thread.
        self.parallel_uploads = parallel_uploads
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=max_pool_connections,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=False,
        )
        secret = config.secret_key.get_secret_value()
        self._client = minio.Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=secret,
            secure=config.secure,
            region=config.region,
            http_client=self._http,
        )
        self._presigner: minio.Minio | None = None if config.public_endpoint else self._client
        self._presigner_lock = threading.Lock()
        self._checksums_enforced: bool | None = None
        if config.create_bucket:
            self._retry("create bucket", None, self._ensure_bucket)

    def __repr__(self) -> str:
        scheme = "https" if self.config.secure else "http"
        return f"S3ObjectStore({scheme}://{self.config.endpoint}/{self.bucket})"

    def _ensure_bucket(self) -> None:
        if self._client.bucket_exists(self.bucket):
            return
        try:
            self._client.make_bucket(self.bucket, location=self.config.region)
        except S3Error as exc:
            # Another process created it between the check and the create.
            if exc.code != "BucketAlreadyOwnedByYou":
                raise

    # -- retries and errors --------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_max, self.backoff_base * (2.0**attempt))
        # "Equal jitter": never less than half the delay, spread so clients that failed
        # together do not retry together.
        return delay / 2 + random.uniform(0, delay / 2)

    def _error(
        self, op: str, key: str | None, exc: BaseException, attempts: int, note: str = ""
    ) -> StorageError:
        if key is not None and is_not_found(exc):
            return ObjectNotFound(key)
        where = f"{self.bucket}/{key}" if key is not None else self.bucket
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        return StorageError(
            f"s3 {op} {where} at {self.config.endpoint} failed{tries}: {_describe(exc)}{note}"
        )

    def _retry(
        self, op: str, key: str | None, fn: Callable[[], T], *, rewind: Callable[[], bool] | None = None
    ) -> T:
        """fn() with retries on transient errors; rewind() prepares a retry and says whether one is possible."""
        attempt = 0
        while True:
            try:
                return fn()
            except _SourceFailed as exc:
                raise exc.original from None
            except StorageError:
                raise
            except _WRAPPED_ERRORS as exc:
                if not is_transient(exc) or attempt >= self.max_retries:
                    raise self._error(op, key, exc, attempt + 1) from exc
                if rewind is not None and not rewind():
                    note = "; not retried: the input stream was partly sent and cannot be rewound"
                    raise self._error(op, key, exc, attempt + 1, note) from exc
                delay = self._backoff(attempt)
                log.warning(
                    "s3 %s %s/%s: %s; retry %d/%d in %.2f s",
                    op,
                    self.bucket,
                    key or "",
                    _describe(exc),
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
                attempt += 1

    # -- writing ---------------------------------------------------------------
    def put_stream(self, key: str, chunks: Iterable[bytes] | BinaryIO, size: int | None = None) -> ObjectInfo:
        validate_key(key)
        if size is not None and size < 0:
            raise ValueError(f"size must be >= 0 or None, not {size}")
        if isinstance(chunks, bytes | bytearray | memoryview):
            raise TypeError(
                "put_stream takes an iterable of byte chunks or a binary file; use put_bytes for bytes"
            )
        seekable = _seek_position(chunks)
        reader = _StreamReader(chunks, key, size)
        if size is None or size <= self.part_size:
            # Up to one part is read into memory first: an object that fits is sent with a
            # single PUT that can be retried whatever the input was.
            try:
                head = reader.read(self.part_size if size is None else size)
                fits = size is not None or reader.at_eof()
            except _SourceFailed as exc:
                raise exc.original from None
            if fits:
                return self._put_small(key, head)
            reader.pushback(head)
            del head

        state = {"reader": reader}

        def upload() -> ObjectInfo:
            r = state["reader"]
            result = self._client.put_object(
                self.bucket,
                key,
                cast(BinaryIO, r),
                size if size is not None else -1,
                part_size=self.part_size,
                num_parallel_uploads=self.parallel_uploads,
            )
            return ObjectInfo(key=key, size=r.total, etag=result.etag or "")

        def rewind() -> bool:
            if seekable is None:
                return False
            file, position = seekable
            file.seek(position)
            state["reader"] = _StreamReader(file, key, size)
            return True

        return self._retry("put", key, upload, rewind=rewind)

    def _put_small(self, key: str, data: bytes) -> ObjectInfo:
        def upload() -> ObjectInfo:
            result = self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), part_size=self.part_size
            )
            return ObjectInfo(key=key, size=len(data), etag=result.etag or "")

        return self._retry("put", key, upload)

    # -- reading ---------------------------------------------------------------
    def iter_range(
        self, key: str, offset: int = 0, length: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[bytes]:
        validate_key(key)
        check_range(offset, length, chunk_bytes)
        return self._iter_range(key, offset, length, chunk_bytes)

    def _iter_range(self, key: str, offset: int, length: int | None, chunk_bytes: int) -> Iterator[bytes]:
        if length == 0:
            self.stat(key)  # still ObjectNotFound for a missing key
            return
        position = offset
        end = None if length is None else offset + length
        etag: str | None = None
        attempt = 0
        while end is None or position < end:
            response = self._open_range(key, position, end, etag)
            if response is None:
                return  # offset at or past the end of the object
            if etag is None:
                etag = response.headers.get("ETag")
            finished = False
            try:
                stream = response.stream(chunk_bytes, decode_content=False)
                while True:
                    try:
                        chunk = next(stream, None)
                    except _WRAPPED_ERRORS as exc:
                        if not is_transient(exc) or attempt >= self.max_retries:
                            raise self._error("get", key, exc, attempt + 1) from exc
                        delay = self._backoff(attempt)
                        log.warning(
                            "s3 get %s/%s broke at byte %d: %s; resuming in %.2f s",
                            self.bucket,
                            key,
                            position,
                            _describe(exc),
                            delay,
                        )
                        time.sleep(delay)
                        attempt += 1
                        break
                    if chunk is None:
                        finished = True
                        return
                    position += len(chunk)
                    yield chunk
            finally:
                if not finished:
                    # Unread body bytes would poison the pooled connection: drop it.
                    response.close()
                response.release_conn()

    def _open_range(self, key: str, position: int, end: int | None, etag: str | None) -> Any:
        headers: dict[str, str | builtins.list[str] | tuple[str]] | None = (
            {"If-Match": etag} if etag else None
        )

        def get() -> Any:
            try:
                return self._client.get_object(
                    self.bucket,
                    key,
                    offset=position,
                    length=0 if end is None else end - position,
                    request_headers=headers,
                )
            except S3Error as exc:
                if exc.code == "InvalidRange":
                    return None
                raise

        try:
            return self._retry("get", key, get)
        except StorageError as exc:
            if etag is not None and "PreconditionFailed" in str(exc):
                raise StorageError(
                    f"s3 get {self.bucket}/{key}: the object was replaced while being read"
                ) from exc
            raise

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        st = self._retry("stat", key, lambda: self._client.stat_object(self.bucket, key))
        return ObjectInfo(key=key, size=int(st.size or 0), etag=st.etag or "", last_modified=st.last_modified)

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Every object under prefix, in byte order of keys.

        The listing under prefix is fetched whole and sorted here: S3 promises key
        order, but filer-backed servers (SeaweedFS) list directory by directory,
        putting "a/x" before "a-b", and their start_after follows the same walk.
        Memory is O(objects under prefix).
        """
        validate_prefix(prefix)
        return self._list(prefix, start_after)

    def _list_all(self, prefix: str) -> builtins.list[ObjectInfo]:
        def fetch() -> builtins.list[ObjectInfo]:
            infos = [
                ObjectInfo(
                    key=obj.object_name or "",
                    size=int(obj.size or 0),
                    etag=obj.etag or "",
                    last_modified=obj.last_modified,
                )
                for obj in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
                if not obj.is_dir
            ]
            infos.sort(key=lambda info: info.key)
            return infos

        return self._retry("list", prefix or None, fetch)

    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        for info in self._list_all(prefix):
            if start_after is None or info.key > start_after:
                yield info

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        """Derived from the recursive listing: SeaweedFS keeps a "directory" after its last
        object is deleted and reports it as a common prefix; S3 would not."""
        validate_prefix(prefix)
        return self._list_prefixes(prefix)

    def _list_prefixes(self, prefix: str) -> Iterator[str]:
        base = prefix.rpartition("/")[0]
        base = f"{base}/" if base else ""
        seen: set[str] = set()
        for info in self._list_all(prefix):
            head, sep, _ = info.key[len(base) :].partition("/")
            if sep:
                seen.add(f"{base}{head}/")
        yield from sorted(seen)

    # -- deleting --------------------------------------------------------------
    def delete(self, key: str) -> None:
        validate_key(key)
        self._retry("delete", key, lambda: self._client.remove_object(self.bucket, key))

    def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix)
        count = 0
        batch: builtins.list[str] = []
        for info in self.list(prefix):
            batch.append(info.key)
            if len(batch) == 1000:  # the DeleteObjects limit
                count += self._delete_batch(batch)
                batch = []
        if batch:
            count += self._delete_batch(batch)
        return count

    def _delete_batch(self, keys: builtins.list[str]) -> int:
        def delete() -> int:
            # remove_objects is lazy: iterating the errors is what sends the request.
            errors = list(self._client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
            failed = [e for e in errors if e.code not in NOT_FOUND_S3_CODES]
            if failed:
                first = failed[0]
                raise StorageError(
                    f"s3 delete {self.bucket}/{first.name} failed: {first.code}: {first.message} "
                    f"({len(failed)} of {len(keys)} keys not deleted)"
                )
            return len(keys)

        return self._retry("delete", keys[0], delete)

    # -- direct access -----------------------------------------------------------
    def _get_presigner(self) -> minio.Minio:
        with self._presigner_lock:
            if self._presigner is None:
                public = self.config.public_endpoint
                assert public is not None
                secure = (
                    self.config.public_secure if self.config.public_secure is not None else self.config.secure
                )
                # Presigning needs the region; without one configured, the internal client looks
                # it up once (the public address may not be reachable from here).
                region = self.config.region or self._retry(
                    "get bucket region", None, lambda: str(self._client._get_region(self.bucket))
                )
                self._presigner = minio.Minio(
                    public,
                    access_key=self.config.access_key,
                    secret_key=self.config.secret_key.get_secret_value(),
                    secure=secure,
                    region=region,
                    http_client=self._http,
                )
            return self._presigner

    def _presign(self, method: str, key: str, ttl: timedelta) -> str:
        validate_key(key)
        if not MIN_PRESIGN_TTL <= ttl <= MAX_PRESIGN_TTL:
            raise ValueError(f"presigned URL lifetime must be between 1 s and 7 days, not {ttl}")
        presigner = self._get_presigner()
        return self._retry(
            f"presign {method}",
            key,
            lambda: str(presigner.get_presigned_url(method, self.bucket, key, expires=ttl)),
        )

    def presign_get(self, key: str, ttl: timedelta) -> str | None:
        return self._presign("GET", key, ttl)

    def _region(self) -> str:
        return self.config.region or self._retry(
            "get bucket region", None, lambda: str(self._client._get_region(self.bucket))
        )

    def _checked_put(self, key: str, ttl: timedelta, sha256_hex: str, *, public: bool) -> PresignedPut:
        validate_key(key)
        if not MIN_PRESIGN_TTL <= ttl <= MAX_PRESIGN_TTL:
            raise ValueError(f"presigned URL lifetime must be between 1 s and 7 days, not {ttl}")
        try:
            digest = bytes.fromhex(sha256_hex)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError(f"sha256 must be 64 hex digits, not {sha256_hex!r}")
        headers = {CHECKSUM_HEADER: base64.b64encode(digest).decode()}
        endpoint, secure = self.config.endpoint, self.config.secure
        if public and self.config.public_endpoint:
            endpoint = self.config.public_endpoint
            secure = (
                self.config.public_secure if self.config.public_secure is not None else self.config.secure
            )
        url = sigv4.presign_url(
            method="PUT",
            host=endpoint,
            secure=secure,
            bucket=self.bucket,
            key=key,
            region=self._region(),
            access_key=self.config.access_key,
            secret_key=self.config.secret_key.get_secret_value(),
            expires_seconds=int(ttl.total_seconds()),
            signed_headers=headers,
        )
        return PresignedPut(url=url, headers=headers)

    def enforces_checksums(self) -> bool:
        """Whether the service refuses a checksum-bound PUT whose body does not match.

        Probed once per store object (one tiny PUT that must be refused, one that
        must succeed), because an S3 implementation that ignored the header would
        otherwise let unverified bytes through.
        """
        with self._presigner_lock:
            if self._checksums_enforced is None:
                self._checksums_enforced = self._probe_checksum_enforcement()
            return self._checksums_enforced

    def _probe_checksum_enforcement(self) -> bool:
        key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        body = b"fedhpc checksum probe"
        presigned = self._checked_put(
            key, timedelta(minutes=1), hashlib.sha256(body).hexdigest(), public=False
        )
        try:
            wrong = self._http.request("PUT", presigned.url, body=body + b"!", headers=presigned.headers)
            right = self._http.request("PUT", presigned.url, body=body, headers=presigned.headers)
            return wrong.status // 100 == 4 and right.status // 100 == 2
        except urllib3.exceptions.HTTPError:
            return False
        finally:
            with contextlib.suppress(StorageError):
                self.delete(key)

    def presign_put_sha256(self, key: str, ttl: timedelta, sha256_hex: str) -> PresignedPut | None:
        if not self.enforces_checksums():
            return None
        return self._checked_put(key, ttl, sha256_hex, public=True)

    def presign_put(self, key: str, ttl: timedelta) -> str | None:
        return self._presign("PUT", key, ttl)

    def close(self) -> None:
        self._http.clear()


def _seek_position(chunks: object) -> tuple[BinaryIO, int] | None:
    """(file, position) when chunks is a file object put_stream can rewind for a retry."""
    seekable = getattr(chunks, "seekable", None)
    if not callable(getattr(chunks, "read", None)) or not callable(seekable):
        return None
    try:
        if not seekable():
            return None
        file: BinaryIO = chunks  # type: ignore[assignment]
        return file, file.tell()
    except (OSError, ValueError):
        return None
