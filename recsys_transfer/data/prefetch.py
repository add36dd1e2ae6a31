"""Run an iterator one item ahead in a background thread.

Used where the producer's work releases the GIL (file reads, polars parsing and expressions), so that on a
machine with few cores the producer of item k+1 overlaps the consumer of item k. At most ``depth`` items wait
in the queue, so memory grows by ``depth`` items only. An exception in the producer is re-raised in the
consumer, at the position of the item that failed; closing the consumer early stops the producer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
_END = object()


@dataclass
class _Failure:
    exc: BaseException


def read_ahead(items: Iterable[T], name: str = "read-ahead", depth: int = 1) -> Iterator[T]:
    """Yield ``items`` in order, producing them in a background thread at most ``depth`` items ahead."""
    slot: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slot.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failure(exc))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = slot.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
