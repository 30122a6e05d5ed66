"""`ShardStepSource`: the `StepSource` over a Ray Train dataset shard (`streaming_split`) + `EpochPrefetcher`.

Data order: "train" is split across workers with `streaming_split(equal=True)` (Ray Train's `DataConfig`) under
`preserve_order=True`, which makes the split deterministic: for a fixed input order and worker count every worker
sees the same rows in every run, and every worker gets the same number of rows per epoch, hence the same number of
micro-batches (drop_last=True), so the workers stay in lockstep. Each worker shuffles locally with a buffer seeded
by (seed, epoch, rank); each epoch reshuffles. A daemon thread (`EpochPrefetcher`) reads the shard epoch after
epoch into a bounded queue, so the next epoch's slow start overlaps the current epoch's last steps.

Position: Ray restarts a shard from its beginning, so the state holds (epoch, rows consumed in that epoch) counted
from what the steps consumed, not from what the thread read ahead; a resumed source re-opens the epoch with the
same shuffle seed and skips the consumed rows. The row order of a locally shuffled shard depends on the worker
count and on the rows per micro-batch, so a resume that changes either mid-epoch cannot continue exactly and is
refused (`ConfigError` naming the setting to restore).

Row keys: row i of micro-batch m of step s on rank r gets the key ((s * W + r) * M + m) * R + i, its ordinal in
the consumed order; masks are drawn per row from that key.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipelines.train.collate import PackedBatch
from pipelines.train.config import ConfigError
from pipelines.train.prefetch import EpochEnd, EpochPrefetcher

log = logging.getLogger("neobert.train")

KIND = "shard"


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**31 - 1)


def check_resume(state: dict[str, Any] | None, *, world_size: int, rows_per_micro_batch: int) -> None:
    """Refuse a saved position this source cannot continue exactly (the driver calls it before Ray starts)."""
    if not state:
        return
    if state.get("kind") != KIND:
        raise ConfigError(
            f"the checkpoint's data position is of kind {state.get('kind')!r}, this data source is {KIND!r}; "
            "resume with the data settings of the checkpoint or start a new run with another checkpoint.name"
        )
    if state["world_size"] != world_size:
        raise ConfigError(
            f"the checkpoint was written by {state['world_size']} workers but this run has {world_size}; each "
            f"worker's data position is its own shard's, so resume with --scaling.num_workers={state['world_size']} "
            "or start a new run with another --checkpoint.name"
        )
    saved = state["rows_per_micro_batch"]
    if saved != rows_per_micro_batch and state["rows_consumed_in_epoch"]:
        raise ConfigError(
            f"the checkpoint stopped {state['rows_consumed_in_epoch']} rows into epoch {state['epoch']} with "
            f"{saved} rows per micro-batch; this run has {rows_per_micro_batch}, and the shuffled row order of an "
            f"epoch depends on it, so it cannot continue at the next unseen row: resume with "
            f"--train.tokens_per_micro_batch giving {saved} rows (data.pack_tokens x {saved}), or start a new run "
            "with another --checkpoint.name"
        )


class ShardStepSource:
    """Steps of `num_micro_batches` collated micro-batches of `rows_per_micro_batch` rows from a dataset shard."""

    def __init__(
        self,
        shard: Any,
        *,
        collate: Any,
        rows_per_micro_batch: int,
        num_micro_batches: int,
        shuffle_buffer_rows: int,
        prefetch_batches: int,
        read_ahead_batches: int,
        seed: int,
        rank: int,
        world_size: int,
        start_step: int,
        num_steps: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        check_resume(state, world_size=world_size, rows_per_micro_batch=rows_per_micro_batch)
        self.rows, self.micro, self.rank, self.world = (
            rows_per_micro_batch,
            num_micro_batches,
            rank,
            world_size,
        )
        self.step = start_step
        self.epoch = state["epoch"] if state else 0
        self.rows_in_epoch = state["rows_consumed_in_epoch"] if state else 0
        self._skip = self.rows_in_epoch // rows_per_micro_batch

        def open_epoch(epoch: int):
            return shard.iter_torch_batches(
                batch_size=rows_per_micro_batch,
                collate_fn=collate,
                drop_last=True,
                prefetch_batches=prefetch_batches,
                local_shuffle_buffer_size=shuffle_buffer_rows or None,
                local_shuffle_seed=shuffle_seed(seed, epoch, rank) if shuffle_buffer_rows else None,
                device="cpu",
            )

        # Exactly the micro-batches the remaining steps consume: every worker opens the same epochs
        # (streaming_split needs all of them at each epoch's start) and none is opened past the last step.
        self._stream = EpochPrefetcher(
            open_epoch,
            start_epoch=self.epoch,
            skip=self._skip,
            max_batches=(num_steps - start_step) * num_micro_batches,
            queue_size=read_ahead_batches,
            name=f"train-data-rank{rank}",
        )

    def next_step(self) -> list[PackedBatch]:
        out = []
        for m in range(self.micro):
            batch = self._next_batch()
            first = ((self.step * self.world + self.rank) * self.micro + m) * self.rows
            out.append(batch.with_row_keys(np.arange(first, first + batch.num_rows, dtype=np.int64)))
        self.step += 1
        return out

    def _next_batch(self) -> PackedBatch:
        for item in self._stream:
            if isinstance(item, EpochEnd):
                self._check_epoch_end(item)
                self.epoch, self.rows_in_epoch, self._skip = item.epoch + 1, 0, 0
                continue
            self.epoch, index, batch = item
            self.rows_in_epoch = (index + 1) * self.rows
            return batch
        raise RuntimeError(
            f"rank {self.rank}: the train stream ended at epoch {self.epoch}, row {self.rows_in_epoch} before "
            f"step {self.step + 1} (its budget is the remaining steps x train.num_micro_batches)"
        )

    def _check_epoch_end(self, end: EpochEnd) -> None:
        if end.num_batches == 0:
            raise ConfigError(
                f"rank {self.rank}: the train shard yielded no full micro-batch of {self.rows} rows in epoch "
                f"{end.epoch}; use more data, fewer workers or a smaller train.tokens_per_micro_batch"
            )
        if end.num_batches < self._skip:
            raise ConfigError(
                f"rank {self.rank}: the resume position ({self._skip} micro-batches of {self.rows} rows) is past "
                f"the end of epoch {end.epoch} ({end.num_batches} micro-batches); the dataset changed since the "
                "checkpoint: restore it or start a new run with another --checkpoint.name"
            )
        if self.rank == 0 and end.epoch == 0:
            log.info(
                "epoch 0: %d micro-batches of %d rows per worker; each epoch leaves out a tail of < %d rows per "
                "worker (drop_last) and up to %d rows trimmed by streaming_split(equal=True)",
                end.num_batches, self.rows, self.rows, self.world - 1,
            )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "epoch": self.epoch,
            "rows_consumed_in_epoch": self.rows_in_epoch,
            "rows_per_micro_batch": self.rows,
            "world_size": self.world,
        }

    def close(self) -> None:
        self._stream.close()
