"""Streaming safetensors I/O: header parsing and validation, range reads, hashing, writing.

Model weights reach every service as safetensors, and some models are hundreds of megabytes,
so nothing here needs a whole file in memory: readers fetch one tensor's byte range at a time
(from a local file or from an object store), the verifier hashes a byte stream as it passes,
and the writer emits a file tensor by tensor.

torch and numpy are imported lazily, only by the functions that build arrays: the registry
imports this module to verify uploads and must stay small (it never touches tensor values).

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian u64 N, N bytes of
UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data region; offsets are relative to its start (8 + N).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, Self, SupportsIndex, cast

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import numpy
    import torch
    from typing_extensions import Buffer

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DTYPE_SIZES",
    "BytesTensorSource",
    "FileTensorSource",
    "HeaderError",
    "SafetensorsError",
    "SafetensorsHeader",
    "SafetensorsWriter",
    "StoreTensorSource",
    "StreamVerifier",
    "TensorEntry",
    "TensorSource",
    "TrailingDataError",
    "TruncatedError",
    "VerifiedBlob",
    "dtype_of",
    "header_length",
    "iter_tensor_bytes",
    "numpy_from_bytes",
    "parse_header",
    "read_header",
    "read_source_header",
    "tensor_from_bytes",
    "verify_file",
    "write_safetensors_file",
]

# -- errors ------------------------------------------------------------------------------------


class SafetensorsError(ValueError):
    """The bytes are not a valid safetensors file (or a writer was used out of order)."""


class HeaderError(SafetensorsError):
    """The header is malformed or describes an invalid layout."""


class TruncatedError(SafetensorsError):
    """Fewer bytes than the header promises."""


class TrailingDataError(SafetensorsError):
    """More bytes than the header promises."""


# -- dtypes ------------------------------------------------------------------------------------

# Byte-sized dtypes only: the sub-byte ones of newer safetensors (F4, F6_*) have no byte
# offsets per element, and nothing in fedhpc produces them.
DTYPE_SIZES: Final[dict[str, int]] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "C64": 8,
}

_TORCH_DTYPE_NAMES: Final[dict[str, str]] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "C64": "complex64",
}
_FROM_TORCH_NAME: Final[dict[str, str]] = {f"torch.{v}": k for k, v in _TORCH_DTYPE_NAMES.items()}

# Explicit little-endian so that arrays are right on big-endian hosts too.
_NUMPY_DTYPE_STRS: Final[dict[str, str]] = {
    "BOOL": "?",
    "U8": "u1",
    "I8": "i1",
    "I16": "<i2",
    "U16": "<u2",
    "F16": "<f2",
    "I32": "<i4",
    "U32": "<u4",
    "F32": "<f4",
    "F64": "<f8",
    "I64": "<i8",
    "U64": "<u8",
    "C64": "<c8",
}
_FROM_NUMPY_KIND: Final[dict[tuple[str, int], str]] = {
    ("b", 1): "BOOL",
    ("u", 1): "U8",
    ("i", 1): "I8",
    ("i", 2): "I16",
    ("u", 2): "U16",
    ("f", 2): "F16",
    ("i", 4): "I32",
    ("u", 4): "U32",
    ("f", 4): "F32",
    ("f", 8): "F64",
    ("i", 8): "I64",
    ("u", 8): "U64",
    ("c", 8): "C64",
}
# ml_dtypes extension types (kind "V") that numpy itself lacks.
_FROM_NUMPY_NAME: Final[dict[str, str]] = {
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}

DEFAULT_MAX_HEADER_BYTES: Final = 100 << 20
_METADATA_KEY: Final = "__metadata__"
_ENTRY_KEYS: Final = frozenset({"dtype", "shape", "data_offsets"})
# One ranged read of this size usually returns the whole header, saving a round trip per
# object on remote stores; it is clamped to the object size.
_HEADER_PROBE_BYTES: Final = 64 << 10
# Below this, handing the whole-file hash to another thread costs more than it saves.
_PARALLEL_HASH_MIN_BYTES: Final = 256 << 10
_EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()


# -- header model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    header_len: int
    entries: tuple[TensorEntry, ...]  # sorted by begin
    metadata: dict[str, str]
    _by_name: dict[str, TensorEntry] = field(init=False, repr=False, compare=False)
    _end: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {e.name: e for e in self.entries})
        object.__setattr__(self, "_end", max((e.end for e in self.entries), default=self.data_start))

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def expected_size(self) -> int:
        return self._end

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def data_bytes(self) -> int:
        return self.expected_size - self.data_start

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in the safetensors header") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


# -- header parsing ----------------------------------------------------------------------------


class _PairsDict(dict[str, Any]):
    """A JSON object that remembers the keys it saw more than once.

    Duplicates are reported by the validator, which knows which tensor the object belongs to.
    """

    duplicates: list[str]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _PairsDict:
    obj = _PairsDict()
    dups: list[str] = []
    for key, value in pairs:
        if key in obj:
            dups.append(key)
        obj[key] = value
    obj.duplicates = dups
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_pairs_hook, parse_constant=_reject_constant)


def header_length(first8: bytes | bytearray | memoryview) -> int:
    """N, from the file's first 8 bytes."""
    if len(first8) < 8:
        raise TruncatedError(
            f"safetensors file is {len(first8)} bytes, shorter than its 8-byte header length"
        )
    return int.from_bytes(first8[:8], "little")


