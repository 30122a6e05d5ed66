"""Driver-side checks of the contracts between jobs, run before Ray starts.

A Ray Train run retries any worker error up to `failure.max_failures`, configuration errors included, and
a mismatch found inside the workers costs the whole start-up (minutes on a cluster) per attempt. What the
driver can check from a few small files is checked here, once, with an error that names the key to set.
Functions take plain values (paths, ints), not config objects, so any job can call them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("neobert.contracts")

REPORT_FILE = "report.json"


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _exists(path: str) -> bool:
    import pyarrow.fs as pafs

    from pipelines.io import filesystem_for  # pyarrow filesystems: local dirs and URIs alike

    fs, p = filesystem_for(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_packed_report(packed_dir: str) -> dict[str, Any] | None:
    """The `report.json` that jobs/preprocess.py wrote into `packed_dir`, or None when there is none."""
    from pipelines.io import filesystem_for

    path = _join(packed_dir, REPORT_FILE)
    fs, p = filesystem_for(path)
    try:
        with fs.open_input_stream(p) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path} cannot be read as JSON ({e}); re-run jobs/preprocess.py --output {packed_dir}"
        ) from None


def check_packed_dir(packed_dir: str) -> None:
    """`packed_dir` exists and holds train/*.parquet shards (the output of jobs/preprocess.py)."""
    from pipelines.mlm.packed_io import has_packed_split

    if not _exists(packed_dir):
        raise ValueError(
            f"data.packed_dir={packed_dir} does not exist; run `python jobs/preprocess.py --output {packed_dir}` "
            "first, or leave data.packed_dir empty to preprocess on the fly"
        )
    if not has_packed_split(packed_dir, "train"):
        raise ValueError(
            f"data.packed_dir={packed_dir} has no train/*.parquet shards; run `python jobs/preprocess.py --output "
            f"{packed_dir}` first or leave data.packed_dir empty to preprocess on the fly"
        )


def packed_pack_tokens(packed_dir: str, pack_tokens: int, *, user_set: bool) -> int:
    """The pack size to train with on `packed_dir`: the data's (from its report.json) unless the user set
    `data.pack_tokens`, in which case the two must agree. Without a report the configured value stands (the
    collate still checks every row).

    The data was packed once with a fixed size; a different `data.pack_tokens` cannot work, and would only
    fail later inside the workers.
    """
    report = read_packed_report(packed_dir)
    report = report or {}
    data_pack = report.get("pack_tokens", (report.get("config") or {}).get("pack_tokens"))
    if not isinstance(data_pack, int):
        return pack_tokens
    if data_pack == pack_tokens:
        return pack_tokens
    if user_set:
        raise ValueError(
            f"data.pack_tokens={pack_tokens} but {packed_dir} was packed with pack_tokens={data_pack} "
            f"({_join(packed_dir, REPORT_FILE)}); drop the override or set --data.pack_tokens {data_pack}, "
            f"or re-run preprocessing with `python jobs/preprocess.py --pack-tokens {pack_tokens} --output DIR`"
        )
    log.info("data.pack_tokens=%d taken from %s (the configured %d does not match the data)", data_pack,
             _join(packed_dir, REPORT_FILE), pack_tokens)  # fmt: skip
    return data_pack


def check_pack_fits_model(packed_dir: str, pack_tokens: int, max_position_embeddings: int) -> None:
    """Rows packed longer than the model's position range cannot train it: name both ways out."""
    if pack_tokens > max_position_embeddings:
        raise ValueError(
            f"{packed_dir} was packed with pack_tokens={pack_tokens} ({_join(packed_dir, REPORT_FILE)}), more than "
            f"model.max_position_embeddings={max_position_embeddings}; re-run preprocessing with "
            f"`python jobs/preprocess.py --pack-tokens {max_position_embeddings} --output DIR`, or train a model "
            f"with --model.max_position_embeddings {pack_tokens}"
        )


def tokens_per_micro_batch_for(pack_tokens: int, tokens_per_micro_batch: int, *, user_set: bool) -> int:
    """A micro-batch holds at least one packed row: an unset budget below the pack size is raised to it."""
    if tokens_per_micro_batch >= pack_tokens or user_set:
        return tokens_per_micro_batch  # a user value below the pack size is refused by the config itself
    log.info("train.tokens_per_micro_batch raised from %d to %d (one packed row)", tokens_per_micro_batch,
             pack_tokens)  # fmt: skip
    return pack_tokens


def check_validated_dir(input_dir: str, marker_name: str) -> None:
    """A contrastive input dir must be the output of jobs/validate_contrastive.py (its marker file present)."""
    if not _exists(input_dir):
        raise ValueError(
            f"data.input_dir={input_dir} does not exist; write it with "
            f"`python jobs/validate_contrastive.py --source NAME=PATH ... --output {input_dir}`"
        )
    if not _exists(_join(input_dir, marker_name)):
        raise ValueError(
            f"{input_dir} is not a validated contrastive dataset (no {marker_name}); validate it first: "
            f"`python jobs/validate_contrastive.py --source NAME=PATH ... --output {input_dir}`"
        )
