"""`EpochPrefetcher`: read a data source epoch after epoch in a background thread, across epoch ends."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger("neobert.train")

T = TypeVar("T")


@dataclass(frozen=True)
class EpochEnd:
    """Stream marker: epoch `epoch` was read to its end and held `num_batches` batches (skipped ones included)."""

    epoch: int
    num_batches: int


@dataclass(frozen=True)
class _ProducerError:
    exc: BaseException


_PRODUCER_DONE = object()


class EpochPrefetcher(Generic[T]):
    """Reads a dataset shard epoch after epoch in a daemon thread, into a bounded queue, across epoch ends.

    Why: opening an epoch's iterator restarts the shard's streaming execution (for `streaming_split`, after a
    barrier that polls every 0.1 s until all workers arrive) and refills the local shuffle buffer; Ray's
    prefetching only starts with the new iterator, so the first batch of every epoch used to stall the training
    loop (H100, base preset: `data/wait_fraction` 0.1% inside epochs, 6.5-7.9% in windows with an epoch end).
    Here the thread opens epoch e+1 as soon as it has read epoch e's last batch, while the training loop still
    has up to `queue_size` batches of epoch e queued.

    Items, in order: `(epoch, index, batch)` per batch (`index` counts from 0 within the epoch; the first `skip`
    batches of `start_epoch` are read and dropped, for a resume), and `EpochEnd(epoch, num_batches)` after an
    epoch's last batch. `open_epoch(e)` must return epoch e's iterable (each worker's own seeded shuffle).
    The stream ends
    - after `max_batches` batches (None = endless), without opening another epoch: an epoch nobody reads would
      leave the other workers' `streaming_split` barrier waiting, and its iterator would hold resources;
    - after an epoch that held no batch, or fewer than `skip` (its `EpochEnd` still comes, so the consumer can
      say why).
    An exception in the thread is re-raised by the consumer's `next()`, the same object with the thread's
    traceback. `close()` (also on `with` exit) stops the thread and closes the open epoch's iterator; the thread
    is a daemon, so one blocked inside the shard (e.g. at a barrier) never holds up the process.
    """

    def __init__(
        self,
        open_epoch: Callable[[int], Iterable[T]],
        *,
        start_epoch: int = 0,
        skip: int = 0,
        max_batches: int | None = None,
        queue_size: int = 2,
        name: str = "epoch-prefetch",
    ) -> None:
        if queue_size < 1 or skip < 0 or start_epoch < 0 or (max_batches is not None and max_batches < 0):
            raise ValueError(
                f"EpochPrefetcher needs queue_size >= 1 and skip, start_epoch, max_batches >= 0; got "
                f"queue_size={queue_size}, skip={skip}, start_epoch={start_epoch}, max_batches={max_batches}"
            )
        self._open_epoch = open_epoch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce, args=(start_epoch, skip, max_batches), name=name, daemon=True
        )
        self._thread.start()

    # -- producer (background thread) -------------------------------------------------------------------------
    def _put(self, item: Any) -> bool:
        """Blocking put that gives up once `close()` was called (False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, epoch: int, skip: int, max_batches: int | None) -> None:
        produced = 0
        try:
            while max_batches is None or produced < max_batches:
                it = iter(self._open_epoch(epoch))
                index = 0
                try:
                    # Check the budget before every next(): never request a batch nobody will consume.
                    while not self._stop.is_set() and (max_batches is None or produced < max_batches):
                        try:
                            batch = next(it)
                        except StopIteration:
                            break
                        if index >= skip:
                            if not self._put((epoch, index, batch)):
                                return
                            produced += 1
                        index += 1
                    else:
                        return  # stopped, or the budget is spent mid-epoch: no EpochEnd, no new epoch
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()  # Ray: ends the epoch's iteration now (notifies the split coordinator)
                if not self._put(EpochEnd(epoch, index)) or index == 0 or index < skip:
                    return
                epoch, skip = epoch + 1, 0
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(_ProducerError(exc))
        finally:
            self._put(_PRODUCER_DONE)

    # -- consumer -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, int, T] | EpochEnd]:
        return self

    def __next__(self) -> tuple[int, int, T] | EpochEnd:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _PRODUCER_DONE:
            self._done = True
            raise StopIteration
        if isinstance(item, _ProducerError):
            self._done = True
            self.close()
            raise item.exc  # the thread's traceback stays attached (exc.__traceback__)
        return item

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait up to `timeout_s` for it (it may be blocked inside the shard: a daemon)."""
        self._stop.set()
        self._done = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.debug("%s still blocked in the data source after close(); left to exit with the process",
                      self._thread.name)  # fmt: skip

    def __enter__(self) -> EpochPrefetcher[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
