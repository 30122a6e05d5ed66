"""Packed shards on storage: their names, how they are written, and reading them back as a validated Ray Dataset.

Layout of a preprocessing output (local path or URI): `OUT/{train,eval}/part-*.parquet` (PACKED_SCHEMA, schema
version in the Parquet metadata), `OUT/report.json`, `OUT/report.html`, and optionally length views under
`OUT/views/min<L>/` with the same layout. A URI output also has `OUT/_MANIFEST.json` naming the complete file set
(object stores have no atomic rename, see `pipelines.io.StagedOutput`): readers then use only the files it names.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from neobert.schema import check_schema_version, validate_packed_table
from pipelines.io import filesystem_for, published_files


def shard_path(output_uri: str, split: str, index: int, stream: int = 0, num_streams: int = 1) -> str:
    name = f"part-{index:05d}" if num_streams == 1 else f"part-s{stream:03d}-{index:05d}"
    return f"{output_uri.rstrip('/')}/{split}/{name}.parquet"


def write_shard(
    fs: pafs.FileSystem, path: str, table: pa.Table, *, row_group_rows: int, compression: str
) -> None:
    """Fixed writer settings, so that a re-run writes bit-identical files."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        pq.write_table(
            table, f, row_group_size=row_group_rows, compression=compression, write_statistics=False
        )


def _read_packed_files(batch: pa.Table) -> Iterator[pa.Table]:
    """Ray task: stream the row groups of each Parquet shard, validating every one against the contract."""
    for uri in batch.column("uri").to_pylist():
        fs, path = filesystem_for(uri)
        pf = pq.ParquetFile(fs.open_input_file(path))
        check_schema_version(pf.schema_arrow.metadata, source=uri)
        offset = 0
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            validate_packed_table(table, source=uri, row_offset=offset)
            offset += table.num_rows
            yield table


def _parquet_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Sorted paths (inside `fs`) of the .parquet files directly under `directory`; [] when it does not exist."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))


def _split_files(path: str, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """Shard paths (inside the filesystem) of `path/split`: those the URI output's manifest names when it has
    one (files of an unfinished publish are ignored), else every .parquet file of the directory."""
    fs, root = filesystem_for(path)
    root = root.rstrip("/")
    listed = published_files(path) if "://" in path else None
    if listed is None:
        return fs, _parquet_files(fs, f"{root}/{split}")
    prefix = f"{split}/"
    return fs, sorted(
        f"{root}/{rel}"
        for rel in listed
        if rel.startswith(prefix) and rel.endswith(".parquet") and "/" not in rel[len(prefix) :]
    )


def has_packed_split(path: str, split: str) -> bool:
    """Whether `path/split` holds a .parquet shard (local path or any pyarrow-filesystem URI); no footer read."""
    return bool(_split_files(path, split)[1])


def packed_files(path: str, split: str = "train") -> list[str]:
    """Shard URIs of `path/split`, sorted, after checking each file's schema version (footers only)."""
    fs, files = _split_files(path, split)
    if not files:
        raise ValueError(
            f"no Parquet shards under {path}/{split}; build them with `python jobs/preprocess.py --output {path}` "
            "(the eval split exists only when eval_fraction > 0)"
        )
    uris = [f if "://" not in path else f"{path.rstrip('/')}/{split}/{f.rsplit('/', 1)[1]}" for f in files]

    def check(i: int) -> None:
        check_schema_version(pq.read_schema(files[i], filesystem=fs).metadata, source=uris[i])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(check, range(len(files))))
    return uris


def read_packed(path: str, split: str = "train", *, num_cpus: float = 0.25):  # -> ray.data.Dataset
    """Ray Dataset of packed rows (PACKED_SCHEMA) from `path/split`, in file and row order.

    The schema version of every shard is checked up front; each row group is validated against the contract as
    it streams (an error names file, row and field). `num_cpus` per read task is small so that reading never
    starves Ray Train workers of scheduling slots on small machines.
    """
    import ray

    uris = packed_files(path, split)
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=len(uris))
    ds.context.execution_options.preserve_order = True  # deterministic order for resumable training
    return ds.map_batches(_read_packed_files, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)
