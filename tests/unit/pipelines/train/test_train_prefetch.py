"""EpochPrefetcher (the train loader's background thread, epoch after epoch), without Ray: a fake shard whose epochs cost time to start, like a restarted streaming execution."""

from __future__ import annotations

import threading
import time
import traceback
from collections import defaultdict

import pytest

from pipelines.train.prefetch import EpochEnd, EpochPrefetcher


class FakeShard:
    """`iter_batches(epoch)` yields `num_batches` batches ("e<epoch>b<index>"); the first next() of an epoch
    sleeps `start_delay_s` (the executor restart / barrier of a real shard). Records when each epoch's first
    batch is requested, which batches were read and which epoch iterators were closed."""

    def __init__(self, num_batches=4, start_delay_s=0.0, fail_at=None, block_at=None):
        self.num_batches, self.start_delay_s = num_batches, start_delay_s
        self.fail_at, self.block_at = fail_at, block_at  # (epoch, index)
        self.first_requested: dict[int, threading.Event] = defaultdict(threading.Event)
        self.unblock = threading.Event()
        self.opened: list[int] = []
        self.read: list[tuple[int, int]] = []
        self.closed: list[int] = []

    def iter_batches(self, epoch: int):
        self.opened.append(epoch)
        return self._epoch_batches(epoch)

    def _epoch_batches(self, epoch: int):
        self.first_requested[epoch].set()
        try:
            time.sleep(self.start_delay_s)
            for i in range(self.num_batches):
                if (epoch, i) == self.fail_at:
                    raise RuntimeError(f"shard failed at epoch {epoch} batch {i}")
                if (epoch, i) == self.block_at:
                    self.unblock.wait()
                self.read.append((epoch, i))
                yield f"e{epoch}b{i}"
        finally:
            self.closed.append(epoch)


def items(stream):
    return [it if isinstance(it, EpochEnd) else (it[0], it[1], it[2]) for it in stream]


def test_order_markers_and_budget():
    shard = FakeShard(num_batches=3)
    with EpochPrefetcher(shard.iter_batches, max_batches=7, queue_size=2) as stream:
        got = items(stream)
    assert got == [
        (0, 0, "e0b0"), (0, 1, "e0b1"), (0, 2, "e0b2"), EpochEnd(0, 3),
        (1, 0, "e1b0"), (1, 1, "e1b1"), (1, 2, "e1b2"), EpochEnd(1, 3),
        (2, 0, "e2b0"),
    ]  # fmt: skip
    # The budget is spent at e2b0: epoch 2 is not read further and epoch 3 is never opened.
    assert shard.opened == [0, 1, 2] and shard.read[-1] == (2, 0) and shard.closed == [0, 1, 2]


@pytest.mark.parametrize(
    ("start_epoch", "skip", "max_batches", "want"),
    [
        (1, 2, 3, [(1, 2, "e1b2"), EpochEnd(1, 3), (2, 0, "e2b0"), (2, 1, "e2b1")]),
        (1, 3, 1, [EpochEnd(1, 3), (2, 0, "e2b0")]),  # checkpoint at the epoch's last batch
        (
            0,
            0,
            3,
            [(0, 0, "e0b0"), (0, 1, "e0b1"), (0, 2, "e0b2")],
        ),  # ends with the epoch: no marker, no epoch 1
    ],
)
def test_resume_skips_consumed_batches(start_epoch, skip, max_batches, want):
    shard = FakeShard(num_batches=3)
    with EpochPrefetcher(
        shard.iter_batches, start_epoch=start_epoch, skip=skip, max_batches=max_batches
    ) as s:
        assert items(s) == want
    assert shard.opened == sorted({i[0] if isinstance(i, tuple) else i.epoch for i in want})


