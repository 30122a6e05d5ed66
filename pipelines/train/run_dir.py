"""The run dir (`checkpoint.storage_path/checkpoint.name`, a local path or a URI) as the driver manages it.

Ray Train writes `checkpoint_<YYYY-MM-DD_HH-MM-SS.micro>/` dirs into it and, once a checkpoint's upload is
complete, lists it in `checkpoint_manager_snapshot.json`. A checkpoint dir the snapshot does not list is the
remains of a write that was killed: `clean_incomplete_checkpoints` deletes those (before and after a fit, when
no worker writes), so they are never loaded, never counted in `checkpoint.num_to_keep` and never picked by
`latest_checkpoint`.

Configuration errors that only a worker can see (a data contract, a resume position) are raised as
`ConfigError`; the worker records the message here (`config_error.txt`) before it fails, a restarted attempt finds
the record and ends at once without training, and the driver raises the `ConfigError`: the error is reported
once and never retried by `FailureConfig`.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from neobert.config_io import to_yaml
from pipelines.train.config import ConfigError

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
CHECKPOINT_PREFIX = "checkpoint_"
CONFIG_FILE = "config.yaml"
CONFIG_ERROR_FILE = "config_error.txt"
TRAIN_STATE_FILE = "train_state.pt"
TRAIN_STATE_JSON = "train_state.json"


def _fs(run_dir: str) -> tuple[pafs.FileSystem, str]:
    from pipelines.io import filesystem_for

    return filesystem_for(run_dir)


def _read_text(fs: pafs.FileSystem, path: str) -> str | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def _write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def complete_checkpoints(run_dir: str) -> list[str]:
    """Names of the checkpoint dirs Ray finished writing, oldest first (names sort by time)."""
    fs, root = _fs(run_dir)
    text = _read_text(fs, posixpath.join(root, SNAPSHOT_FILE))
    if text is None:
        return []
    names = {r["checkpoint_dir_name"] for r in json.loads(text).get("checkpoint_results", [])}
    return sorted(
        n for n in names if fs.get_file_info(posixpath.join(root, n)).type == pafs.FileType.Directory
    )


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The newest complete checkpoint dir of a run dir (by name: Ray's names order by time and survive a copy,
    file times do not), or None."""
    names = complete_checkpoints(str(run_dir))
    if not names:
        return None
    root = str(run_dir)
    return f"{root.rstrip('/')}/{names[-1]}" if "://" in root else str(Path(root) / names[-1])


def clean_incomplete_checkpoints(run_dir: str) -> list[str]:
    """Delete the checkpoint dirs of killed writes (not in Ray's snapshot); returns their names."""
    fs, root = _fs(run_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    done = set(complete_checkpoints(run_dir))
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith(CHECKPOINT_PREFIX) and name not in done:
            fs.delete_dir(info.path)
            removed.append(name)
    return sorted(removed)


def read_train_state(checkpoint_dir: str) -> dict[str, Any] | None:
    """The JSON part of a checkpoint's train state (step, data position, world size, config), or None."""
    fs, path = _fs(checkpoint_dir)
    text = _read_text(fs, posixpath.join(path, TRAIN_STATE_JSON))
    return None if text is None else json.loads(text)


def write_config(run_dir: str, cfg: Any) -> str:
    """Write the resolved config as `config.yaml` into the run dir; returns its path."""
    fs, root = _fs(run_dir)
    _write_text(fs, posixpath.join(root, CONFIG_FILE), to_yaml(cfg))
    return f"{run_dir.rstrip('/')}/{CONFIG_FILE}"


def record_config_error(run_dir: str, message: str) -> None:
    fs, root = _fs(run_dir)
    _write_text(fs, posixpath.join(root, CONFIG_ERROR_FILE), message)


def recorded_config_error(run_dir: str) -> str | None:
    fs, root = _fs(run_dir)
    return _read_text(fs, posixpath.join(root, CONFIG_ERROR_FILE))


def clear_config_error(run_dir: str) -> None:
    fs, root = _fs(run_dir)
    path = posixpath.join(root, CONFIG_ERROR_FILE)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def raise_recorded_config_error(run_dir: str) -> None:
    """Driver, after a fit: raise the `ConfigError` a worker recorded (and clear the record)."""
    message = recorded_config_error(run_dir)
    if message is not None:
        clear_config_error(run_dir)
        raise ConfigError(message)
