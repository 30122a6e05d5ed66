"""Recipes: expansion into per-phase pretraining configs, the LR across phases, orchestration (finished phases
skipped, a crashed phase resumed inside itself) with a fake `fit_phase`, and the per-phase report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.train.recipe import (
    expand_recipe,
    load_recipe,
    marker_path,
    recipe_lr,
    run_recipe,
    to_pretrain_config,
    write_recipe_report,
)

REPO = Path(__file__).resolve().parents[4]
RECIPES = REPO / "configs" / "recipes"


def load(name: str, tmp_path: Path, *extra: str):
    return load_recipe(
        RECIPES / f"{name}.yaml", ["--storage_path", str(tmp_path), "--data_root", "/data", *extra]
    )


def test_neobert_tiny_expands_into_two_phases(tmp_path):
    recipe = load("neobert_tiny", tmp_path)
    p1, p2 = expand_recipe(recipe)
    assert [p1.run_name, p2.run_name] == ["neobert-tiny/phase-0-seq1024", "neobert-tiny/phase-1-seq4096"]
    assert p1.run_dir == str(tmp_path / "neobert-tiny" / "phase-0-seq1024")
    # pack size, max positions, theta, mask per phase
    for plan, pack in ((p1, 64), (p2, 128)):
        assert plan.config["data"]["pack_tokens"] == pack == plan.config["model"]["max_position_embeddings"]
        assert plan.config["model"]["rope_theta"] == 10000.0 and plan.config["train"]["mask_prob"] == 0.2
    # the mixture of phase 2: three views with the paper's probabilities, paths under data_root
    assert [(s.name, s.path, s.weight) for s in p2.sources] == [
        ("all", "/data/pack4096", 0.2),
        ("min1024", "/data/pack4096/views/min64", 0.4),
        ("min2048", "/data/pack4096/views/min96", 0.4),
    ]
    # chaining: phase 2 starts from phase 1's run dir (weights only), its steps follow phase 1's
    assert p1.init_from == "" and p2.init_from == p1.run_dir
    assert (p1.step_offset, p2.step_offset) == (0, 6)
    # both phases map onto the pretraining job's keys; run dir = storage_path / name
    cfg = to_pretrain_config(p1)
    assert cfg.run_dir == p1.run_dir and [s.path for s in cfg.data.sources] == ["/data/pack1024"]
    assert cfg.data.packed_dir == "/data/pack1024"  # its eval split
    assert (cfg.train.num_steps, cfg.train.schedule, cfg.train.decay_steps) == (6, "wsd", 3)
    assert cfg.model.rope_theta == 10000.0 and cfg.model.max_position_embeddings == 64
    assert cfg.train.global_batch_tokens == 1024 and cfg.num_micro_batches == 1  # 1 x 2 workers x 8 rows x 64
    cfg = to_pretrain_config(p2)
    assert [(s.name, s.path, s.weight, s.repeat) for s in cfg.data.sources] == [
        (s.name, s.path, s.weight, True) for s in p2.sources
    ]
    assert cfg.train.init_from == p1.run_dir and cfg.train.init_optimizer is False
    assert cfg.train.global_batch_tokens == 2048 and cfg.num_micro_batches == 2
    assert cfg.mixture().global_batch_tokens == 2048


def test_modernbert_tiny_expands_theta_mask_wsd_and_optimizer_carry(tmp_path):
    recipe = load("modernbert_style_tiny", tmp_path)
    plans = expand_recipe(recipe)
    assert [p.config["model"]["rope_theta"] for p in plans] == [10000.0, 160000.0, 160000.0]
    assert [p.config["data"]["pack_tokens"] for p in plans] == [64, 128, 128]
    assert all(p.config["train"]["mask_prob"] == 0.3 for p in plans)
    assert all(p.config["train"]["optimizer"] == "stable_adamw" for p in plans)
    assert [p.config["train"]["init_optimizer"] for p in plans] == [False, True, True]
    assert [p.num_steps for p in plans] == [6, 4, 3]  # num_tokens through the batch schedule of each phase
    # phase 1 warms its batch up 8 -> 16 -> 24 rows (2 steps each); the others hold their global batch
    assert [plans[0].ramp.rows(s) for s in range(7)] == [8, 8, 16, 16, 24, 24, 24]
    assert [p.ramp.enabled for p in plans] == [True, False, False]
    assert plans[0].config["train"]["batch_warmup_start_tokens"] == 512
    seg = [p.segment for p in plans]
    assert (seg[0].kind, seg[0].warmup_steps, seg[0].stable_steps, seg[0].decay_steps) == ("wsd", 2, 4, 0)
    assert (seg[2].decay_shape, seg[2].decay_steps, seg[2].min_lr_ratio) == ("1-sqrt", 3, 0.0)
    # the LR is continuous where the recipe says so: stable at the end of phase 2, decay from there in phase 3
    lr = recipe_lr(plans)
    assert lr.offsets == [p.step_offset for p in plans]
    end2 = plans[2].step_offset
    assert lr.lr_at(end2 - 1) == lr.lr_at(end2) == 1e-3
    assert lr.lr_at(lr.num_steps - 1) == pytest.approx(1e-3 * (1 - (2 / 3) ** 0.5))
    cfg = to_pretrain_config(plans[1])
    assert cfg.train.optimizer == "stable_adamw" and cfg.train.init_optimizer and cfg.num_micro_batches == 4
    assert cfg.data.sources == [] or cfg.data.sources[0].name == "all"


def test_overrides_reach_phases_by_name_and_errors_name_the_fix(tmp_path):
    recipe = load(
        "neobert_tiny", tmp_path, "--phases.seq4096.num_steps", "3", "--phases.seq1024.rope_theta", "5e5"
    )
    p1, p2 = expand_recipe(recipe)
    assert (
        p2.num_steps == 3
        and p1.config["model"]["rope_theta"] == 5e5
        and p2.config["model"]["rope_theta"] == 1e4
    )
    with pytest.raises(ValueError, match=r"no phase named 'seq2048'.*\['seq1024', 'seq4096'\]"):
        load("neobert_tiny", tmp_path, "--phases.seq2048.num_steps", "3")
    with pytest.raises(ValueError, match="uses {data_root} but the recipe sets no data_root"):
        expand_recipe(load_recipe(RECIPES / "neobert_tiny.yaml", ["--storage_path", str(tmp_path)]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nphases:\n  - {name: a, max_seq_len: 128, global_batch_tokens: 256, num_steps: 2}\n"
                   "  - {name: b, max_seq_len: 512, num_steps: 2}\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"bad.yaml: phase 2 \('b'\) lacks \['global_batch_tokens'\]"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="exactly one of num_steps / num_tokens"):
        load("neobert_tiny", tmp_path, "--phases.seq1024.num_tokens", "100")
    with pytest.raises(ValueError, match="exceeds the phase's num_steps=6"):
        expand_recipe(load("neobert_tiny", tmp_path, "--phases.seq1024.lr.decay_steps", "30"))


# ---------------------------------------------------------------------------------------------- orchestration
class FakeFit:
    """Stands in for a Ray Train run of one phase: it 'trains' step by step, writes metrics.jsonl (loss, LR,
    per-source token counts) into the phase's run dir and a checkpoint (the step) every `every` steps; a rerun
    resumes from the last checkpoint like Ray does for the same run name + storage path. `crash` = (phase index,
    step) raises once there."""

    def __init__(self, crash: tuple[int, int] | None = None, every: int = 4) -> None:
        self.crash, self.every, self.calls = crash, every, []

    def __call__(self, plan) -> dict:
        run = Path(plan.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        ckpt = run / "checkpoint.json"
        start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
        self.calls.append((plan.index, start, plan.init_from))
        metrics = run / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        lines = [
            ln for ln in lines if json.loads(ln)["step"] <= start
        ]  # what the runner's truncate_after does
        weights = {s.metric: s.weight / sum(x.weight for x in plan.sources) for s in plan.sources}
        for step in range(start + 1, plan.num_steps + 1):
            if self.crash == (plan.index, step):
                self.crash = None
                metrics.write_text("".join(ln + "\n" for ln in lines))
                raise RuntimeError(f"injected crash in phase {plan.index} at step {step}")
            g = plan.step_offset + step - 1
            rec = {"step": step, "train/loss": 10.0 / (1 + g), "train/lr": plan.segment.lr_at(step - 1)}
            rec |= {
                k: plan.global_batch_tokens * w for k, w in weights.items()
            }  # this step's (window's) tokens
            lines.append(json.dumps(rec))
            if step % self.every == 0 or step == plan.num_steps:
                metrics.write_text("".join(ln + "\n" for ln in lines))
                ckpt.write_text(json.dumps({"step": step}))
        return {"final_step": plan.num_steps}


def test_run_recipe_skips_finished_phases_and_resumes_a_crashed_one(tmp_path):
    recipe = load("neobert_tiny", tmp_path / "crash")
    fit = FakeFit(crash=(1, 7))
    with pytest.raises(RuntimeError, match="phase 1 at step 7"):
        run_recipe(recipe, fit)
    plans = expand_recipe(recipe)
    assert marker_path(recipe, plans[0]).exists() and not marker_path(recipe, plans[1]).exists()
    records = run_recipe(recipe, fit)  # the same command again
    # phase 0 ran once; phase 1 ran twice: from 0, then from its step-4 checkpoint; both times from phase 0's dir
    assert fit.calls == [(0, 0, ""), (1, 0, plans[0].run_dir), (1, 4, plans[0].run_dir)]
    assert [r["result"]["final_step"] for r in records] == [6, 8]
    run_recipe(recipe, fit)
    assert len(fit.calls) == 3  # everything finished: nothing runs

    clean = load("neobert_tiny", tmp_path / "clean")
    run_recipe(clean, FakeFit())
    got, want = write_recipe_report(recipe), write_recipe_report(clean)
    strip = lambda p: [{k: v for k, v in json.loads(ln).items()} for ln in p.read_text().splitlines()]  # noqa: E731
    assert strip(got["metrics"]) == strip(want["metrics"])  # same steps, losses, LRs, token counts
    recs = strip(got["metrics"])
    assert [r["global_step"] for r in recs] == list(range(1, 15))
    assert {r["phase"] for r in recs[6:]} == {"seq4096"} and recs[5]["phase"] == "seq1024"
    lr = recipe_lr(plans)
    assert all(r["train/lr"] == pytest.approx(lr.lr_at(r["global_step"] - 1)) for r in recs)

    summary = json.loads(got["phases"].read_text())
    assert [(s["phase"], s["steps_done"], s["step_offset"]) for s in summary] == [
        ("seq1024", 6, 0),
        ("seq4096", 8, 6),
    ]
    assert summary[1]["rope_theta"] == 10000.0 and summary[1]["max_seq_len"] == 128
    assert summary[1]["tokens"] == pytest.approx(8 * 2048)
    mix = summary[1]["mixture"]
    assert {k: round(v["share"], 6) for k, v in mix["sources"].items()} == {
        "all": 0.2,
        "min1024": 0.4,
        "min2048": 0.4,
    }
    assert mix["why"] is None and mix["max_error"] < 1e-9
    assert summary[0]["lr_first"] == pytest.approx(2e-3 * 0.1)
    assert summary[0]["train_loss_last"] == pytest.approx(10 / 6)
    assert got["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_phase_with_another_config_is_refused(tmp_path):
    run_recipe(load("neobert_tiny", tmp_path), FakeFit())
    with pytest.raises(ValueError, match=r"phase 0 \('seq1024'\) .* finished with another config"):
        run_recipe(load("neobert_tiny", tmp_path, "--phases.seq1024.mask_prob", "0.3"), FakeFit())


def test_a_moved_recipe_dir_continues(tmp_path):
    """Markers compare configs without their locations: a recipe dir copied to another storage_path skips the
    finished phases there and runs the rest from the copy."""
    import shutil

    fit = FakeFit()
    run_recipe(load("neobert_tiny", tmp_path / "a", "--phases.seq4096.num_steps", "2"), fit)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "neobert-tiny", tmp_path / "b" / "neobert-tiny")
    moved = load("neobert_tiny", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "neobert-tiny" / "phase-1-seq4096")
    (tmp_path / "b" / "neobert-tiny" / "phases" / "1-seq4096.json").unlink()
    run_recipe(moved, fit)
    assert fit.calls[-1] == (1, 0, str(tmp_path / "b" / "neobert-tiny" / "phase-0-seq1024"))
    assert len(fit.calls) == 3


def test_realized_mixture_says_why_a_share_misses_its_weight():
    from pipelines.train.recipe import SourceSpec, realized_mixture

    sources = [SourceSpec("a", "/d/a", 0.5), SourceSpec("b", "/d/b", 0.5, repeat=False)]
    short = [{"step": 1, "data/tokens/a": 300.0, "data/tokens/b": 200.0, "data/epoch/b": 0.0}]
    mix = realized_mixture(short, sources, pack_tokens=128)
    assert mix["max_error"] == pytest.approx(0.1)
    assert "ran out before the phase ended" in mix["why"]
    sources[1].repeat = True
    mix = realized_mixture(short, sources, pack_tokens=128)
    assert "exact to one packed row (128 tokens, 25.60% of the phase)" in mix["why"]
    even = [{"step": s, "data/tokens/a": 1000.0, "data/tokens/b": 1010.0} for s in (1, 2)]
    mix = realized_mixture(even, sources, pack_tokens=128)
    assert mix["why"] is None and mix["sources"]["b"]["tokens"] == 2020.0
    assert realized_mixture([{"step": 1, "train/loss": 1.0}], sources, pack_tokens=128) == {}


def test_recipe_on_the_command_line_and_driver_checks(tmp_path):
    from pipelines.train.recipe import check_recipe, recipe_config_in

    tiny = str(RECIPES / "neobert_tiny.yaml")
    assert recipe_config_in(["--config", tiny, "--data_root", "x"]) == tiny
    assert recipe_config_in([f"--config={tiny}"]) == tiny
    assert recipe_config_in(["--config", str(REPO / "configs" / "pretrain.yaml")]) is None
    assert (
        recipe_config_in(["--config", str(REPO / "configs" / "pretrain_base_1gpu.yaml")]) is None
    )  # base: chain
    assert recipe_config_in(["--train.num_steps", "3"]) is None
    # the global batch must split over workers x micro-batches: named with the phase before anything runs
    with pytest.raises(
        ValueError, match=r"phase 0 \('seq1024'\): train.global_batch_tokens=1000 must be a multiple"
    ):
        check_recipe(load("neobert_tiny", tmp_path, "--phases.seq1024.global_batch_tokens", "1000"))
    # a source that is not a packed dir is refused on the driver
    with pytest.raises(ValueError, match=r"phase 0 \('seq1024'\): .*/data/pack1024"):
        check_recipe(load("neobert_tiny", tmp_path))
    with pytest.raises(ValueError, match="only a phase with a single source may leave its path empty"):
        load("neobert_tiny", tmp_path, "--phases.seq4096.sources", "[{name: a}, {name: b}]")


@pytest.mark.parametrize("name", ["neobert", "modernbert_style", "neobert_tiny", "modernbert_style_tiny"])
def test_shipped_recipes_expand_and_are_recognized(name, tmp_path):
    from pipelines.train.recipe import is_recipe

    assert is_recipe(RECIPES / f"{name}.yaml") and not is_recipe(REPO / "configs" / "pretrain.yaml")
    plans = expand_recipe(load(name, tmp_path))
    lr = recipe_lr(plans)
    # step 0 of a wsd warmup from min_lr_ratio=0 has LR 0 (transformers, like Composer), step 1 does not
    assert lr.num_steps == sum(p.num_steps for p in plans) and lr.lr_at(1) > 0
    for plan in plans:  # every phase is a valid pretraining config
        cfg = to_pretrain_config(plan)
        assert cfg.data.pack_tokens == plan.config["data"]["pack_tokens"] == cfg.model.max_position_embeddings
        assert [s.name for s in cfg.data.sources] == [s.name for s in plan.sources]
        # Ray's ScalingConfig refuses GPU resources without use_gpu (a base recipe's GPU settings must not leak)
        assert cfg.scaling.use_gpu or not cfg.scaling.resources_per_worker.get("GPU"), cfg.scaling


def test_jobs_pretrain_runs_a_recipe_config_and_checks_it_before_ray(tmp_path, capsys):
    """`python jobs/pretrain.py --config <recipe>` goes to the recipe job; a missing source is one error line
    (exit 2) before Ray starts."""
    from jobs import pretrain

    argv = ["--config", str(RECIPES / "neobert_tiny.yaml"), "--data_root", str(tmp_path / "data"),
            "--storage_path", str(tmp_path / "runs")]  # fmt: skip
    assert pretrain.spec_for(argv) is pretrain.RECIPE_SPEC
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pretrain: error: phase 0 ('seq1024'): data source 'all': ")
    assert "jobs/preprocess.py --output" in err[-1] and not (tmp_path / "runs").exists()


def test_batch_warmup_of_a_phase_sets_its_steps_and_token_budget(tmp_path):
    recipe = load("modernbert_style", tmp_path)
    p1 = expand_recipe(recipe)[0]
    ramp = p1.ramp
    # ModernBERT-base: 768 -> 4,608 sequences of 1,024 tokens in steps of 768, over ~50B tokens
    assert (ramp.start_rows, ramp.full_rows, ramp.num_levels) == (768, 4608, 6)
    assert ramp.tokens_through(ramp.warmup_steps) == pytest.approx(50e9, rel=1e-3)
    # 1.719T tokens through the ramp: the fewest steps that reach them (fewer than at the full batch from step 0)
    n = p1.num_steps
    assert ramp.tokens_through(n - 1) < 1_719_000_000_000 <= ramp.tokens_through(n)
    assert n > -(-1_719_000_000_000 // p1.global_batch_tokens)
    assert p1.segment.warmup_steps < ramp.steps_per_level  # the LR warmup (3B tokens) lies in the first level
    assert p1.config["train"]["batch_warmup_start_tokens"] == 786432
    assert to_pretrain_config(p1).ramp() == ramp
    # the warmup is a phase setting: refused in pretrain.train and in a phase's overrides
    with pytest.raises(ValueError, match="the batch warmup is a phase setting"):
        expand_recipe(load("modernbert_style_tiny", tmp_path, "--pretrain.train.batch_warmup_tokens", "100"))
    with pytest.raises(ValueError, match=r"phase 'decay': overrides.train sets .*batch_warmup"):
        expand_recipe(
            load(
                "modernbert_style_tiny",
                tmp_path,
                "--phases.decay.overrides.train.batch_warmup_start_tokens",
                "1",
            )
        )
    with pytest.raises(
        ValueError, match=r"phase 'decay': batch_warmup.start_tokens=512 and batch_warmup.tokens=0"
    ):
        load("modernbert_style_tiny", tmp_path, "--phases.decay.batch_warmup.start_tokens", "512")
    with pytest.raises(
        ValueError,
        match=r"phase 'decay': batch_warmup.start_tokens=768 .*smaller than global_batch_tokens=2048",
    ):
        load(
            "modernbert_style_tiny",
            tmp_path,
            "--phases.decay.batch_warmup",
            "{start_tokens: 768, tokens: 10}",
        )


def test_report_plans_the_tokens_of_the_ramp(tmp_path):
    recipe = load("modernbert_style_tiny", tmp_path)
    plans = expand_recipe(recipe)
    for plan in plans:  # a metrics file per phase is all the report needs
        run = Path(plan.run_dir)
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(
            json.dumps({"step": plan.num_steps, "train/loss": 1.0, "train/lr": 1e-3}) + "\n"
        )
    paths = write_recipe_report(recipe, plans)
    summary = json.loads(paths["phases"].read_text())
    # phase 1: 2 steps each of 512, 1,024, 1,536 tokens; phases 2-3: steps x their global batch
    assert [s["tokens_planned"] for s in summary] == [6144, 4 * 2048, 3 * 2048]
    # the plot has a third panel, the global batch: 8 inches at 100 dpi (two panels were 6)
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[20:24], "big") == 800
    assert not list(paths["plot"].parent.glob("*.tmp.png"))
