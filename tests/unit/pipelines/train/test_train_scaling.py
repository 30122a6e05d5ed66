"""Scaling settings of the shared config and the runner's preemption rule (no Ray cluster: the runner's methods
are called on a bare instance, `ray.train.get_preemption_info` patched in this process)."""

from __future__ import annotations

import pytest

from pipelines.train.config import ConfigError, ScalingSection
from pipelines.train.contrastive import load_contrastive_config
from pipelines.train.data import plan_accumulation
from pipelines.train.pretrain import load_pretrain_config
from pipelines.train.runner import TrainRunner, check_world_sizes, prepare_run


def test_num_workers_takes_an_int_or_a_min_max_range():
    fixed = load_pretrain_config(None, ["--scaling.num_workers", "3"]).scaling
    assert (fixed.elastic, list(fixed.world_sizes), fixed.ray_scaling_config().num_workers) == (False, [3], 3)
    ranged = load_pretrain_config(None, ["--scaling.num_workers", "[2, 4]"]).scaling
    assert (ranged.elastic, list(ranged.world_sizes)) == (True, [2, 3, 4])
    assert ranged.ray_scaling_config().num_workers == (2, 4)  # Ray Train's elastic form
    with pytest.raises(ValueError, match=r"\[min, max\] with min <= max"):
        ScalingSection(num_workers=[4, 2])
    with pytest.raises(ValueError, match=r"must be >= 1"):
        ScalingSection(num_workers=[0, 2])


def test_strategy_is_validated_with_the_choices():
    assert load_pretrain_config(None, ["--scaling.strategy", "fsdp2"]).scaling.strategy == "fsdp2"
    with pytest.raises(ValueError, match=r"scaling.strategy='zero3' is not one of \['ddp', 'fsdp2'\]"):
        load_pretrain_config(None, ["--scaling.strategy", "zero3"])


def test_contrastive_runs_fsdp2_and_elastic():
    assert load_contrastive_config(None, ["--scaling.strategy", "fsdp2"]).scaling.strategy == "fsdp2"
    assert load_contrastive_config(None, ["--scaling.num_workers", "[1, 2]"]).scaling.elastic


def test_every_world_size_of_an_elastic_run_must_divide_the_global_batch():
    cfg = load_pretrain_config(None, ["--scaling.num_workers", "[2, 4]"])
    # 24 rows of 512 tokens, 2 rows per micro-batch: 2 and 3 workers split them, 4 do not (24 / (4 * 2) = 3 ok)
    check_world_sizes(cfg, lambda w: plan_accumulation(24 * 512, 512, w, 2))
    with pytest.raises(ConfigError, match=r"does not split over \[3\] workers"):
        check_world_sizes(cfg, lambda w: plan_accumulation(16 * 512, 512, w, 2))


def test_contrastive_resumes_on_another_world_size_but_not_another_order(tmp_path):
    import json

    from pipelines.train.contrastive import check_contrastive_resume, resolve_config
    from pipelines.train.contrastive_data import STATE_KIND, pair_mixture

    ckpt = tmp_path / "c" / "checkpoint_2026-01-01_00-00-01.000000"
    ckpt.mkdir(parents=True)
    pairs = pair_mixture({"a": 30, "b": 10}, alpha=0.5, global_batch_size=8, shuffle_window_rows=16, seed=0,
                         path="rows")  # fmt: skip
    data = {"version": 1, "kind": STATE_KIND, "global_step": 3, "rows_per_step": 8,
            "order": {"seed": 0, "shuffle_window_rows": 16, "sources": ["a", "b"]}, "sources": {}}  # fmt: skip
    state = {"step": 3, "world_size": 2, "data": data, "config": {"train": {"global_batch_size": 8}}}
    (ckpt / "train_state.json").write_text(json.dumps(state))
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": ckpt.name}]}
    (tmp_path / "c" / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    argv = [
        "--checkpoint.storage_path",
        str(tmp_path),
        "--checkpoint.name",
        "c",
        "--model.init",
        "random:tiny",
    ]
    one = resolve_config(load_contrastive_config(None, [*argv, "--scaling.num_workers", "1"]), state)
    assert one.train.global_batch_size == 8  # the checkpoint's global batch, not batch_size x 1
    prepare_run(one, check_contrastive_resume(one, pairs))  # 2 -> 1 workers: the global order continues
    with pytest.raises(ConfigError, match=r"shuffle_window_rows=16 .* set shuffle_window_rows: 16"):
        other = pair_mixture({"a": 30, "b": 10}, alpha=0.5, global_batch_size=8, shuffle_window_rows=4, seed=0,
                             path="rows")  # fmt: skip
        prepare_run(one, check_contrastive_resume(one, other))
    state["data"] = {"kind": "sampled", "step": 3}
    (ckpt / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="not one of the contrastive pair order"):
        prepare_run(one, check_contrastive_resume(one, pairs))
    with pytest.raises(ConfigError, match=r"does not split over \[3\] workers"):
        resolve_config(load_contrastive_config(None, [*argv, "--scaling.num_workers", "[2, 4]"]), state)


def bare_runner(tmp_path, *argv, step=1, resumed=False):
    cfg = load_pretrain_config(None, ["--checkpoint.storage_path", str(tmp_path), *argv])
    runner = TrainRunner.__new__(TrainRunner)
    runner.cfg, runner.rank, runner.world, runner.step, runner.resumed = cfg, 0, 2, step, resumed
    runner.preemption_notice = None
    return runner


def test_a_preemption_notice_asks_for_one_checkpoint(tmp_path, monkeypatch):
    import ray.train

    notices = iter([None, ray.train.PreemptionInfo(deadline_ms=5, preempted_node_to_ranks={"n1": [1]})])
    current = {"info": None}

    def fake_info():
        current["info"] = next(notices, current["info"])
        return current["info"]

    monkeypatch.setattr(ray.train, "get_preemption_info", fake_info)
    runner = bare_runner(tmp_path)
    seen = [runner.preemption_due() for _ in range(4)]  # no notice, the notice, the same notice twice
    assert seen == [False, True, False, False]
    current["info"] = ray.train.PreemptionInfo(deadline_ms=9, preempted_node_to_ranks={"n2": [0]})
    assert runner.preemption_due()  # another notice: another checkpoint


def test_injected_preemption_starts_at_its_step_and_not_after_a_resume(tmp_path, monkeypatch):
    import ray.train

    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: None)
    runner = bare_runner(tmp_path, "--failure.inject_preemption_at_step", "4", step=3)
    assert not runner.preemption_due()
    runner.step = 4
    assert runner.preemption_due()
    runner.step = 5
    assert not runner.preemption_due()  # once per notice
    resumed = bare_runner(tmp_path, "--failure.inject_preemption_at_step", "4", step=6, resumed=True)
    assert not resumed.preemption_due()
