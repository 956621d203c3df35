from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from fedhpc.common.streams import prefetch, read_ahead


def test_yields_every_item_in_order() -> None:
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))


def test_source_error_reaches_the_consumer_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("disk gone")

    got: list[int] = []
    with pytest.raises(ValueError, match="disk gone"):
        for item in prefetch(source()):
            got.append(item)
    assert got == [1, 2]


def test_consumer_stopping_early_stops_and_closes_the_producer() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    stream = prefetch(source(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert closed.wait(5)


def test_producer_runs_ahead_of_the_consumer_up_to_depth() -> None:
    produced: list[int] = []

    def source() -> Iterator[int]:
        for i in range(100):
            produced.append(i)
            yield i

    stream = prefetch(source(), depth=3)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    # One consumed, three queued, one more held by the blocked producer: never the whole source.
    assert 4 <= len(produced) <= 5
    stream.close()


def test_read_ahead_yields_the_stream_in_reused_buffers() -> None:
    import io
    import os

    data = os.urandom(10 * 1000 + 123)
    source = io.BytesIO(data)
    seen_buffers: set[int] = set()
    out = bytearray()
    for view in read_ahead(source.readinto, chunk_bytes=1000, depth=2):
        seen_buffers.add(id(view.obj))
        out += view  # consume before asking for the next: the buffer is then reused
    assert bytes(out) == data
    assert len(seen_buffers) <= 4  # depth + 2, not one per chunk


def test_read_ahead_of_an_empty_stream_yields_nothing() -> None:
    import io

    assert list(read_ahead(io.BytesIO(b"").readinto, chunk_bytes=16)) == []
