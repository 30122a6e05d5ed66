"""`ray_cluster.yaml` / `ray_cluster.local.yaml` against Ray's own cluster-config validation (offline: the
schema shipped in the `ray` package, then `prepare_config` + `validate_config`, as `ray up` does before it
touches a cloud), broken copies rejected, and the cluster training config matching the GPU node type."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.train.pretrain import load_pretrain_config

ROOT = Path(__file__).resolve().parents[2]
AWS = ROOT / "ray_cluster.yaml"
LOCAL = ROOT / "ray_cluster.local.yaml"
CONFIG_8XH100 = ROOT / "configs" / "pretrain_base_8xh100.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_cluster_config(cfg: dict) -> dict:
    """What `ray up` checks before launching: the JSON schema first (prepare_config may crash with a TypeError
    on malformed input), then defaults merged in and Ray's semantic validation."""
    jsonschema.validate(cfg, SCHEMA)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_validation(path: Path):
    prepared = validate_cluster_config(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["idle_timeout_minutes"] > 0
    assert prepared["file_mounts"] == {"~/neobert-ray": "."}
    assert ".venv" in prepared["rsync_exclude"] and ".git" in prepared["rsync_exclude"]


def _typo_top_level(c):
    c["idle_timeout_minute"] = c.pop("idle_timeout_minutes")


def _gpu_count_as_string(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "eight"


def _missing_node_config(c):
    del c["available_node_types"]["cpu_worker"]["node_config"]


def _unknown_head_type(c):
    c["head_node_type"] = "gpu_head"


def _negative_max_workers(c):
    c["max_workers"] = -1


def _unknown_node_type_key(c):
    c["available_node_types"]["gpu_worker"]["setup_commands"] = ["echo wrong key"]


@pytest.mark.parametrize(
    "breakage",
    [
        _typo_top_level,
        _gpu_count_as_string,
        _missing_node_config,
        _unknown_head_type,
        _negative_max_workers,
        _unknown_node_type_key,
    ],
)
def test_broken_copy_is_rejected(breakage):
    cfg = _load(AWS)
    validate_cluster_config(copy.deepcopy(cfg))  # the intact copy passes...
    breakage(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError)):  # ...the broken one does not
        validate_cluster_config(cfg)


def test_aws_node_types_and_setup():
    cfg = _load(AWS)
    nodes = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws"
    assert set(nodes) == {"head", "cpu_worker", "gpu_worker"}
    assert nodes["head"]["resources"] == {"CPU": 0}  # no data/train work on the head
    assert nodes["cpu_worker"]["min_workers"] == 0 < nodes["cpu_worker"]["max_workers"]
    assert "GPU" not in nodes["cpu_worker"]["resources"]
    gpu_setup = "\n".join(nodes["gpu_worker"]["worker_setup_commands"])
    assert "[data,gpu]" in gpu_setup  # the gpu extra carries flash-attn-4 (no source build on the node)
    import tomllib

    extras = tomllib.loads((AWS.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("flash-attn-4") for req in extras["gpu"]), extras["gpu"]
    assert "whl/cpu" in "\n".join(cfg["setup_commands"])  # CPU nodes skip the CUDA torch wheel
    # The cluster runs the same Ray as this checkout (client and cluster versions must match).
    for cmds in (cfg["setup_commands"], nodes["gpu_worker"]["worker_setup_commands"]):
        pins = re.findall(r"ray\[[^\]]*\]==([\w.]+)", "\n".join(cmds))
        assert pins == [ray.__version__], pins


def test_every_account_specific_knob_is_commented():
    lines = AWS.read_text().splitlines()
    knobs = ("region:", "availability_zone:", "ImageId: &ami", "IamInstanceProfile:", "InstanceType:")
    for knob in knobs:
        hits = [ln for ln in lines if ln.strip().startswith(knob)]
        assert hits, knob
        for ln in hits:
            assert "#" in ln, f"{knob} needs a comment saying what to change: {ln!r}"
    assert sum("CHANGE" in ln for ln in lines) >= 10


def test_8xh100_config_matches_the_gpu_node_type():
    cfg = load_pretrain_config(CONFIG_8XH100)
    node = _load(AWS)["available_node_types"]["gpu_worker"]
    gpus, cpus = node["resources"]["GPU"], node["resources"]["CPU"]
    sc = cfg.scaling
    assert sc.use_gpu and sc.resources_per_worker["GPU"] == 1
    assert sc.num_workers % gpus == 0, "whole nodes only: every GPU of a node gets one worker"
    assert sc.num_workers <= gpus * node["max_workers"], "more workers than the cluster's GPUs"
    workers_per_node = gpus // sc.resources_per_worker["GPU"]
    assert workers_per_node * sc.resources_per_worker["CPU"] <= 0.75 * cpus, "leave >= 25% CPUs for Ray Data"
    assert cfg.checkpoint.storage_path.startswith("s3://"), "multi-node runs need shared checkpoint storage"
    assert cfg.data.packed_dir.startswith("s3://")
    assert cfg.model.hidden_size == 768 and cfg.model.num_layers == 28  # NeoBERT-base


def test_cluster_preprocess_config_feeds_the_pretraining_config():
    from neobert.config_io import load_config
    from pipelines.mlm.preprocess import PreprocessConfig

    pre = load_config(PreprocessConfig, ROOT / "configs" / "preprocess_cluster.yaml", [])
    train = load_pretrain_config(CONFIG_8XH100)
    assert pre.pack_tokens == train.data.pack_tokens, "the trainer checks rows against data.pack_tokens"
    assert pre.output == train.data.packed_dir
    assert all("://" in p for p in [*pre.input, pre.output]), "multi-node jobs need shared storage"
    assert pre.num_tokenizers == 0  # autoscale with the cpu_worker nodes


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=lambda p: p.name)
def test_every_ray_start_turns_train_state_tracking_on(path: Path):
    """The dashboard's Train tab stays empty unless every node's Ray runs with state tracking on."""
    cfg = _load(path)
    starts = [
        c
        for k in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in cfg[k]
        if "ray start" in c
    ]
    assert len(starts) == 2 and all("RAY_TRAIN_ENABLE_STATE_TRACKING=1 " in c for c in starts), starts
