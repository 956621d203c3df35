"""The ObjectStore contract, run against every backend (``object_store`` is file, then real S3).

Backend-specific tests (S3 retries, presigned URLs, the file layout) follow the contract.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from minio.error import S3Error, ServerError

from fedhpc.common.config import FileStoreConfig, S3StoreConfig
from fedhpc.common.storage import (
    FileObjectStore,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    S3ObjectStore,
    StorageError,
    make_store,
)
from fedhpc.common.storage.s3 import is_transient
from fedhpc.testing.ports import free_port
from fedhpc.testing.s3server import SeaweedS3Server

MIB = 1 << 20
# Larger than the default 16 MiB part, so S3 takes the multipart path.
MULTIPART_BYTES = 20 * MIB + 12345
TTL = timedelta(minutes=5)
# Loopback requests must not go to an http_proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def pattern(n: int, seed: int = 0) -> bytes:
    """n deterministic, non-repeating-per-MiB bytes (cheaper than os.urandom for 20 MiB, and reproducible)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MIB // 32)
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8] + block[8:]
        i += 1
    return bytes(out[:n])


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def sha(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def http(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _HTTP.open(request, timeout=30) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- writing and reading ------------------------------------------------------------


def test_put_get_bytes_roundtrip(object_store: ObjectStore) -> None:
    info = object_store.put_bytes("models/exp1/v1/manifest.json", b'{"a": 1}')
    assert info.key == "models/exp1/v1/manifest.json"
    assert info.size == 8
    assert info.etag
    assert object_store.get_bytes("models/exp1/v1/manifest.json") == b'{"a": 1}'
    assert object_store.stat("models/exp1/v1/manifest.json").etag == info.etag


def test_empty_object(object_store: ObjectStore) -> None:
    object_store.put_bytes("empty", b"")
    assert object_store.get_bytes("empty") == b""
    assert object_store.stat("empty").size == 0
    assert object_store.read_range("empty", 0, 10) == b""


def test_put_stream_iterable_of_unknown_size_larger_than_a_part(object_store: ObjectStore) -> None:
    data = pattern(MULTIPART_BYTES)
    # Odd chunk sizes, so part boundaries never line up with chunk boundaries.
    info = object_store.put_stream("big/weights.bin", chunked(data, 3 * MIB + 7), size=None)
    assert info.size == len(data)
    assert object_store.stat("big/weights.bin").size == len(data)
    assert object_store.stat("big/weights.bin").etag == info.etag
    assert sha(object_store.iter_range("big/weights.bin")) == hashlib.sha256(data).hexdigest()
    if object_store.kind == "s3":
        assert info.etag.endswith("-2"), "expected a two-part multipart upload"


def test_put_stream_iterable_with_known_size(object_store: ObjectStore) -> None:
    data = pattern(MULTIPART_BYTES, seed=1)
    info = object_store.put_stream("big/known.bin", chunked(data, MIB), size=len(data))
    assert info.size == len(data)
    assert sha(object_store.iter_range("big/known.bin")) == hashlib.sha256(data).hexdigest()


def test_put_stream_small_iterable_of_unknown_size(object_store: ObjectStore) -> None:
    object_store.put_stream("small", iter([b"ab", b"", b"cd", b"e"]))
    assert object_store.get_bytes("small") == b"abcde"


def test_put_stream_from_file_object(object_store: ObjectStore, tmp_path: Path) -> None:
    data = pattern(MULTIPART_BYTES, seed=2)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    with open(src, "rb") as f:
        info = object_store.put_stream("from-file/known", f, size=len(data))
    assert info.size == len(data)
    with open(src, "rb") as f:
        object_store.put_stream("from-file/unknown", f)
    for key in ("from-file/known", "from-file/unknown"):
        assert sha(object_store.iter_range(key)) == hashlib.sha256(data).hexdigest()
    object_store.put_stream("from-file/bytesio", io.BytesIO(b"in memory"))
    assert object_store.get_bytes("from-file/bytesio") == b"in memory"


def test_put_stream_rejects_bytes(object_store: ObjectStore) -> None:
    with pytest.raises(TypeError, match="put_bytes"):
        object_store.put_stream("k", b"not an iterable of chunks")  # type: ignore[arg-type]
    assert not object_store.exists("k")


@pytest.mark.parametrize("actual", [5, 15])
def test_put_stream_size_mismatch_stores_nothing(object_store: ObjectStore, actual: int) -> None:
    with pytest.raises(StorageError, match=r"size|bytes"):
        object_store.put_stream("sized", iter([b"x" * actual]), size=10)
    assert not object_store.exists("sized")


def test_put_file_get_file(object_store: ObjectStore, tmp_path: Path) -> None:
    data = pattern(3 * MIB + 1, seed=3)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    info = object_store.put_file("files/in.bin", src)
    assert info.size == len(data)
    dst = tmp_path / "out" / "deep" / "out.bin"
    got = object_store.get_file("files/in.bin", dst)
    assert dst.read_bytes() == data
    assert got.size == len(data)
    assert [p.name for p in dst.parent.iterdir()] == ["out.bin"], "no temporary file left behind"


def test_ranged_reads(object_store: ObjectStore) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    object_store.put_bytes("r", data)
    assert b"".join(object_store.iter_range("r", 10, 100)) == data[10:110]
    assert b"".join(object_store.iter_range("r", 10)) == data[10:]
    assert b"".join(object_store.iter_range("r", length=5)) == data[:5]
    assert object_store.read_range("r", 0, len(data)) == data
    assert object_store.read_range("r", 5000, 1) == data[5000:5001]
    # At and past the end: whatever is left, then nothing.
    assert object_store.read_range("r", len(data) - 10, 100) == data[-10:]
    assert object_store.read_range("r", len(data), 10) == b""
    assert object_store.read_range("r", len(data) + 100, 10) == b""
    assert object_store.read_range("r", 7, 0) == b""


def test_iter_range_chunks_are_bounded(object_store: ObjectStore) -> None:
    data = pattern(100_003, seed=4)
    object_store.put_bytes("chunks", data)
    chunks = list(object_store.iter_range("chunks", chunk_bytes=4096))
    assert all(0 < len(c) <= 4096 for c in chunks)
    assert b"".join(chunks) == data
    ranged = list(object_store.iter_range("chunks", 1000, 50_000, chunk_bytes=999))
    assert all(0 < len(c) <= 999 for c in ranged)
    assert b"".join(ranged) == data[1000:51_000]


def test_iter_range_argument_checks(object_store: ObjectStore) -> None:
    object_store.put_bytes("k", b"x")
    for kwargs in ({"offset": -1}, {"length": -1}, {"chunk_bytes": 0}):
        with pytest.raises(ValueError):
            list(object_store.iter_range("k", **kwargs))


def test_iter_range_stopped_early_releases_the_object(object_store: ObjectStore) -> None:
    object_store.put_bytes("early", pattern(MIB))
    it = object_store.iter_range("early", chunk_bytes=1024)
    assert len(next(it)) == 1024
    it.close()  # type: ignore[attr-defined]
    # The store still works normally afterwards (connection returned or dropped cleanly).
    for _ in range(3):
        assert object_store.read_range("early", 0, 4) == pattern(MIB)[:4]


def test_stat(object_store: ObjectStore) -> None:
    before = time.time()
    object_store.put_bytes("s/one", b"12345")
    info = object_store.stat("s/one")
    assert (info.key, info.size) == ("s/one", 5)
    assert isinstance(info.etag, str) and info.etag
    assert isinstance(info.last_modified, datetime)
    assert info.last_modified.tzinfo is not None
    assert info.last_modified.timestamp() > before - 5


def test_exists(object_store: ObjectStore) -> None:
    assert not object_store.exists("e/x")
    object_store.put_bytes("e/x", b"1")
    assert object_store.exists("e/x")
    assert not object_store.exists("e"), "a prefix is not an object"


def test_missing_key_raises_object_not_found(object_store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound) as caught:
        object_store.stat("no/such/key")
    assert caught.value.key == "no/such/key"
    assert isinstance(caught.value, KeyError)
    with pytest.raises(ObjectNotFound):
        object_store.get_bytes("no/such/key")
    with pytest.raises(ObjectNotFound):
        next(object_store.iter_range("no/such/key"))
    with pytest.raises(ObjectNotFound):
        object_store.read_range("no/such/key", 0, 0)
    with pytest.raises(ObjectNotFound):
        object_store.get_file("no/such/key", tmp_path / "dl" / "never-written")
    assert list((tmp_path / "dl").iterdir()) == [], "no partial download left behind"


def test_overwrite_replaces(object_store: ObjectStore) -> None:
    first = object_store.put_bytes("o", b"first version")
    second = object_store.put_bytes("o", b"second, longer version")
    assert object_store.get_bytes("o") == b"second, longer version"
    assert object_store.stat("o").size == len(b"second, longer version")
    assert first.etag != second.etag
    assert [i.key for i in object_store.list("o")] == ["o"]


def test_concurrent_writers_leave_one_complete_version(object_store: ObjectStore) -> None:
    versions = [bytes([65 + i]) * (2 * MIB) for i in range(4)]
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        try:
            object_store.put_stream("race", chunked(data, 256 * 1024))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert object_store.get_bytes("race") in versions


# -- listing ---------------------------------------------------------------------------

# Chosen to break a naive directory walk: '-' < '.' < '/' < letters in byte order.
LIST_KEYS = ["a-b", "a.b", "a/x", "a/y/z", "a0", "ab", "b/c/d", "b/c/e", "c"]


def _put_all(store: ObjectStore, keys: list[str]) -> None:
    for key in keys:
        store.put_bytes(key, key.encode())


def test_list_is_in_key_order(object_store: ObjectStore) -> None:
    _put_all(object_store, list(reversed(LIST_KEYS)))
    infos = list(object_store.list())
    assert [i.key for i in infos] == sorted(LIST_KEYS)
    assert [i.size for i in infos] == [len(k) for k in sorted(LIST_KEYS)]
    assert all(i.etag for i in infos)


def test_list_prefix(object_store: ObjectStore) -> None:
    _put_all(object_store, LIST_KEYS)
    assert [i.key for i in object_store.list("a/")] == ["a/x", "a/y/z"]
    assert [i.key for i in object_store.list("a")] == ["a-b", "a.b", "a/x", "a/y/z", "a0", "ab"]
    assert [i.key for i in object_store.list("b/c/")] == ["b/c/d", "b/c/e"]
    assert [i.key for i in object_store.list("b/c/d")] == ["b/c/d"]
    assert [i.key for i in object_store.list("a/y")] == ["a/y/z"]
    assert list(object_store.list("nothing/")) == []


def test_list_start_after(object_store: ObjectStore) -> None:
    _put_all(object_store, LIST_KEYS)
    ordered = sorted(LIST_KEYS)
    for after in ["a-b", "a.b", "a/", "a/x", "a/y/z", "a1", "b", "c", "0", "zzz"]:
        expected = [k for k in ordered if k > after]
        assert [i.key for i in object_store.list(start_after=after)] == expected, after
    assert [i.key for i in object_store.list("a/", start_after="a/x")] == ["a/y/z"]


def test_list_prefixes(object_store: ObjectStore) -> None:
    _put_all(object_store, ["m/e1/v1/w", "m/e1/v2/w", "m/e2/v1/w", "m/top.json", "n.json"])
    assert list(object_store.list_prefixes()) == ["m/"]
    assert list(object_store.list_prefixes("m/")) == ["m/e1/", "m/e2/"]
    assert list(object_store.list_prefixes("m/e1/")) == ["m/e1/v1/", "m/e1/v2/"]
    assert list(object_store.list_prefixes("m/e")) == ["m/e1/", "m/e2/"]
    assert list(object_store.list_prefixes("m/e1/v1/")) == []
    assert list(object_store.list_prefixes("none/")) == []


def test_list_rejects_invalid_prefix(object_store: ObjectStore) -> None:
    with pytest.raises(InvalidKey):
        list(object_store.list("../"))
    with pytest.raises(InvalidKey):
        list(object_store.list_prefixes("/abs/"))


# -- deleting ----------------------------------------------------------------------------


def test_delete_is_idempotent(object_store: ObjectStore) -> None:
    object_store.put_bytes("d/x/y", b"1")
    object_store.put_bytes("d/keep", b"2")
    object_store.delete("d/x/y")
    object_store.delete("d/x/y")
    object_store.delete("never/existed")
    object_store.delete("d")  # a prefix, not an object: nothing happens
    assert not object_store.exists("d/x/y")
    assert object_store.get_bytes("d/keep") == b"2"
    assert list(object_store.list_prefixes("d/")) == []


def test_delete_prefix(object_store: ObjectStore) -> None:
    _put_all(object_store, ["p/1", "p/2/a", "p/2/b", "pq", "q/1"])
    assert object_store.delete_prefix("p/") == 3
    assert [i.key for i in object_store.list()] == ["pq", "q/1"]
    assert object_store.delete_prefix("p/") == 0


# -- keys ----------------------------------------------------------------------------------

BAD_KEYS = ["../x", "/abs", "a//b", "", "a/../b", "a/", "./a", "sp ace", "back\\slash", "a/b?c"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_rejected(object_store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        object_store.put_bytes(key, b"x")
    with pytest.raises(InvalidKey):
        object_store.put_stream(key, iter([b"x"]))
    with pytest.raises(InvalidKey):
        object_store.get_bytes(key)
    with pytest.raises(InvalidKey):
        object_store.iter_range(key)
    with pytest.raises(InvalidKey):
        object_store.stat(key)
    with pytest.raises(InvalidKey):
        object_store.exists(key)
    with pytest.raises(InvalidKey):
        object_store.delete(key)
    with pytest.raises(InvalidKey):
        object_store.presign_get(key, TTL)
    assert list(object_store.list()) == []


def test_keys_with_unusual_allowed_characters(object_store: ObjectStore) -> None:
    keys = ["x/a=b+c@d,e:f", "x/.hidden", "x/UPPER_lower-9"]
    _put_all(object_store, keys)
    assert [i.key for i in object_store.list("x/")] == sorted(keys)
    for key in keys:
        assert object_store.get_bytes(key) == key.encode()
        url = object_store.presign_get(key, TTL)
        if url is not None:
            assert http("GET", url) == (200, key.encode())


# -- no partial objects ------------------------------------------------------------------------


class SourceBroke(RuntimeError):
    pass


def _breaking(data: bytes, chunk: int, after: int) -> Iterator[bytes]:
    sent = 0
    for piece in chunked(data, chunk):
        if sent >= after:
            raise SourceBroke("the producer died")
        sent += len(piece)
        yield piece


@pytest.mark.parametrize("total", [MIB, MULTIPART_BYTES], ids=["single-part", "multipart"])
def test_failed_stream_leaves_no_object(object_store: ObjectStore, total: int) -> None:
    data = pattern(total, seed=5)
    with pytest.raises(SourceBroke):
        object_store.put_stream("partial/x", _breaking(data, 256 * 1024, after=total - MIB // 2))
    assert not object_store.exists("partial/x")
    assert list(object_store.list()) == []


def test_failed_stream_keeps_the_previous_version(object_store: ObjectStore) -> None:
    object_store.put_bytes("partial/y", b"old")
    with pytest.raises(SourceBroke):
        object_store.put_stream("partial/y", _breaking(pattern(2 * MIB), 256 * 1024, after=MIB))
    assert object_store.get_bytes("partial/y") == b"old"


# -- presigned URLs ------------------------------------------------------------------------------


def test_presign(object_store: ObjectStore) -> None:
    object_store.put_bytes("pre/a", b"secret a")
    object_store.put_bytes("pre/b", b"secret b")
    get_url = object_store.presign_get("pre/a", TTL)
    put_url = object_store.presign_put("pre/up", TTL)
    if object_store.kind == "file":
        assert get_url is None and put_url is None
        return
    assert get_url is not None and put_url is not None
    assert http("GET", get_url) == (200, b"secret a")
    status, _ = http("PUT", put_url, b"uploaded with a presigned URL")
    assert status == 200
    assert object_store.get_bytes("pre/up") == b"uploaded with a presigned URL"
    # The signature covers the path: the URL for pre/a must not read pre/b, nor write elsewhere.
    assert http("GET", get_url.replace("/pre/a?", "/pre/b?"))[0] == 403
    assert http("PUT", put_url.replace("/pre/up?", "/pre/other?"), b"x")[0] == 403
    assert not object_store.exists("pre/other")
    # Nor can the method be swapped.
    assert http("PUT", get_url, b"x")[0] == 403
    assert object_store.get_bytes("pre/a") == b"secret a"


def test_presigned_put_bound_to_a_sha256_is_enforced_by_the_store(object_store: ObjectStore) -> None:
    body = b"exactly these bytes"
    sha = hashlib.sha256(body).hexdigest()
    bound = object_store.presign_put_sha256("pre/checked", TTL, sha)
    if object_store.kind == "file":
        assert bound is None
        return
    assert bound is not None and set(bound.headers) == {"x-amz-checksum-sha256"}
    # Other bytes are refused by the store and leave nothing behind.
    status, _ = http("PUT", bound.url, b"other bytes, same length", headers=bound.headers)
    assert status == 400
    assert not object_store.exists("pre/checked")
    # Leaving out the signed header breaks the signature.
    assert http("PUT", bound.url, body)[0] == 403
    assert http("PUT", bound.url, body, headers=bound.headers)[0] == 200
    assert object_store.get_bytes("pre/checked") == body
    with pytest.raises(ValueError, match="64 hex digits"):
        object_store.presign_put_sha256("pre/checked", TTL, "abc")


def test_presign_ttl_bounds(object_store: ObjectStore) -> None:
    if object_store.kind == "file":
        assert object_store.presign_get("k", timedelta(days=30)) is None
        return
    with pytest.raises(ValueError):
        object_store.presign_get("k", timedelta(days=8))
    with pytest.raises(ValueError):
        object_store.presign_put("k", timedelta(0))


# -- factory -----------------------------------------------------------------------------------


def test_make_store_file(tmp_path: Path) -> None:
    store = make_store(FileStoreConfig(root=tmp_path / "made"))
    assert isinstance(store, FileObjectStore) and store.kind == "file"
    store.put_bytes("k", b"v")
    assert (tmp_path / "made" / "k").read_bytes() == b"v"


@pytest.mark.s3
def test_make_store_s3(s3_store_config: S3StoreConfig) -> None:
    with make_store(s3_store_config) as store:
        assert isinstance(store, S3ObjectStore) and store.kind == "s3"
        store.put_bytes("k", b"v")
        assert store.get_bytes("k") == b"v"


# -- file backend specifics ------------------------------------------------------------------------


def test_file_layout_and_cleanup(file_store: FileObjectStore) -> None:
    file_store.put_bytes("a/b/c", b"1")
    assert (file_store.root / "a" / "b" / "c").read_bytes() == b"1"
    assert file_store.local_path("a/b/c") == file_store.root / "a" / "b" / "c"
    assert file_store.local_path("a/b") is None
    assert file_store.local_path("missing") is None
    with pytest.raises(SourceBroke):
        file_store.put_stream("a/b/d", _breaking(pattern(MIB), 1024, after=4096))
    assert sorted(p.name for p in (file_store.root / "a" / "b").iterdir()) == ["c"], "temp file removed"
    file_store.delete("a/b/c")
    assert list(file_store.root.iterdir()) == [], "empty directories pruned up to the root"
    assert file_store.root.is_dir()


def test_file_store_ignores_temp_and_stray_files(file_store: FileObjectStore) -> None:
    file_store.put_bytes("d/real", b"1")
    (file_store.root / "d" / ".real.tmp~0123").write_bytes(b"in flight")
    (file_store.root / "d" / "not a key").write_bytes(b"stray")
    assert [i.key for i in file_store.list()] == ["d/real"]


def test_file_store_cannot_hold_key_and_prefix(file_store: FileObjectStore) -> None:
    file_store.put_bytes("a", b"1")
    with pytest.raises(StorageError, match="parent"):
        file_store.put_bytes("a/b", b"2")
    file_store.put_bytes("x/y", b"1")
    with pytest.raises(StorageError):
        file_store.put_bytes("x", b"2")
    assert [i.key for i in file_store.list()] == ["a", "x/y"]


_segment = st.text(alphabet="ab-._", min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keys=st.lists(
        st.lists(_segment, min_size=1, max_size=3).map("/".join), min_size=1, max_size=12, unique=True
    ),
    prefix_len=st.integers(min_value=0, max_value=4),
)
def test_file_list_order_matches_sorted_keys(keys: list[str], prefix_len: int) -> None:
    keys = [k for k in keys if all(seg not in (".", "..") for seg in k.split("/"))]
    # A file and a directory cannot share a name; keep the first of any conflicting pair.
    kept: list[str] = []
    for key in keys:
        if not any(o.startswith(key + "/") or key.startswith(o + "/") for o in kept):
            kept.append(key)
    with tempfile.TemporaryDirectory() as root:
        store = FileObjectStore(Path(root), fsync=False)
        _put_all(store, kept)
        assert [i.key for i in store.list()] == sorted(kept)
        if kept:
            prefix = sorted(kept)[0][:prefix_len]
            if prefix and not prefix.startswith("/") and "//" not in prefix:
                try:
                    listed = [i.key for i in store.list(prefix)]
                except InvalidKey:
                    return
                assert listed == sorted(k for k in kept if k.startswith(prefix))


# -- S3 specifics ------------------------------------------------------------------------------------


def _s3_error(code: str, status: int) -> S3Error:
    response = urllib3.HTTPResponse(body=b"", status=status)
    return S3Error(response, code, "message", "/bucket/key", "req", "host")


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_s3_error("InternalError", 500), True),
        (_s3_error("SlowDown", 503), True),
        (_s3_error("ServiceUnavailable", 503), True),
        (_s3_error("RequestTimeout", 400), True),
        (_s3_error("SomethingNew", 502), True),
        (_s3_error("NoSuchKey", 404), False),
        (_s3_error("NoSuchBucket", 404), False),
        (_s3_error("AccessDenied", 403), False),
        (_s3_error("SignatureDoesNotMatch", 403), False),
        (_s3_error("NotImplemented", 501), False),
        (ServerError("server failed with HTTP status code 503", 503), True),
        (ServerError("server failed with HTTP status code 501", 501), False),
        (urllib3.exceptions.NewConnectionError(None, "refused"), True),  # type: ignore[arg-type]
        (urllib3.exceptions.ReadTimeoutError(None, "/", "timed out"), True),  # type: ignore[arg-type]
        (urllib3.exceptions.ProtocolError("Connection aborted", ConnectionResetError()), True),
        (urllib3.exceptions.MaxRetryError(None, "/", urllib3.exceptions.ConnectTimeoutError()), True),  # type: ignore[arg-type]
        (urllib3.exceptions.MaxRetryError(None, "/", urllib3.exceptions.SSLError("bad cert")), False),  # type: ignore[arg-type]
        (urllib3.exceptions.SSLError("bad cert"), False),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (ValueError("bad argument"), False),
        (PermissionError(), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_retry_classification(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_unreachable_endpoint_fails_after_retries() -> None:
    config = S3StoreConfig(
        endpoint=f"127.0.0.1:{free_port()}",  # nothing listens there
        bucket="nowhere",
        access_key="key",
        secret_key="secret",  # type: ignore[arg-type]
        region="us-east-1",
        max_retries=2,
        create_bucket=False,
    )
    store = S3ObjectStore(config, connect_timeout=2, backoff_base=0.05)
    started = time.monotonic()
    with pytest.raises(StorageError, match="after 3 attempts") as caught:
        store.stat("k")
    assert not isinstance(caught.value, ObjectNotFound)
    assert "nowhere/k" in str(caught.value)
    with pytest.raises(StorageError, match="after 3 attempts"):
        store.get_bytes("k")
    with pytest.raises(StorageError, match="after 3 attempts"):
        S3ObjectStore(config.model_copy(update={"create_bucket": True}), backoff_base=0.05)
    assert time.monotonic() - started < 10


class _Flaky:
    """Makes a minio client method fail with ``error`` for its first ``failures`` calls."""

    def __init__(self, store: S3ObjectStore, method: str, error: BaseException, failures: int) -> None:
        self.real = getattr(store._client, method)
        self.error = error
        self.failures = failures
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        if len(self.calls) <= self.failures:
            raise self.error
        return self.real(*args, **kwargs)


@pytest.mark.s3
def test_transient_errors_are_retried(s3_store: S3ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    s3_store.backoff_base = 0.01
    s3_store.put_bytes("k", b"value")
    flaky = _Flaky(s3_store, "stat_object", _s3_error("InternalError", 500), failures=2)
    monkeypatch.setattr(s3_store._client, "stat_object", flaky)
    assert s3_store.stat("k").size == 5
    assert len(flaky.calls) == 3

    denied = _Flaky(s3_store, "stat_object", _s3_error("AccessDenied", 403), failures=5)
    monkeypatch.setattr(s3_store._client, "stat_object", denied)
    with pytest.raises(StorageError, match="AccessDenied") as caught:
        s3_store.stat("k")
    assert len(denied.calls) == 1, "permanent errors are not retried"
    assert "k" in str(caught.value)

    forever = _Flaky(s3_store, "stat_object", _s3_error("SlowDown", 503), failures=100)
    monkeypatch.setattr(s3_store._client, "stat_object", forever)
    with pytest.raises(StorageError, match="SlowDown"):
        s3_store.stat("k")
    assert len(forever.calls) == s3_store.max_retries + 1


@pytest.mark.s3
def test_small_put_from_one_shot_iterator_is_retried(
    s3_store: S3ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_store.backoff_base = 0.01
    flaky = _Flaky(s3_store, "put_object", urllib3.exceptions.ProtocolError("reset"), failures=1)
    monkeypatch.setattr(s3_store._client, "put_object", flaky)
    s3_store.put_stream("small", iter([b"one ", b"shot"]))
    assert len(flaky.calls) == 2
    assert s3_store.get_bytes("small") == b"one shot"


@pytest.mark.s3
def test_multipart_retry_needs_a_seekable_input(
    s3_store_config: S3StoreConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = S3ObjectStore(s3_store_config.model_copy(update={"part_size_mb": 5}), backoff_base=0.01)
    data = pattern(11 * MIB, seed=6)

    def fail_after_reading(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            args[2].read(6 * MIB)  # the upload had consumed part of the input when it broke
            raise urllib3.exceptions.ProtocolError("connection reset mid-upload")
        return real(*args, **kwargs)

    real = store._client.put_object
    calls: list[int] = []
    monkeypatch.setattr(store._client, "put_object", fail_after_reading)
    with pytest.raises(StorageError, match="cannot be rewound"):
        store.put_stream("one-shot", chunked(data, MIB))
    assert len(calls) == 1
    assert not store.exists("one-shot")

    calls.clear()
    src = tmp_path / "src"
    src.write_bytes(b"header" + data)
    with open(src, "rb") as f:
        f.seek(6)  # put_stream rewinds to where the stream was handed over, not to byte 0
        store.put_stream("seekable", f)
    assert len(calls) == 2
    assert sha(store.iter_range("seekable")) == hashlib.sha256(data).hexdigest()
    store.close()


class _BreakingResponse:
    """A get_object response whose body breaks after the first chunk."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.headers = real.headers

    def stream(self, amt: int, decode_content: bool = True) -> Iterator[bytes]:
        inner = self.real.stream(amt, decode_content=decode_content)
        yield next(inner)
        raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")

    def close(self) -> None:
        self.real.close()

    def release_conn(self) -> None:
        self.real.release_conn()


@pytest.mark.s3
def test_download_resumes_where_it_broke(s3_store: S3ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    s3_store.backoff_base = 0.01
    data = pattern(300_000, seed=7)
    s3_store.put_bytes("resume", data)
    real = s3_store._client.get_object
    calls: list[dict[str, Any]] = []

    def get_object(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        response = real(*args, **kwargs)
        return _BreakingResponse(response) if len(calls) == 1 else response

    monkeypatch.setattr(s3_store._client, "get_object", get_object)
    assert b"".join(s3_store.iter_range("resume", 100, chunk_bytes=65536)) == data[100:]
    assert [c["offset"] for c in calls] == [100, 100 + 65536]
    assert calls[1]["request_headers"]["If-Match"], "the resumed read is pinned to the same version"

    # If the object changes between the two requests, the read fails instead of mixing versions.
    calls.clear()

    def get_object_then_overwrite(*args: Any, **kwargs: Any) -> Any:
        response = get_object(*args, **kwargs)
        if len(calls) == 1:
            s3_store.put_bytes("resume", b"new version")
        return response

    monkeypatch.setattr(s3_store._client, "get_object", get_object_then_overwrite)
    with pytest.raises(StorageError, match="replaced"):
        b"".join(s3_store.iter_range("resume", chunk_bytes=65536))


@pytest.mark.s3
def test_presign_with_public_endpoint(s3_server: SeaweedS3Server, s3_store_config: S3StoreConfig) -> None:
    # "localhost" stands in for the address clients use; it reaches the same server.
    public = f"localhost:{s3_server.s3_port}"
    store = S3ObjectStore(s3_store_config.model_copy(update={"public_endpoint": public}))
    store.put_bytes("pub", b"via the public name")
    url = store.presign_get("pub", TTL)
    assert url is not None
    assert urllib.parse.urlsplit(url).netloc == public
    assert http("GET", url) == (200, b"via the public name")
    put_url = store.presign_put("pub2", TTL)
    assert put_url is not None and urllib.parse.urlsplit(put_url).netloc == public
    assert http("PUT", put_url, b"up")[0] == 200
    assert store.get_bytes("pub2") == b"up"
    store.close()


@pytest.mark.s3
def test_bucket_is_created_once(s3_store_config: S3StoreConfig) -> None:
    first = S3ObjectStore(s3_store_config)
    second = S3ObjectStore(s3_store_config)  # the bucket exists already: not an error
    first.put_bytes("k", b"1")
    assert second.get_bytes("k") == b"1"
    first.close()
    second.close()


@pytest.mark.s3
def test_missing_bucket_is_a_storage_error(s3_store_config: S3StoreConfig) -> None:
    store = S3ObjectStore(
        s3_store_config.model_copy(update={"bucket": "no-such-bucket-here", "create_bucket": False})
    )
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store.put_bytes("k", b"1")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        list(store.list())
    store.close()


@pytest.mark.s3
def test_s3_server_helper(s3_server: SeaweedS3Server) -> None:
    assert s3_server.running
    assert s3_server.endpoint == f"127.0.0.1:{s3_server.s3_port}"
    assert len(set(s3_server.ports.values())) == len(s3_server.ports) == 10
    assert s3_server.log_tail(5).strip()
    config = s3_server.store_config("b", part_size_mb=8)
    assert config.part_size_mb == 8 and config.secret_key.get_secret_value() == s3_server.secret_key
