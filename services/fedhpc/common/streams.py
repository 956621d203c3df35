"""Overlap I/O with CPU work on byte streams.

Reading a blob (socket or object store) and hashing it are both expensive and
both release the GIL, so running the read one step ahead in a thread makes a
verify-while-reading pipeline cost max(read, hash) instead of their sum.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(source: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Yield source's items, produced by a background thread at most `depth` items ahead.

    An exception in the source is re-raised in the consumer. If the consumer
    stops early, the producer is told to stop and its iterator is closed.
    """
    items: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(source)
        try:
            for item in iterator:
                if not put(item):
                    break
            else:
                put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Failure(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="fedhpc-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=30)


def read_ahead(
    readinto: Callable[[memoryview], int], chunk_bytes: int = 1 << 20, depth: int = 4
) -> Iterator[memoryview]:
    """Fill a small pool of reused buffers from readinto in a background thread.

    Each yielded view stays valid until the consumer asks for the next one, when
    its buffer goes back to the pool. Reusing buffers matters: touching fresh
    memory for every chunk costs page faults that rival the copy itself.
    readinto(view) returns the number of bytes read, 0 at the end.
    """
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(depth + 2):  # depth queued + one being filled + one held by the consumer
        free.put(bytearray(chunk_bytes))

    def fill() -> Iterator[tuple[bytearray, int]]:
        while True:
            buffer = free.get()
            view = memoryview(buffer)
            filled = 0
            while filled < chunk_bytes:
                n = readinto(view[filled:])
                if not n:
                    break
                filled += n
            if not filled:
                return
            yield buffer, filled
            if filled < chunk_bytes:
                return

    held: bytearray | None = None
    try:
        for buffer, filled in prefetch(fill(), depth=depth):
            if held is not None:
                free.put(held)
            held = buffer
            yield memoryview(buffer)[:filled]
    finally:
        if held is not None:
            free.put(held)
