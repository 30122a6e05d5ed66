"""The global data order read through Ray Data: two simulated ranks over the DataIterators that Ray Train hands
its workers for NON-split datasets (`DataConfig.configure`, what `get_dataset_shard` returns) yield exactly the
rows, in the order and with the row keys, of the in-memory path; a resume on another world size continues there.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neobert.schema import PACKED_SCHEMA

pytestmark = pytest.mark.integration

PACK = 16


def packed_table(uid0: int, lengths: list[int]) -> pa.Table:
    """One segment per row; every token of row i is its uid (uid0 + i)."""
    return pa.table(
        {
            "input_ids": pa.array([[uid0 + i] * n for i, n in enumerate(lengths)], pa.list_(pa.int32())),
            "position_ids": pa.array([list(range(n)) for n in lengths], pa.list_(pa.int32())),
            "cu_seqlens": pa.array([[0, n] for n in lengths], pa.list_(pa.int32())),
            "max_seqlen": pa.array(lengths, pa.int32()),
            "num_tokens": pa.array(lengths, pa.int32()),
            "num_segments": pa.array([1] * len(lengths), pa.int32()),
        },
        schema=PACKED_SCHEMA,
    )


def write_packed_dir(root, uid0: int, shard_rows: list[int], seed: int) -> pa.Table:
    """A packed dir (train/part-*.parquet, small row groups) as jobs/preprocess.py writes it; returns all rows."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    tables, uid = [], uid0
    for i, n in enumerate(shard_rows):
        t = packed_table(uid, rng.integers(4, PACK + 1, n).tolist())
        pq.write_table(t, root / "train" / f"part-{i:05d}.parquet", row_group_size=5)
        tables.append(t)
        uid += n
    return pa.concat_tables(tables)


def row_uids(batch) -> list[int]:
    cu = batch.cu_seqlens.numpy()
    return [int(batch.input_ids[int(s)]) for s in cu[:-1] if s < batch.num_tokens]


def steps_of(sources, n: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for _ in range(n):
        uids, keys = [], []
        for s in sources:  # rank order
            for b in s.next_step():
                uids += row_uids(b)
                keys += b.row_keys.tolist()
        out.append((uids, keys))
    return out


def test_ray_iterators_give_the_in_memory_order_on_two_ranks_and_resume_on_three(ray_session, tmp_path):
    from pipelines.train.data import (
        GlobalStepSource,
        MixtureSection,
        SourceSection,
        check_sources,
        dataset_name,
        ray_open_epochs,
        source_data_config,
        source_datasets,
    )

    tables = {
        "wiki": write_packed_dir(tmp_path / "wiki", 1000, [7, 5, 4], seed=1),
        "books": write_packed_dir(tmp_path / "books", 5000, [13, 6], seed=2),
    }
    cfg = MixtureSection(
        sources=[
            SourceSection("wiki", str(tmp_path / "wiki"), weight=0.25),
            SourceSection("books", str(tmp_path / "books"), weight=0.75),
        ],
        global_batch_tokens=6 * PACK,
        shuffle_window_rows=8,
        seed=3,
        prefetch_steps=2,
    )
    check_sources(cfg, PACK)
    steps, stop = 14, 6  # 84 rows: both sources roll over into their next epochs

    def ray_sources(world: int, m: int, state=None, max_steps=None):
        # What Ray Train hands each worker for these datasets (get_dataset_shard returns per_rank[rank][name]).
        per_rank = source_data_config().configure(
            source_datasets(cfg), world_size=world, worker_handles=None, worker_node_ids=None
        )
        return [
            GlobalStepSource(
                cfg,
                ray_open_epochs({s.name: per_rank[r][dataset_name(s.name)] for s in cfg.sources}),
                pack_tokens=PACK, rows_per_micro_batch=m, rank=r, world_size=world, state=state,
                max_steps=max_steps, validate=False,
            )
            for r in range(world)
        ]  # fmt: skip

    def memory_source():
        def opener(t):
            return lambda epoch: iter(t.to_batches(max_chunksize=4))

        mem_cfg = MixtureSection(**{**cfg.__dict__, "prefetch_steps": 0})
        return GlobalStepSource(
            mem_cfg, {n: opener(t) for n, t in tables.items()}, pack_tokens=PACK, rows_per_micro_batch=3
        )

    ref = steps_of([memory_source()], steps)

    ranks = ray_sources(world=2, m=3, max_steps=stop)
    got = steps_of(ranks, stop)
    state = ranks[0].state_dict()
    assert all(r.state_dict() == state for r in ranks)
    for r in ranks:
        r.close()
    assert got == ref[:stop]

    resumed = ray_sources(world=3, m=1, state=json.loads(json.dumps(state)), max_steps=steps - stop)
    got_after = steps_of(resumed, steps - stop)
    for r in resumed:
        r.close()
    assert got_after == ref[stop:]
    final = resumed[0].state_dict()["sources"]
    assert final["wiki"]["epoch"] >= 1 and final["books"]["epoch"] >= 1
    assert final["wiki"]["rows"] + final["books"]["rows"] == steps * 6
