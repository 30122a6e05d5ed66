"""Rows/s of the world-size-independent global order (`pipelines.train.data`) vs the `streaming_split` path.

Both paths read the same packed dir through Ray Data on a local Ray instance, collate micro-batches of
`--rows` rows with the same collate (validation on for both, as `PackedCollateFn` does by default) and are
consumed by W simulated ranks, one thread each, in this process:

  split   DataConfig(datasets_to_split=["train"]): `streaming_split(W, equal=True)`, each rank iterates its
          shard with `iter_torch_batches(collate_fn=PackedCollateFn, local_shuffle_buffer_size=...)`
  global  DataConfig(datasets_to_split=[]): every rank reads the whole dataset (`ds.iterator()`) and keeps its
          part of each global step (`GlobalStepSource`, window shuffle, background step assembly)

It reports the training rows delivered per second to all ranks together (one epoch of the dataset) and the
ratio global/split. Without `--packed-dir` it writes a synthetic packed dir (random segment lengths).

    python bench/data_order.py --num-rows 8000 --pack 512 --ranks 1 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neobert.schema import PACKED_SCHEMA


def synthetic_packed_dir(root: Path, num_rows: int, pack: int, num_shards: int = 8, seed: int = 0) -> None:
    """Packed rows of 1-6 segments filling 60-100% of `pack` tokens, in `num_shards` Parquet shards."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    for shard, rows in enumerate(np.array_split(np.arange(num_rows), num_shards)):
        ids, pos, cus, mx, nt, ns = [], [], [], [], [], []
        for _ in rows:
            n = int(rng.integers(int(0.6 * pack), pack + 1))
            k = int(rng.integers(1, 7))
            cuts = np.sort(rng.choice(np.arange(1, n), size=min(k - 1, n - 1), replace=False))
            cu = np.concatenate([[0], cuts, [n]]).astype(np.int32)
            seg = np.diff(cu)
            ids.append(rng.integers(5, 30000, n, dtype=np.int32))
            pos.append(np.concatenate([np.arange(s, dtype=np.int32) for s in seg]))
            cus.append(cu)
            mx.append(int(seg.max()))
            nt.append(n)
            ns.append(len(seg))
        t = pa.table(
            {
                "input_ids": pa.array(ids, pa.list_(pa.int32())),
                "position_ids": pa.array(pos, pa.list_(pa.int32())),
                "cu_seqlens": pa.array(cus, pa.list_(pa.int32())),
                "max_seqlen": pa.array(mx, pa.int32()),
                "num_tokens": pa.array(nt, pa.int32()),
                "num_segments": pa.array(ns, pa.int32()),
            },
            schema=PACKED_SCHEMA,
        )
        pq.write_table(t, root / "train" / f"part-{shard:05d}.parquet", row_group_size=1000)


def _consume(fns: list, rows_per_call: int) -> tuple[float, int]:
    """Run one consumer thread per rank; (seconds, rows delivered in total)."""
    counts = [0] * len(fns)
    errors: list[BaseException] = []

    def work(r: int) -> None:
        try:
            for n in fns[r]():
                counts[r] += n
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(fns))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, sum(counts)


def bench_split(path: str, world: int, m: int, pack: int, shuffle: int) -> tuple[float, int]:
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from pipelines.mlm.packed_io import read_packed
    from pipelines.train.collate import PackedCollateFn

    its = DataConfig(
        datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True)
    ).configure({"train": read_packed(path)}, world_size=world, worker_handles=None, worker_node_ids=None)
    collate = PackedCollateFn(m * pack, max_pad_segment=pack, pack_tokens=pack)

    def rank(r: int):
        def gen():
            for b in its[r]["train"].iter_torch_batches(
                batch_size=m, collate_fn=collate, drop_last=True, prefetch_batches=4,
                local_shuffle_buffer_size=shuffle or None, local_shuffle_seed=r if shuffle else None, device="cpu",
            ):  # fmt: skip
                yield b.num_rows

        return gen

    return _consume([rank(r) for r in range(world)], m)


def bench_global(path: str, world: int, m: int, pack: int, window: int, num_rows: int) -> tuple[float, int]:
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from pipelines.mlm.packed_io import read_packed
    from pipelines.train.data import (
        GlobalStepSource,
        MixtureSection,
        SourceSection,
        dataset_name,
        ray_open_epochs,
    )

    cfg = MixtureSection(
        sources=[SourceSection("train", path)],
        global_batch_tokens=world * m * pack,
        shuffle_window_rows=window,
        prefetch_steps=4,
    )
    its = DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)).configure(
        {dataset_name("train"): read_packed(path)},
        world_size=world,
        worker_handles=None,
        worker_node_ids=None,
    )
    steps = num_rows // (world * m)  # one epoch, as the split path

    def rank(r: int):
        def gen():
            with GlobalStepSource(
                cfg, ray_open_epochs({"train": its[r][dataset_name("train")]}, prefetch_batches=4),
                pack_tokens=pack, rows_per_micro_batch=m, rank=r, world_size=world, max_steps=steps, validate=True,
            ) as src:  # fmt: skip
                for _ in range(steps):
                    yield sum(b.num_rows for b in src.next_step())

        return gen

    return _consume([rank(r) for r in range(world)], m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--packed-dir", default="", help="a packed dir of jobs/preprocess.py (default: synthetic)"
    )
    ap.add_argument("--num-rows", type=int, default=8000, help="rows of the synthetic packed dir")
    ap.add_argument("--pack", type=int, default=512, help="pack_tokens (must match --packed-dir)")
    ap.add_argument("--rows", type=int, default=8, help="rows per micro-batch")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to measure")
    ap.add_argument("--shuffle", type=int, default=1024, help="shuffle buffer (split) / window (global) rows")
    ap.add_argument("--repeats", type=int, default=2, help="measurements per setting (the best is kept)")
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        path = args.packed_dir
        if not path:
            path = str(Path(tmp) / "packed")
            synthetic_packed_dir(Path(path), args.num_rows, args.pack)
        num_rows = pq.ParquetDataset(str(Path(path) / "train")).read(columns=["num_tokens"]).num_rows
        results = []
        for world in args.ranks:
            best = {}
            for name, fn in (
                ("split", lambda w=world: bench_split(path, w, args.rows, args.pack, args.shuffle)),
                (
                    "global",
                    lambda w=world: bench_global(path, w, args.rows, args.pack, args.shuffle, num_rows),
                ),
            ):
                for _ in range(args.repeats):
                    secs, rows = fn()
                    best[name] = max(best.get(name, 0.0), rows / secs)
            rec = {
                "ranks": world,
                "rows_per_s_split": round(best["split"], 1),
                "rows_per_s_global": round(best["global"], 1),
                "ratio_global_over_split": round(best["global"] / best["split"], 3),
                "num_rows": num_rows,
                "pack_tokens": args.pack,
                "rows_per_micro_batch": args.rows,
            }
            results.append(rec)
            print(json.dumps(rec), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
