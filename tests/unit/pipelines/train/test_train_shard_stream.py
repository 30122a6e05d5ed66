"""ShardStepSource (the StepSource over a streaming_split shard) without Ray: its data position is what the steps
consumed, rows are keyed by their consumed ordinal, and a resume it cannot continue exactly is refused."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipelines.train.config import ConfigError
from pipelines.train.shard_stream import ShardStepSource, check_resume


class FakeBatch:
    def __init__(self, name: str, num_rows: int):
        self.name, self.num_rows, self.row_keys = name, num_rows, None

    def with_row_keys(self, keys):
        self.row_keys = np.asarray(keys)
        return self


class FakeShard:
    """`iter_torch_batches` yields `num_batches` batches "e<epoch>b<index>" of `batch_size` rows; the epoch is
    recovered from the shuffle seed's call order (each call opens the next epoch)."""

    def __init__(self, num_batches: int):
        self.num_batches, self.opened, self.kwargs = num_batches, 0, []

    def iter_torch_batches(self, **kwargs):
        self.kwargs.append(kwargs)
        epoch = self.start_epoch + self.opened
        self.opened += 1
        return (FakeBatch(f"e{epoch}b{i}", kwargs["batch_size"]) for i in range(self.num_batches))


def source(shard, *, state=None, start_step=0, num_steps=5, micro=1, rows=2, world=1, rank=0):
    shard.start_epoch = state["epoch"] if state else 0
    return ShardStepSource(
        shard, collate=None, rows_per_micro_batch=rows, num_micro_batches=micro, shuffle_buffer_rows=4,
        prefetch_batches=1, read_ahead_batches=4, seed=0, rank=rank, world_size=world, start_step=start_step,
        num_steps=num_steps, state=state,
    )  # fmt: skip


def test_position_is_what_the_steps_consumed_not_what_was_read_ahead():
    shard = FakeShard(num_batches=3)
    state = {
        "kind": "shard",
        "epoch": 1,
        "rows_consumed_in_epoch": 4,
        "rows_per_micro_batch": 2,
        "world_size": 1,
    }
    src = source(shard, state=state, start_step=5, num_steps=10)
    got = []
    for _ in range(5):
        (batch,) = src.next_step()
        time.sleep(0.02)  # let the thread run ahead
        s = src.state_dict()
        got.append((batch.name, s["epoch"], s["rows_consumed_in_epoch"]))
    with pytest.raises(RuntimeError, match="train stream ended"):  # budget spent: a bug if asked for more
        src.next_step()
    src.close()
    assert got == [("e1b2", 1, 6), ("e2b0", 2, 2), ("e2b1", 2, 4), ("e2b2", 2, 6), ("e3b0", 3, 2)]
    assert shard.opened == 3


def test_row_keys_are_consumed_ordinals_over_ranks_and_micro_batches():
    keys = {}
    for rank in (0, 1):
        src = source(FakeShard(num_batches=8), num_steps=2, micro=2, rows=3, world=2, rank=rank)
        for step in range(2):
            for micro, b in enumerate(src.next_step()):
                keys[(step, rank, micro)] = b.row_keys.tolist()
        src.close()
    flat = sorted(k for v in keys.values() for k in v)
    assert flat == list(range(2 * 2 * 2 * 3))  # every row of every rank, micro-batch and step: one key each
    assert keys[(1, 0, 1)] == [((1 * 2 + 0) * 2 + 1) * 3 + i for i in range(3)]


@pytest.mark.parametrize(
    ("num_batches", "state", "match"),
    [
        (0, None, "yielded no full micro-batch"),
        (2, {"kind": "shard", "epoch": 3, "rows_consumed_in_epoch": 8, "rows_per_micro_batch": 2, "world_size": 1},
         "past the end of epoch 3"),
    ],
)  # fmt: skip
def test_empty_epochs_and_resume_past_the_end_are_config_errors(num_batches, state, match):
    src = source(FakeShard(num_batches=num_batches), state=state, start_step=1 if state else 0)
    with pytest.raises(ConfigError, match=match):
        src.next_step()
    src.close()


def saved(**kw):
    return {"kind": "shard", "epoch": 1, "rows_consumed_in_epoch": 6, "rows_per_micro_batch": 2, "world_size": 2,
            **kw}  # fmt: skip


def test_resume_with_another_micro_batch_size_mid_epoch_is_refused_with_the_fix():
    with pytest.raises(
        ConfigError, match=r"6 rows into epoch 1.*--train.tokens_per_micro_batch giving 2 rows"
    ):
        check_resume(saved(), world_size=2, rows_per_micro_batch=4)
    check_resume(saved(rows_consumed_in_epoch=0), world_size=2, rows_per_micro_batch=4)  # epoch start: exact
    check_resume(saved(), world_size=2, rows_per_micro_batch=2)
    check_resume(None, world_size=3, rows_per_micro_batch=4)


def test_resume_with_another_worker_count_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="--scaling.num_workers=2"):
        check_resume(saved(), world_size=4, rows_per_micro_batch=2)
    with pytest.raises(ConfigError, match="kind"):
        check_resume(saved(kind="sampled"), world_size=2, rows_per_micro_batch=2)