def test_next_epoch_starts_before_the_current_one_is_consumed():
    """The point of the thread: epoch e+1's first batch is requested (its slow start under way) while the
    consumer still holds epoch e's last batch in the queue. A loader that opens the next epoch only when asked
    for its first batch fails the wait below."""
    shard = FakeShard(num_batches=4, start_delay_s=0.3)
    waits = []
    with EpochPrefetcher(shard.iter_batches, max_batches=8, queue_size=2) as stream:
        for item in stream:
            if isinstance(item, EpochEnd):
                continue
            epoch, index, _ = item
            if (epoch, index) == (0, 2):  # epoch 0's last batch (index 3) is not consumed yet
                assert shard.first_requested[1].wait(5.0), "epoch 1 was not opened ahead of time"
                deadline = (
                    time.perf_counter() + 5.0
                )  # a long 'training step': epoch 1's start is paid meanwhile
                while (1, 0) not in shard.read and time.perf_counter() < deadline:
                    time.sleep(0.01)
            t0 = time.perf_counter()
            if (epoch, index) == (0, 3):
                nxt = next(stream)
                assert nxt == EpochEnd(0, 4)
                nxt = next(stream)
                waits.append(time.perf_counter() - t0)
                assert nxt[:2] == (1, 0)
    # Not a timing test (2 shared cores), only a sanity bound: without read-ahead this wait would be >= 0.3 s.
    print(f"wait for epoch 1's first batch: {waits[0] * 1e3:.1f} ms (epoch start costs 300 ms)")
    assert waits[0] < 0.25


def test_exception_in_the_thread_reaches_the_consumer_with_its_traceback():
    shard = FakeShard(num_batches=3, fail_at=(1, 1))
    stream = EpochPrefetcher(shard.iter_batches, queue_size=2)
    got = []
    with pytest.raises(RuntimeError, match="shard failed at epoch 1 batch 1") as err:
        for item in stream:
            got.append(item)
    assert got[-2:] == [EpochEnd(0, 3), (1, 0, "e1b0")]
    frames = [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert "_epoch_batches" in frames and "_produce" in frames, frames  # raised where it happened
    assert next(iter(stream), None) is None  # the stream is over
    stream._thread.join(2.0)
    assert not stream._thread.is_alive() and shard.closed == [0, 1]


def test_exception_opening_an_epoch_propagates():
    def open_epoch(epoch):
        if epoch == 1:
            raise ValueError("cannot open epoch 1")
        return iter(["a", "b"])

    with EpochPrefetcher(open_epoch) as stream, pytest.raises(ValueError, match="cannot open epoch 1"):
        items(stream)


def test_close_stops_a_thread_blocked_on_the_full_queue():
    shard = FakeShard(num_batches=1000)
    stream = EpochPrefetcher(shard.iter_batches, queue_size=2)  # endless
    assert next(stream) == (0, 0, "e0b0")
    stream.close()
    assert not stream._thread.is_alive()
    assert shard.closed == [0]  # the open epoch's iterator was closed
    assert len(shard.read) <= 4  # bounded read-ahead: 1 consumed + 2 queued + 1 in hand
    assert next(stream, None) is None


def test_close_does_not_hang_on_a_thread_blocked_in_the_shard():
    shard = FakeShard(num_batches=3, block_at=(0, 1))
    stream = EpochPrefetcher(shard.iter_batches)
    assert next(stream) == (0, 0, "e0b0")
    t0 = time.perf_counter()
    stream.close(timeout_s=0.2)
    assert time.perf_counter() - t0 < 2.0 and stream._thread.daemon
    shard.unblock.set()  # let it finish: it then sees the stop flag
    stream._thread.join(2.0)
    assert not stream._thread.is_alive() and shard.closed == [0]


def test_consumer_exception_stops_the_thread():
    shard = FakeShard(num_batches=1000)
    with pytest.raises(KeyError), EpochPrefetcher(shard.iter_batches) as stream:
        next(stream)
        raise KeyError("training step failed")
    assert not stream._thread.is_alive()


@pytest.mark.parametrize(("num_batches", "skip"), [(0, 0), (2, 3)])
def test_empty_or_short_epoch_ends_the_stream_after_its_marker(num_batches, skip):
    shard = FakeShard(num_batches=num_batches)
    with EpochPrefetcher(shard.iter_batches, skip=skip) as stream:  # endless: must still stop
        assert items(stream) == [EpochEnd(0, num_batches)]
    assert shard.opened == [0]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="queue_size >= 1"):
        EpochPrefetcher(iter, queue_size=0)