def _is_int(value: object) -> bool:
    # bool is an int subclass, and JSON true/false must not pass for 1/0.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header_len(n: int, *, file_size: int | None, max_header_bytes: int) -> None:
    if n > max_header_bytes:
        raise HeaderError(f"safetensors header length {n} exceeds the limit of {max_header_bytes} bytes")
    if file_size is not None and 8 + n > file_size:
        raise HeaderError(f"safetensors header length {n} does not fit in a file of {file_size} bytes")


def _parse_entry(name: str, raw: object, data_start: int) -> TensorEntry:
    where = f"safetensors header: tensor {name!r}"
    if not isinstance(raw, dict):
        raise HeaderError(f"{where}: entry must be a JSON object, got {type(raw).__name__}")
    if isinstance(raw, _PairsDict) and raw.duplicates:
        raise HeaderError(f"{where}: duplicate key {raw.duplicates[0]!r}")
    missing = _ENTRY_KEYS - raw.keys()
    if missing:
        raise HeaderError(f"{where}: missing {', '.join(sorted(missing))}")
    extra = raw.keys() - _ENTRY_KEYS
    if extra:
        raise HeaderError(f"{where}: unknown key(s) {', '.join(sorted(map(repr, extra)))}")
    dtype = raw["dtype"]
    if not isinstance(dtype, str):
        raise HeaderError(f"{where}: dtype must be a string, got {dtype!r}")
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is None:
        raise HeaderError(f"{where}: unknown or unsupported dtype {dtype!r}")
    shape = raw["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise HeaderError(f"{where}: shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise HeaderError(f"{where}: shape has a negative dimension: {shape!r}")
    offsets = raw["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise HeaderError(f"{where}: data_offsets must be [begin, end] integers, got {offsets!r}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise HeaderError(f"{where}: data_offsets {offsets!r} must satisfy 0 <= begin <= end")
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        raise HeaderError(
            f"{where}: data_offsets {offsets!r} span {end - begin} bytes, "
            f"but shape {shape!r} of {dtype} needs {expected}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(entries: list[TensorEntry], data_start: int) -> None:
    """Tensors must tile the data region from its start, without holes or overlaps."""
    expected_begin = data_start
    previous: TensorEntry | None = None
    for e in entries:
        if e.begin != expected_begin:
            rel = (e.begin - data_start, e.end - data_start)
            if previous is None:
                raise HeaderError(
                    f"safetensors header: tensor {e.name!r} data_offsets {list(rel)} leave a hole: "
                    f"the first tensor must begin at 0"
                )
            prev_rel = [previous.begin - data_start, previous.end - data_start]
            what = "overlaps" if e.begin < expected_begin else "leaves a hole after"
            raise HeaderError(
                f"safetensors header: tensor {e.name!r} data_offsets {list(rel)} {what} "
                f"tensor {previous.name!r} {prev_rel}"
            )
        expected_begin = e.end
        previous = e


def parse_header(
    prefix: bytes | bytearray | memoryview,
    *,
    file_size: int | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> SafetensorsHeader:
    """Parse and validate the header held in ``prefix`` (at least its first 8 + N bytes).

    With ``file_size``, also checks that the file holds exactly the bytes the header promises
    (TruncatedError / TrailingDataError otherwise).
    """
    n = header_length(prefix)
    _check_header_len(n, file_size=file_size, max_header_bytes=max_header_bytes)
    if len(prefix) < 8 + n:
        raise TruncatedError(f"safetensors header is {n} bytes but only {len(prefix) - 8} are present")
    try:
        text = bytes(prefix[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"safetensors header is not valid UTF-8: {exc}") from None
    try:
        obj = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise HeaderError(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"safetensors header must be a JSON object, got {type(obj).__name__}")
    if isinstance(obj, _PairsDict) and obj.duplicates:
        raise HeaderError(f"safetensors header: duplicate tensor name {obj.duplicates[0]!r}")

    data_start = 8 + n
    metadata: dict[str, str] = {}
    entries: list[TensorEntry] = []
    for name, raw in obj.items():
        if name == _METADATA_KEY:
            metadata = _parse_metadata(raw)
        else:
            entries.append(_parse_entry(name, raw, data_start))
    # Zero-size tensors sort before a tensor that begins at the same offset; otherwise the
    # order of equal keys is the header's (sort is stable).
    entries.sort(key=lambda e: (e.begin, e.end))
    _check_layout(entries, data_start)
    header = SafetensorsHeader(header_len=n, entries=tuple(entries), metadata=metadata)
    if file_size is not None:
        _check_size(header, file_size)
    return header


def _parse_metadata(raw: object) -> dict[str, str]:
    if raw is None:  # the reference implementation accepts null
        return {}
    if not isinstance(raw, dict):
        raise HeaderError(f"safetensors header: __metadata__ must be an object, got {type(raw).__name__}")
    if isinstance(raw, _PairsDict) and raw.duplicates:
        raise HeaderError(f"safetensors header: __metadata__ has duplicate key {raw.duplicates[0]!r}")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise HeaderError(f"safetensors header: __metadata__[{key!r}] must be a string, got {value!r}")
    return dict(raw)


def _last_entry(header: SafetensorsHeader) -> TensorEntry | None:
    return max(header.entries, key=lambda e: e.end, default=None)


def _check_size(header: SafetensorsHeader, size: int) -> None:
    expected = header.expected_size
    if size < expected:
        raise TruncatedError(f"safetensors file is {size} bytes, but {_promise(header)}")
    if size > expected:
        raise TrailingDataError(
            f"safetensors file is {size} bytes, {size - expected} more than the header promises ({expected})"
        )


def _promise(header: SafetensorsHeader) -> str:
    last = _last_entry(header)
    tail = f" (tensor {last.name!r} ends there)" if last is not None and last.nbytes else ""
    return f"its header promises {header.expected_size}{tail}"


def read_header(
    read_range: Callable[[int, int], bytes],
    *,
    file_size: int | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    probe_bytes: int = _HEADER_PROBE_BYTES,
) -> SafetensorsHeader:
    """Read and validate a header through ``read_range(offset, length)``.

    The first read asks for ``probe_bytes`` (clamped to the file) so that one round trip
    usually suffices; a second read fetches the rest of a longer header.
    """
    first = max(8, probe_bytes)
    if file_size is not None:
        first = min(first, file_size)
    head = read_range(0, first)
    n = header_length(head)
    _check_header_len(n, file_size=file_size, max_header_bytes=max_header_bytes)
    if len(head) < 8 + n:
        if len(head) < first:  # the source already ended
            raise TruncatedError(f"safetensors header is {n} bytes but the file ends after {len(head) - 8}")
        rest = read_range(len(head), 8 + n - len(head))
        head = head + rest
        if len(head) < 8 + n:
            raise TruncatedError(f"safetensors header is {n} bytes but the file ends after {len(head) - 8}")
    return parse_header(head, file_size=file_size, max_header_bytes=max_header_bytes)


# -- hashing -----------------------------------------------------------------------------------

_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _hash_pool() -> ThreadPoolExecutor | None:
    """A process-wide pool that hashes the whole file while the caller hashes tensors.

    hashlib drops the GIL for large buffers, so the two sha256 passes every byte needs run
    on two cores. Keyed by pid: a forked child inherits the pool object but not its threads.
    """
    global _pool
    if (os.cpu_count() or 1) < 2:
        return None
    pid = os.getpid()
    with _pool_lock:
        if _pool is None or _pool[0] != pid:
            from concurrent.futures import ThreadPoolExecutor

            _pool = (pid, ThreadPoolExecutor(max_workers=4, thread_name_prefix="fedhpc-sha256"))
        return _pool[1]


class _Hasher(Protocol):
    def update(self, data: Buffer, /) -> None: ...


def _hash_beside(file_hash: _Hasher, mv: memoryview, work: Callable[[], None], *, parallel: bool) -> None:
    """file_hash.update(mv) and work(), on two cores when mv is large enough to pay for it.

    Returns only once both are done: callers may reuse mv's buffer right after.
    """
    fut = None
    if parallel and len(mv) >= _PARALLEL_HASH_MIN_BYTES and (pool := _hash_pool()) is not None:
        try:
            fut = pool.submit(file_hash.update, mv)
        except RuntimeError:  # the pool refuses work once the interpreter is shutting down
            fut = None
    if fut is None:
        file_hash.update(mv)
        work()
        return
    try:
        work()
    finally:
        fut.result()


def _as_bytes_view(data: Buffer) -> memoryview:
    mv = memoryview(data)
    # Only a C-contiguous buffer is its own byte sequence; hashlib and write() refuse others.
    if not mv.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


@dataclass(frozen=True)
class VerifiedBlob:
    size: int
    sha256: str
    header: SafetensorsHeader
    tensor_sha256: dict[str, str]  # per-tensor hex sha256 of its raw bytes, in file order


def tensor_hashes_of_file(
    path: Path | str, header: SafetensorsHeader, chunk_bytes: int = 8 << 20
) -> dict[str, str]:
    """Each tensor's sha256, read back from a file whose header is known (pread, one tensor at a time)."""
    hashes: dict[str, str] = {}
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY)
    try:
        for entry in header.entries:
            digest = hashlib.sha256()
            done = 0
            while done < entry.nbytes:
                want = min(chunk_bytes, entry.nbytes - done)
                got = os.preadv(fd, [view[:want]], entry.begin + done)
                if got <= 0:
                    raise TruncatedError(f"{path} ends inside tensor {entry.name!r}")
                digest.update(view[:got])
                done += got
            hashes[entry.name] = digest.hexdigest()
    finally:
        os.close(fd)
    return hashes


class StreamVerifier:
    """Feed a safetensors file's bytes in order (any chunking).

    Parses the header as soon as it has arrived, computes the whole-file sha256 and each
    tensor's sha256 on the fly, and keeps no more than the header plus the current chunk.
    After any error the verifier is spent: later calls raise again.
    """

    def __init__(self, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, parallel: bool = True) -> None:
        self._max_header_bytes = max_header_bytes
        self._parallel = parallel
        self._file_hash = hashlib.sha256()
        self._seen = 0
        self._head = bytearray()
        self._header: SafetensorsHeader | None = None
        self._expected = -1
        # Non-empty tensors in file order; they tile the data region, so the stream position
        # always lies inside self._walk[self._wi].
        self._walk: tuple[TensorEntry, ...] = ()
        self._wi = 0
        self._cur = hashlib.sha256()
        self._tensor_sha: dict[str, str] = {}
        self._error: SafetensorsError | None = None
        self._result: VerifiedBlob | None = None

    @property
    def bytes_seen(self) -> int:
        return self._seen

    @property
    def header(self) -> SafetensorsHeader | None:
        return self._header

    def _usable(self) -> None:
        if self._error is not None:
            raise type(self._error)(f"verifier already failed: {self._error}")
        if self._result is not None:
            raise SafetensorsError("verifier already finished")

    def feed(self, chunk: Buffer) -> None:
        self._usable()
        mv = _as_bytes_view(chunk)
        n = len(mv)
        if n == 0:
            return
        try:
            data = mv
            if self._header is None:
                data = self._take_header(mv)
                if self._header is None:
                    self._file_hash.update(mv)
                    self._seen += n
                    return
            if self._seen + n > self._expected:
                raise TrailingDataError(
                    f"safetensors stream has more than the {self._expected} bytes its header promises "
                    f"(got {self._seen + n} so far)"
                )
            pos = self._seen + (n - len(data))
            _hash_beside(self._file_hash, mv, lambda: self._walk_data(data, pos), parallel=self._parallel)
            self._seen += n
        except SafetensorsError as exc:
            self._error = exc
            raise

    def _take_header(self, mv: memoryview) -> memoryview:
        """Buffer header bytes from mv; return what follows the header (empty if incomplete)."""
        head = self._head
        if len(head) < 8:
            take = min(8 - len(head), len(mv))
            head += mv[:take]
            mv = mv[take:]
            if len(head) < 8:
                return mv
            _check_header_len(header_length(head), file_size=None, max_header_bytes=self._max_header_bytes)
        need = 8 + header_length(head) - len(head)
        take = min(need, len(mv))
        head += mv[:take]
        if take < need:
            return mv[take:]
        header = parse_header(head, max_header_bytes=self._max_header_bytes)
        self._header = header
        self._expected = header.expected_size
        self._walk = tuple(e for e in header.entries if e.nbytes)
        self._tensor_sha = {e.name: _EMPTY_SHA256 for e in header.entries if not e.nbytes}
        self._head = bytearray()  # drop the copy; the parsed header is all we need
        return mv[take:]

    def _walk_data(self, data: memoryview, pos: int) -> None:
        walk = self._walk
        while data:
            e = walk[self._wi]
            take = min(e.end - pos, len(data))
            self._cur.update(data[:take])
            pos += take
            data = data[take:]
            if pos == e.end:
                self._tensor_sha[e.name] = self._cur.hexdigest()
                self._cur = hashlib.sha256()
                self._wi += 1

    def finish(self) -> VerifiedBlob:
        if self._result is not None:
            return self._result
        self._usable()
        try:
            header = self._header
            if header is None:
                if len(self._head) < 8:
                    raise TruncatedError(
                        f"safetensors stream ended after {self._seen} bytes, inside the 8-byte header length"
                    )
                raise TruncatedError(
                    f"safetensors stream ended after {self._seen} bytes, inside its "
                    f"{header_length(self._head)}-byte header"
                )
            if self._seen < self._expected:
                e = self._walk[self._wi]
                raise TruncatedError(
                    f"safetensors stream ended after {self._seen} of {self._expected} bytes, "
                    f"inside tensor {e.name!r} (bytes {e.begin}..{e.end})"
                )
        except SafetensorsError as exc:
            self._error = exc
            raise
        per_tensor = {e.name: self._tensor_sha[e.name] for e in header.entries}
        self._result = VerifiedBlob(self._seen, self._file_hash.hexdigest(), header, per_tensor)
        return self._result


def verify_file(path: Path, chunk_bytes: int = 1 << 20) -> VerifiedBlob:
    """Validate a safetensors file and hash it (whole and per tensor) in one streaming pass."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    verifier = StreamVerifier()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            verifier.feed(view[:n])
    return verifier.finish()


# -- reading tensors ---------------------------------------------------------------------------


class TensorSource(Protocol):
    @property
    def size(self) -> int: ...

    def read_range(self, offset: int, length: int) -> bytes: ...


class _SizedInfo(Protocol):
    @property
    def size(self) -> int: ...


class RangeReadableStore(Protocol):
    """What StoreTensorSource needs of an object store (fedhpc.common.storage.ObjectStore fits)."""

    def stat(self, key: str) -> _SizedInfo: ...

    def read_range(self, key: str, offset: int, length: int) -> bytes: ...


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"invalid byte range: offset={offset} length={length}")


class FileTensorSource:
    """A local file read with pread: no shared file position, so threads may share one."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self._size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def size(self) -> int:
        return self._size

    def read_range(self, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        if self._fd < 0:
            raise ValueError(f"{self.path}: source is closed")
        data = os.pread(self._fd, length, offset)
        if len(data) == length or not data:
            return data
        # Short read (a single read is capped near 2 GiB on Linux): gather the rest.
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self._fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BytesTensorSource:
    def __init__(self, buf: bytes | bytearray | memoryview) -> None:
        self._buf = _as_bytes_view(buf)

    @property
    def size(self) -> int:
        return len(self._buf)

    def read_range(self, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        return bytes(self._buf[offset : offset + length])


class StoreTensorSource:
    """One object in an object store; its size is fetched once, at construction."""

    def __init__(self, store: RangeReadableStore, key: str) -> None:
        self.store = store
        self.key = key
        self._size = store.stat(key).size

    @property
    def size(self) -> int:
        return self._size

    def read_range(self, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        return self.store.read_range(self.key, offset, length)


def read_source_header(
    source: TensorSource, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsHeader:
    return read_header(source.read_range, file_size=source.size, max_header_bytes=max_header_bytes)


def iter_tensor_bytes(
    source: TensorSource, header: SafetensorsHeader, names: Iterable[str] | None = None
) -> Iterator[tuple[TensorEntry, bytes]]:
    """Yield (entry, raw bytes) one tensor at a time, reading only that tensor's byte range.

    File order by default, else the order of ``names`` (all are looked up before any read,
    so a wrong name fails without I/O).
    """
    entries = header.entries if names is None else [header.entry(n) for n in names]
    for e in entries:
        if not e.nbytes:
            yield e, b""
            continue
        data = source.read_range(e.begin, e.nbytes)
        if len(data) != e.nbytes:
            raise TruncatedError(
                f"tensor {e.name!r}: read {len(data)} of its {e.nbytes} bytes at offset {e.begin}; "
                "the file is shorter than its header promises"
            )
        yield e, data


def _check_nbytes(entry: TensorEntry, got: int) -> None:
    if got != entry.nbytes:
        raise SafetensorsError(
            f"tensor {entry.name!r}: got {got} bytes, its {entry.dtype} {list(entry.shape)} needs {entry.nbytes}"
        )


def _torch_dtype(code: str) -> torch.dtype:
    import torch

    name = _TORCH_DTYPE_NAMES.get(code)
    dtype = getattr(torch, name, None) if name is not None else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {code} has no torch equivalent in torch {torch.__version__}")
    return dtype


def tensor_from_bytes(entry: TensorEntry, data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A CPU tensor that owns an aligned copy of ``data`` (one memcpy; writable, unlike frombuffer
    over bytes)."""
    import numpy as np
    import torch

    mv = _as_bytes_view(data)
    _check_nbytes(entry, len(mv))
    dtype = _torch_dtype(entry.dtype)
    flat = torch.empty(entry.numel, dtype=dtype)
    if entry.nbytes:
        dst = flat.view(torch.uint8).numpy()
        dst[:] = np.frombuffer(mv, dtype=np.uint8)
        itemsize = DTYPE_SIZES[entry.dtype]
        if sys.byteorder != "little" and itemsize > 1:
            rows = dst.reshape(-1, itemsize)
            rows[:] = rows[:, ::-1].copy()
    return flat.reshape(entry.shape)


def numpy_from_bytes(
    entry: TensorEntry, data: bytes | bytearray | memoryview, *, copy: bool = False
) -> numpy.ndarray[Any, Any]:
    """An array over ``data`` without copying (read-only when data is), or a copy if asked.

    ValueError for BF16 and the F8 types, which numpy lacks.
    """
    import numpy as np

    code = _NUMPY_DTYPE_STRS.get(entry.dtype)
    if code is None:
        raise ValueError(f"tensor {entry.name!r}: dtype {entry.dtype} has no numpy equivalent")
    mv = _as_bytes_view(data)
    _check_nbytes(entry, len(mv))
    arr = np.frombuffer(mv, dtype=np.dtype(code)).reshape(entry.shape)
    return arr.copy() if copy else arr


# -- writing -----------------------------------------------------------------------------------


class SupportsWrite(Protocol):
    def write(self, data: Buffer, /) -> object: ...


def _loaded(module: str) -> Any:
    # A torch tensor / numpy array can only exist if its module was imported already, so this
    # type check costs no import.
    return sys.modules.get(module)


def dtype_of(tensor: torch.Tensor | numpy.ndarray[Any, Any]) -> str:
    """The safetensors dtype code of a torch tensor or numpy array."""
    torch = _loaded("torch")
    if torch is not None and isinstance(tensor, torch.Tensor):
        code = _FROM_TORCH_NAME.get(str(tensor.dtype))
        if code is None:
            raise ValueError(f"torch dtype {tensor.dtype} has no safetensors equivalent")
        return code
    np = _loaded("numpy")
    if np is not None and isinstance(tensor, np.ndarray):
        dt = tensor.dtype
        found = _FROM_NUMPY_KIND.get((dt.kind, dt.itemsize)) or _FROM_NUMPY_NAME.get(dt.name)
        if found is None:
            raise ValueError(f"numpy dtype {dt} has no safetensors equivalent")
        return found
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(tensor).__name__}")


def _array_bytes(name: str, obj: object, dtype: str, shape: tuple[int, ...]) -> memoryview | None:
    """Little-endian C-order bytes of a tensor/array (a view when it already is), else None."""
    torch = _loaded("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        _check_array(name, dtype_of(obj), tuple(obj.shape), dtype, shape)
        if obj.layout != torch.strided:
            raise SafetensorsError(f"tensor {name!r}: {obj.layout} tensors cannot be written; densify first")
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        t = t.contiguous().reshape(-1)
        arr = t.view(torch.uint8).numpy()
        if sys.byteorder != "little" and t.element_size() > 1:
            arr = arr.reshape(-1, t.element_size())[:, ::-1].copy().reshape(-1)
        return memoryview(arr)
    np = _loaded("numpy")
    if np is not None and isinstance(obj, np.ndarray):
        _check_array(name, dtype_of(obj), tuple(obj.shape), dtype, shape)
        a = obj
        if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder != "little"):
            a = a.astype(a.dtype.newbyteorder("<"))
        a = np.ascontiguousarray(a).reshape(-1)
        return memoryview(a.view(np.uint8))
    return None


def _check_array(
    name: str, got_dtype: str, got_shape: tuple[int, ...], dtype: str, shape: tuple[int, ...]
) -> None:
    if got_dtype != dtype or got_shape != shape:
        raise SafetensorsError(
            f"tensor {name!r}: declared {dtype} {list(shape)}, got {got_dtype} {list(got_shape)}"
        )


def _dims(shape: Sequence[SupportsIndex]) -> list[int] | None:
    """shape as plain ints (numpy integers welcome), or None if any is not a non-negative int."""
    try:
        dims = [operator.index(d) for d in shape if not isinstance(d, bool)]
    except TypeError:
        return None
    return dims if len(dims) == len(shape) and all(d >= 0 for d in dims) else None


def _build_header(
    specs: Sequence[tuple[str, str, Sequence[SupportsIndex]]], metadata: Mapping[str, str] | None
) -> bytes:
    obj: dict[str, object] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise HeaderError(f"metadata must map strings to strings, got {key!r}: {value!r}")
        obj[_METADATA_KEY] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise HeaderError(f"invalid tensor name {name!r}")
        if name in obj:
            raise HeaderError(f"duplicate tensor name {name!r}")
        itemsize = DTYPE_SIZES.get(dtype)
        if itemsize is None:
            raise HeaderError(f"tensor {name!r}: unknown or unsupported dtype {dtype!r}")
        dims = _dims(shape)
        if dims is None:
            raise HeaderError(f"tensor {name!r}: shape must be non-negative integers, got {list(shape)!r}")
        nbytes = math.prod(dims) * itemsize
        obj[name] = {"dtype": dtype, "shape": dims, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Pad with spaces like the reference writer, so the data region starts 8-byte aligned.
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor to ``sink``.

    The header (from the declared specs) is written at construction, then each tensor's bytes
    in declared order; the whole-file and per-tensor sha256 are computed while writing.
    Tensors are laid out in declared order without alignment padding between them.
    """

    def __init__(
        self,
        sink: SupportsWrite,
        specs: Sequence[tuple[str, str, Sequence[SupportsIndex]]],
        metadata: Mapping[str, str] | None = None,
        *,
        parallel: bool = True,
        tensor_hashes: bool = True,
    ) -> None:
        raw = _build_header(specs, metadata)
        self._header = parse_header(raw)
        # Without per-tensor hashes the result's tensor_sha256 is empty; a producer that needs
        # them later (for a manifest) can compute them from the file, e.g. while uploading it.
        self._tensor_hashes = tensor_hashes
        # Declared order, which may differ from file order only among zero-size tensors.
        self._order = tuple(self._header.entry(name) for name, _, _ in specs)
        self._sink = sink
        self._parallel = parallel
        self._next = 0
        self._file_hash = hashlib.sha256(raw)
        self._tensor_sha: dict[str, str] = {}
        self._closed: VerifiedBlob | None = None
        sink.write(raw)

    @property
    def header(self) -> SafetensorsHeader:
        return self._header

    @property
    def total_size(self) -> int:
        return self._header.expected_size

    @property
    def pending(self) -> list[str]:
        """Names still to be written, in order."""
        return [e.name for e in self._order[self._next :]]

    def write(self, name: str, data: Buffer | torch.Tensor | numpy.ndarray[Any, Any]) -> None:
        if self._closed is not None:
            raise SafetensorsError(f"cannot write tensor {name!r}: writer is closed")
        if self._next >= len(self._order):
            raise SafetensorsError(f"cannot write tensor {name!r}: all declared tensors are written")
        entry = self._order[self._next]
        if name != entry.name:
            state = (
                "was already written"
                if name in self._tensor_sha
                else ("is not declared" if name not in self._header else "is declared later")
            )
            raise SafetensorsError(f"expected tensor {entry.name!r} next, got {name!r}, which {state}")
        arr = _array_bytes(name, data, entry.dtype, entry.shape)
        mv = arr if arr is not None else _as_bytes_view(cast("Buffer", data))
        _check_nbytes(entry, len(mv))
        tensor_hash = hashlib.sha256() if self._tensor_hashes else None

        def hash_and_write() -> None:
            if tensor_hash is not None:
                tensor_hash.update(mv)
            self._sink.write(mv)

        _hash_beside(self._file_hash, mv, hash_and_write, parallel=self._parallel)
        self._tensor_sha[name] = tensor_hash.hexdigest() if tensor_hash is not None else ""
        self._next += 1

    def close(self) -> VerifiedBlob:
        """Finish (the sink is left open); error if a declared tensor was not written."""
        if self._closed is not None:
            return self._closed
        missing = self.pending
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise SafetensorsError(f"tensor {missing[0]!r}{more} declared but not written")
        per_tensor = (
            {e.name: self._tensor_sha[e.name] for e in self._header.entries} if self._tensor_hashes else {}
        )
        self._closed = VerifiedBlob(self.total_size, self._file_hash.hexdigest(), self._header, per_tensor)
        return self._closed


def write_safetensors_file(
    path: Path,
    tensors: Mapping[str, torch.Tensor | numpy.ndarray[Any, Any]],
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
) -> VerifiedBlob:
    """Write tensors (in mapping order) to path atomically: a temporary file in the same
    directory, fsynced, then renamed; on any error no file appears at path."""
    path = Path(path)
    specs = [(name, dtype_of(t), tuple(t.shape)) for name, t in tensors.items()]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    # O_EXCL: never clobber another writer's temporary file; mode 0o666 lets umask decide.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = SafetensorsWriter(f, specs, metadata)
            for name, t in tensors.items():
                writer.write(name, t)
            blob = writer.close()
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return blob
