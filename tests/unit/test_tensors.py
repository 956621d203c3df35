"""fedhpc.common.tensors: streaming safetensors I/O checked against the reference library."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhpc.common.tensors import (
    DTYPE_SIZES,
    BytesTensorSource,
    FileTensorSource,
    HeaderError,
    SafetensorsError,
    SafetensorsWriter,
    StoreTensorSource,
    StreamVerifier,
    TensorEntry,
    TrailingDataError,
    TruncatedError,
    dtype_of,
    header_length,
    iter_tensor_bytes,
    numpy_from_bytes,
    parse_header,
    read_header,
    read_source_header,
    tensor_from_bytes,
    verify_file,
    write_safetensors_file,
)

REPO = Path(__file__).resolve().parents[2]


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "f32": torch.randn(4, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.tensor([-(2**40), 0, 2**40 + 3], dtype=torch.int64),
        "i32": torch.arange(-5, 5, dtype=torch.int32).reshape(2, 5),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(0, 255, 17, dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "u16": torch.tensor([0, 65535], dtype=torch.uint16),
        "scalar": torch.tensor(3.5),
        "scalar_i": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
        "noncontig": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    }


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    # Compare bit patterns: NaN-safe and works for dtypes without comparison kernels.
    assert torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def make_file(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    sink = io.BytesIO()
    w = SafetensorsWriter(sink, [(n, dtype_of(t), tuple(t.shape)) for n, t in tensors.items()], metadata)
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    return sink.getvalue()


def raw_file(header: object, data: bytes = b"", *, raw_json: bytes | None = None) -> bytes:
    text = raw_json if raw_json is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


# -- interoperability with the reference implementation ----------------------------------------


def test_files_we_write_load_with_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "ours.safetensors"
    blob = write_safetensors_file(path, tensors, {"round": "3", "note": "ünïcode"})
    loaded = safetensors.torch.load_file(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert_same(loaded[name], t)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"round": "3", "note": "ünïcode"}
    data = path.read_bytes()
    assert blob.size == len(data) == blob.header.expected_size
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert (8 + header_length(data)) % 8 == 0
    for e in blob.header.entries:
        assert blob.tensor_sha256[e.name] == hashlib.sha256(data[e.begin : e.end]).hexdigest()
    assert list(blob.tensor_sha256) == blob.header.names
    assert verify_file(path, chunk_bytes=7) == blob


def test_files_safetensors_writes_parse_with_ours(tmp_path: Path) -> None:
    tensors = {n: t.contiguous() for n, t in sample_tensors().items()}
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with FileTensorSource(path) as src:
        header = read_source_header(src)
        assert header.metadata == {"format": "pt"}
        assert sorted(header.names) == sorted(tensors)
        assert header.expected_size == src.size == path.stat().st_size
        seen = {}
        for entry, data in iter_tensor_bytes(src, header):
            seen[entry.name] = tensor_from_bytes(entry, data)
    assert seen.keys() == tensors.keys()
    for name, t in tensors.items():
        assert_same(seen[name], t)
    assert verify_file(path).header == header


def test_writer_matches_reference_bytes(tmp_path: Path) -> None:
    # Without metadata (a HashMap, in arbitrary order) and in the reference's own tensor order
    # (alignment, then name), both writers must produce the same bytes.
    tensors = {
        "a": torch.arange(6, dtype=torch.float64),
        "b": torch.ones(2, 3),
        "c": torch.tensor(1.0, dtype=torch.bfloat16),
        "d": torch.tensor([True]),
    }
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, path)
    assert make_file(tensors) == path.read_bytes()


def test_numpy_views_and_writer() -> None:
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "f32": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
        "be": np.arange(4, dtype=">i4"),  # big-endian input must come out little-endian
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "bool": np.array([True, False]),
        "scalar": np.array(2, dtype=np.uint64),
    }
    sink = io.BytesIO()
    w = SafetensorsWriter(sink, [(n, dtype_of(a), a.shape) for n, a in arrays.items()])
    for n, a in arrays.items():
        w.write(n, a)
    w.close()
    src = BytesTensorSource(sink.getvalue())
    header = read_source_header(src)
    for entry, data in iter_tensor_bytes(src, header):
        got = numpy_from_bytes(entry, data)
        np.testing.assert_array_equal(got, arrays[entry.name])
        assert got.shape == arrays[entry.name].shape
        assert not got.flags.writeable and numpy_from_bytes(entry, data, copy=True).flags.writeable
    loaded = safetensors.torch.load(sink.getvalue())
    assert loaded["be"].tolist() == [0, 1, 2, 3]
    bf = TensorEntry("w", "BF16", (1,), 8, 10)
    with pytest.raises(ValueError, match=r"'w'.*BF16"):
        numpy_from_bytes(bf, b"\0\0")


def test_tensor_from_bytes_is_owned_and_checks_size() -> None:
    entry = TensorEntry("w", "F32", (2,), 8, 16)
    data = np.array([1.5, -2.0], dtype="<f4").tobytes()
    t = tensor_from_bytes(entry, data)
    t += 1  # a tensor over immutable bytes would not be safely writable
    assert t.tolist() == [2.5, -1.0]
    with pytest.raises(SafetensorsError, match=r"'w'.*got 4 bytes"):
        tensor_from_bytes(entry, data[:4])


def test_dtype_of() -> None:
    assert dtype_of(torch.zeros(1, dtype=torch.bfloat16)) == "BF16"
    assert dtype_of(np.zeros(1, dtype=np.int16)) == "I16"
    assert dtype_of(torch.zeros(1, dtype=torch.float8_e5m2)) == "F8_E5M2"
    with pytest.raises(ValueError, match="complex128"):
        dtype_of(torch.zeros(1, dtype=torch.complex128))
    with pytest.raises(TypeError):
        dtype_of([1.0])  # type: ignore[arg-type]
    assert set(DTYPE_SIZES) >= {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


def test_import_pulls_neither_torch_nor_numpy() -> None:
    code = "import sys, fedhpc.common.tensors; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy'}))"
    env = {**os.environ, "PYTHONPATH": str(REPO / "services")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- streaming verification ----------------------------------------------------------------------

_DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64"]


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 6))
    specs = []
    for i in range(n):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        specs.append((f"t{i}", dtype, shape))
    meta = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    sink = io.BytesIO()
    w = SafetensorsWriter(sink, specs, meta)
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]
        w.write(name, draw(st.binary(min_size=nbytes, max_size=nbytes)))
    w.close()
    return sink.getvalue()


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        yield data[a:b]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(safetensors_files(), st.lists(st.integers(0, 10_000), max_size=30))
def test_stream_verifier_any_chunking(data: bytes, cuts: list[int]) -> None:
    v = StreamVerifier()
    for chunk in split(data, cuts):
        v.feed(memoryview(chunk))
    blob = v.finish()
    header = parse_header(data, file_size=len(data))
    assert blob.header == header == v.header
    assert blob.size == v.bytes_seen == len(data)
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert blob.tensor_sha256 == {
        e.name: hashlib.sha256(data[e.begin : e.end]).hexdigest() for e in header.entries
    }


def test_stream_verifier_large_chunks_parallel_and_serial() -> None:
    # Chunks above the parallel threshold go through the hashing thread pool.
    g = torch.Generator().manual_seed(1)
    data = make_file(
        {
            "a": torch.randn(300_000, generator=g),
            "b": torch.randn(5, generator=g),
            "c": torch.randn(200_001, generator=g),
        }
    )
    want = hashlib.sha256(data).hexdigest()
    for parallel in (True, False):
        for chunk in (300_001, 1 << 20, len(data)):
            v = StreamVerifier(parallel=parallel)
            buf = bytearray(chunk)
            view = memoryview(buf)
            for off in range(0, len(data), chunk):
                piece = data[off : off + chunk]
                view[: len(piece)] = piece  # buffer reuse, as verify_file does
                v.feed(view[: len(piece)])
            blob = v.finish()
            assert blob.sha256 == want
            h = blob.header
            assert blob.tensor_sha256 == {
                e.name: hashlib.sha256(data[e.begin : e.end]).hexdigest() for e in h.entries
            }


def test_truncated_stream() -> None:
    data = make_file(sample_tensors())
    header = parse_header(data)
    last = max(header.entries, key=lambda e: e.end)
    for cut in (0, 5, 8, header.data_start - 1, header.data_start, len(data) - 1):
        v = StreamVerifier()
        v.feed(data[:cut])
        with pytest.raises(TruncatedError):
            v.finish()
    v = StreamVerifier()
    v.feed(data[:-1])
    with pytest.raises(TruncatedError, match=repr(last.name)):
        v.finish()
    with pytest.raises(TruncatedError, match=repr(last.name)):
        parse_header(data, file_size=len(data) - 1)
    src = BytesTensorSource(data[:-1])
    with pytest.raises(TruncatedError):
        read_source_header(src)
    with pytest.raises(TruncatedError, match=repr(last.name)):
        list(iter_tensor_bytes(src, header))


def test_trailing_data() -> None:
    data = make_file({"w": torch.ones(4)})
    v = StreamVerifier()
    v.feed(data[:10])
    with pytest.raises(TrailingDataError, match="more than"):
        v.feed(data[10:] + b"\0")  # raised by the feed that crosses the end, not at finish
    with pytest.raises(TrailingDataError):
        v.feed(b"")  # spent
    with pytest.raises(TrailingDataError):
        v.finish()
    with pytest.raises(TrailingDataError):
        parse_header(data + b"x", file_size=len(data) + 1)
    with pytest.raises(TrailingDataError):
        read_source_header(BytesTensorSource(data + b"x"))
    v = StreamVerifier()
    v.feed(data)
    with pytest.raises(TrailingDataError):
        v.feed(b"x")


def test_verify_file_truncated_and_trailing(tmp_path: Path) -> None:
    data = make_file({"w": torch.ones(1000)})
    p = tmp_path / "f.safetensors"
    p.write_bytes(data[:-3])
    with pytest.raises(TruncatedError, match="'w'"):
        verify_file(p, chunk_bytes=64)
    p.write_bytes(data + b"\0")
    with pytest.raises(TrailingDataError):
        verify_file(p, chunk_bytes=64)


# -- header validation -------------------------------------------------------------------------

F4 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def entry(
    dtype: str = "F32", shape: list[Any] | None = None, offsets: list[Any] | None = None
) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [1] if shape is None else shape, "data_offsets": offsets or [0, 4]}


BAD_HEADERS: list[tuple[str, bytes, str]] = [
    ("bad json", b'{"w": {"dtype": "F32",', "not valid JSON"),
    ("not an object", b"[1, 2]", "JSON object"),
    ("nan", b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "not valid JSON"),
    ("not utf-8", b'{"w\xff": 1}', "UTF-8"),
    ("unknown dtype", json.dumps({"w": entry("F128")}).encode(), "'w'.*F128"),
    ("negative shape", json.dumps({"w": entry(shape=[-1, -4], offsets=[0, 16])}).encode(), "'w'.*negative"),
    (
        "wrong nbytes",
        json.dumps({"w": entry(shape=[2, 3], offsets=[0, 20])}).encode(),
        "'w'.*20 bytes.*needs 24",
    ),
    (
        "overlap",
        json.dumps({"a": entry(shape=[2], offsets=[0, 8]), "b": entry(shape=[1], offsets=[4, 8])}).encode(),
        "'b'.*overlaps.*'a'",
    ),
    (
        "hole",
        json.dumps({"a": entry(offsets=[0, 4]), "b": entry(offsets=[8, 12])}).encode(),
        "'b'.*hole.*'a'",
    ),
    ("hole at start", json.dumps({"a": entry(offsets=[4, 8])}).encode(), "'a'.*hole"),
    (
        "duplicate names",
        b'{"w": ' + json.dumps(F4).encode() + b', "w": ' + json.dumps(F4).encode() + b"}",
        "duplicate tensor name 'w'",
    ),
    (
        "duplicate key",
        b'{"w": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        "'w'.*duplicate key 'dtype'",
    ),
    ("missing key", json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode(), "'w'.*missing data_offsets"),
    ("unknown key", json.dumps({"w": {**F4, "extra": 1}}).encode(), "'w'.*unknown key"),
    ("shape not list", json.dumps({"w": entry(shape="1")}).encode(), "'w'.*shape"),  # type: ignore[arg-type]
    ("float dim", json.dumps({"w": entry(shape=[1.0])}).encode(), "'w'.*shape"),
    (
        "bool offsets",
        json.dumps({"w": entry(shape=[0], offsets=[False, False])}).encode(),
        "'w'.*data_offsets",
    ),
    ("offsets backwards", json.dumps({"w": entry(shape=[0], offsets=[4, 0])}).encode(), "'w'.*begin <= end"),
    ("entry not object", json.dumps({"w": [1]}).encode(), "'w'.*JSON object"),
    ("dtype not str", json.dumps({"w": entry(dtype=3)}).encode(), "'w'.*dtype"),  # type: ignore[arg-type]
    ("metadata value", json.dumps({"__metadata__": {"k": 1}, "w": F4}).encode(), "__metadata__\\['k'\\]"),
]


@pytest.mark.parametrize(
    ("header", "match"), [(h, m) for _, h, m in BAD_HEADERS], ids=[i for i, _, _ in BAD_HEADERS]
)
def test_corrupt_headers(header: bytes, match: str) -> None:
    data = raw_file(None, b"\0" * 24, raw_json=header)
    with pytest.raises(HeaderError, match=match):
        parse_header(data)
    # The verifier rejects the header as soon as it has arrived, before any tensor data.
    v = StreamVerifier()
    with pytest.raises(HeaderError, match=match):
        v.feed(data[: 8 + len(header)])


def test_header_length_limits() -> None:
    too_long = (1 << 40).to_bytes(8, "little") + b"{}"
    with pytest.raises(HeaderError, match="exceeds the limit"):
        parse_header(too_long)
    v = StreamVerifier(max_header_bytes=1000)
    with pytest.raises(HeaderError, match="exceeds the limit"):
        v.feed(too_long[:8])  # only the length has arrived
    data = raw_file({"w": F4}, b"\0" * 4)
    with pytest.raises(HeaderError, match="does not fit"):
        parse_header((100).to_bytes(8, "little") + data[8:], file_size=len(data))
    with pytest.raises(HeaderError, match="does not fit"):
        read_source_header(BytesTensorSource((100).to_bytes(8, "little") + data[8:]))
    with pytest.raises(TruncatedError):
        header_length(b"\0\0\0")


def test_metadata_null_and_empty_file() -> None:
    data = raw_file({"__metadata__": None})
    h = parse_header(data, file_size=len(data))
    assert h.metadata == {} and h.entries == () and h.expected_size == h.data_start
    assert make_file({}) == b"\x08" + b"\0" * 7 + b"{}      "
    v = StreamVerifier()
    v.feed(make_file({}))
    assert v.finish().tensor_sha256 == {}


def test_zero_size_tensors_anywhere_in_order() -> None:
    data = raw_file(
        {
            "z_end": entry(shape=[0], offsets=[8, 8]),
            "a": entry(shape=[1], offsets=[0, 4]),
            "z_mid": entry(shape=[0, 2], offsets=[4, 4]),
            "b": entry(shape=[1], offsets=[4, 8]),
        },
        b"\1" * 8,
    )
    h = parse_header(data, file_size=len(data))
    assert h.names == ["a", "z_mid", "b", "z_end"]
    v = StreamVerifier()
    v.feed(data)
    assert v.finish().tensor_sha256["z_mid"] == hashlib.sha256(b"").hexdigest()


# -- range reads -------------------------------------------------------------------------------


class CountingSource:
    def __init__(self, data: bytes) -> None:
        self._inner = BytesTensorSource(data)
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return self._inner.size

    def read_range(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self._inner.read_range(offset, length)

    @property
    def total(self) -> int:
        return sum(length for _, length in self.reads)


def test_iter_tensor_bytes_reads_only_requested_ranges() -> None:
    tensors = sample_tensors()
    data = make_file(tensors)
    src = CountingSource(data)
    header = read_header(src.read_range, file_size=src.size, probe_bytes=8)
    assert src.total == header.data_start  # exactly the 8-byte length and the header
    src.reads.clear()
    got = {e.name: tensor_from_bytes(e, b) for e, b in iter_tensor_bytes(src, header)}
    assert src.total == header.data_bytes == sum(e.nbytes for e in header.entries)
    assert all(length > 0 for _, length in src.reads)  # zero-size tensors need no read
    for name, t in tensors.items():
        assert_same(got[name], t.contiguous())

    src.reads.clear()
    wanted = ["bool", "f32"]
    out = list(iter_tensor_bytes(src, header, wanted))
    assert [e.name for e, _ in out] == wanted  # the given order, not file order
    assert sorted(src.reads) == sorted((header.entry(n).begin, header.entry(n).nbytes) for n in wanted)
    src.reads.clear()
    with pytest.raises(KeyError, match="'nope'"):
        list(iter_tensor_bytes(src, header, ["f32", "nope"]))
    assert src.reads == []  # names are checked before any read


def test_read_header_probe_one_round_trip_and_long_headers() -> None:
    data = make_file({f"t{i}": torch.zeros(1) for i in range(3000)})  # header > 64 KiB
    src = CountingSource(data)
    h = read_source_header(src)
    assert len(h.entries) == 3000 and len(src.reads) == 2 and src.total == h.data_start
    small = CountingSource(make_file({"w": torch.ones(3)}))
    read_source_header(small)
    assert small.reads == [(0, small.size)]  # clamped to the object: a single request


def test_file_and_store_sources(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    blob = write_safetensors_file(p, {"w": torch.arange(10.0), "b": torch.ones(2)})

    @dataclass(frozen=True)
    class Info:
        size: int

    class FakeStore:
        def __init__(self) -> None:
            self.objects = {"k": p.read_bytes()}

        def stat(self, key: str) -> Info:
            return Info(len(self.objects[key]))

        def read_range(self, key: str, offset: int, length: int) -> bytes:
            return self.objects[key][offset : offset + length]

    store_src = StoreTensorSource(FakeStore(), "k")
    with FileTensorSource(p) as file_src:
        for src in (file_src, store_src):
            h = read_source_header(src)
            assert h == blob.header and src.size == blob.size
            got = dict(iter_tensor_bytes(src, h, ["w"]))
            assert tensor_from_bytes(h.entry("w"), got[h.entry("w")]).tolist() == list(range(10))
        assert file_src.read_range(blob.size - 2, 100) == p.read_bytes()[-2:]
        with pytest.raises(ValueError):
            file_src.read_range(-1, 4)
    with pytest.raises(ValueError, match="closed"):
        file_src.read_range(0, 8)


# -- writer ------------------------------------------------------------------------------------


def test_writer_order_and_size_errors() -> None:
    specs = [("a", "F32", (2,)), ("b", "I64", ()), ("c", "U8", (0,))]
    w = SafetensorsWriter(io.BytesIO(), specs)
    assert w.total_size == w.header.data_start + 16
    with pytest.raises(SafetensorsError, match=r"expected tensor 'a' next, got 'b'.*declared later"):
        w.write("b", b"\0" * 8)
    with pytest.raises(SafetensorsError, match="not declared"):
        w.write("zzz", b"")
    with pytest.raises(SafetensorsError, match=r"'a'.*got 4 bytes"):
        w.write("a", b"\0" * 4)
    with pytest.raises(SafetensorsError, match=r"'a'.*declared F32 \[2\], got F64 \[2\]"):
        w.write("a", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(SafetensorsError, match=r"'a'.*got F32 \[3\]"):
        w.write("a", np.zeros(3, dtype=np.float32))
    w.write("a", torch.ones(2))
    with pytest.raises(SafetensorsError, match=r"'a'.*already written"):
        w.write("a", torch.ones(2))
    with pytest.raises(SafetensorsError, match="'b' and 1 more declared but not written"):
        w.close()
    w.write("b", torch.tensor(5))
    w.write("c", b"")
    with pytest.raises(SafetensorsError, match="all declared tensors are written"):
        w.write("d", b"")
    blob = w.close()
    assert blob.size == w.total_size and w.close() is blob
    with pytest.raises(SafetensorsError, match="closed"):
        w.write("a", b"")


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        ([("a", "F32", (1,)), ("a", "F32", (1,))], "duplicate tensor name 'a'"),
        ([("a", "F99", (1,))], "'a'.*F99"),
        ([("a", "F32", (-1,))], "'a'.*non-negative"),
        ([("__metadata__", "F32", (1,))], "invalid tensor name"),
        ([("a", "F32", (True,))], "'a'.*non-negative"),
        ([("a", "F32", (1.0,))], "'a'.*non-negative"),
    ],
)
def test_writer_rejects_bad_specs(specs: list[tuple[str, str, tuple[int, ...]]], match: str) -> None:
    sink = io.BytesIO()
    with pytest.raises(HeaderError, match=match):
        SafetensorsWriter(sink, specs)
    assert sink.getvalue() == b""


def test_write_safetensors_file_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(SafetensorsError, match=r"'bad'.*sparse"):
        write_safetensors_file(path, {"ok": torch.ones(1000), "bad": sparse})
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"previous version")
    with pytest.raises(SafetensorsError):
        write_safetensors_file(path, {"ok": torch.ones(2), "bad": sparse})
    assert path.read_bytes() == b"previous version"
    assert list(tmp_path.iterdir()) == [path]
    blob = write_safetensors_file(path, {"ok": torch.ones(2)})
    assert verify_file(path) == blob and list(tmp_path.iterdir()) == [path]


def test_writer_accepts_numpy_integer_dims() -> None:
    w = SafetensorsWriter(io.BytesIO(), [("a", "U8", (np.int64(2), np.int32(3)))])
    assert w.header.entry("a").shape == (2, 3)
