"""The NeoBERT tiny recipe end to end through Ray Train (2 CPU workers, tiny model, 6 + 8 steps).

One corpus (paragraphs of the embedded Wikipedia articles) is preprocessed twice: 64-token packs for phase 1,
128-token packs with length views (documents >= 64 / >= 96 tokens) for phase 2, which mixes the three with the
paper's weights 0.2 / 0.4 / 0.4 and extends RoPE theta (10k -> 40k here: NeoBERT's own phase 2 keeps 10k). Runs
whose assertions are shared:
  A  the recipe uninterrupted (module fixture): LR of every step = the recipe formula across the boundary,
     realized mixture within 1%, theta and longer sequences in phase 2, the report files;
  B  the same command with a worker crash injected in phase 2 (no Ray retry: the command fails), then the same
     command again: phase 1 is skipped, phase 2 resumes from its step-3 checkpoint and ends with A's final step,
     tokens per phase, losses and data order (rows + masks of every micro-batch). B's recipe dir starts as a copy
     of A's finished phase 1 (deterministic, so identical to training it again; the copy also checks that a
     moved recipe dir continues), which saves a Ray Train run. B's phase 2 warm-starts from the HF export of
     A's phase-1 checkpoint instead of the checkpoint itself: its step-0 eval loss (the exported model's eval
     loss) equals A's step-0 eval of the same weights, and everything after it matches A.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "recipes" / "neobert_tiny.yaml"
THETA2 = 40000.0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def traces(run_dir: Path) -> dict[tuple[int, int, int], dict]:
    """(rank, step, micro) -> trace record. A resumed run appends the steps after its checkpoint again: the later
    record wins, and the caller compares the earlier ones too (`all_traces`)."""
    out = {}
    for rank in (0, 1):
        for r in read_jsonl(run_dir / f"data_trace.rank{rank}.jsonl"):
            out[(rank, r["step"], r["micro"])] = r
    return out


def all_traces(run_dir: Path) -> list[tuple[tuple[int, int, int], str]]:
    return [
        ((rank, r["step"], r["micro"]), r["sha"])
        for rank in (0, 1)
        for r in read_jsonl(run_dir / f"data_trace.rank{rank}.jsonl")
    ]


def recipe_args(storage: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "--storage_path", str(storage), "--data_root", str(data_root),
        "--phases.seq4096.rope_theta", str(THETA2),
        "--pretrain.logging.trace_data", "true",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data_root(recipe_data):
    return recipe_data


@pytest.fixture(scope="module")
def clean(data_root, tmp_path_factory):
    from pipelines.train.recipe import (
        check_recipe,
        fit_phase_ray,
        load_recipe,
        run_recipe,
        write_recipe_report,
    )

    recipe = load_recipe(RECIPE, recipe_args(tmp_path_factory.mktemp("a"), data_root))
    plans = check_recipe(recipe)
    run_recipe(recipe, fit_phase_ray)
    return recipe, plans, write_recipe_report(recipe)


def test_recipe_lr_mixture_theta_and_report(clean):
    from pipelines.train.recipe import recipe_lr, run_recipe

    recipe, plans, paths = clean
    assert [p.num_steps for p in plans] == [6, 8]
    records = read_jsonl(paths["metrics"])
    train = [r for r in records if "train/lr" in r]
    assert [r["global_step"] for r in train] == list(range(1, 15))
    assert [r["phase"] for r in train][5:7] == ["seq1024", "seq4096"]
    lr = recipe_lr(plans)
    for r in train:  # every step, across the phase boundary, is the recipe's formula
        assert r["train/lr"] == pytest.approx(lr.lr_at(r["global_step"] - 1), rel=1e-6), r

    summary = json.loads(paths["phases"].read_text())
    assert [s["steps_done"] for s in summary] == [6, 8]
    mix = summary[1]["mixture"]
    assert set(mix["sources"]) == {"all", "min1024", "min2048"}
    assert mix["max_error"] <= 0.01 and mix["why"] is None, mix
    assert summary[1]["tokens"] == sum(m["tokens"] for m in mix["sources"].values()) > 0
    assert summary[0]["mixture"]["sources"]["all"]["share"] == 1.0
    assert paths["plot"].stat().st_size > 1000

    # the extension phase: the new theta and 128 positions in its checkpoint's model config ...
    from neobert.checkpoint import latest_checkpoint

    model = json.loads((latest_checkpoint(plans[1].run_dir) / "model" / "neobert_config.json").read_text())
    assert (model["model"]["rope_theta"], model["model"]["max_position_embeddings"]) == (THETA2, 128)
    first = json.loads((latest_checkpoint(plans[0].run_dir) / "model" / "neobert_config.json").read_text())
    assert (first["model"]["rope_theta"], first["model"]["max_position_embeddings"]) == (10000.0, 64)
    # ... and documents longer than phase 1's 64-token packs allowed
    longest = {
        i: max(r["max_doc_tokens"] for r in traces(Path(p.run_dir)).values()) for i, p in enumerate(plans)
    }
    assert longest[0] <= 64 < longest[1], longest
    # phase 2 warm-started from phase 1: its step-0 eval (phase 1's weights) is logged, and its first train loss
    # is far below the first loss of the run from scratch
    phase2 = [r for r in records if r["phase"] == "seq4096"]
    assert phase2[0]["step"] == 0 and "eval/loss" in phase2[0]
    by_phase = {p.name: [r["train/loss"] for r in train if r["phase"] == p.name] for p in plans}
    assert by_phase["seq4096"][0] < by_phase["seq1024"][0] - 0.2
    # a second run of the same recipe trains nothing
    calls: list = []
    run_recipe(recipe, lambda plan: calls.append(plan) or {})
    assert calls == []


def test_crash_in_phase_two_and_rerun_ends_like_the_uninterrupted_run(clean, data_root, tmp_path):
    from neobert.checkpoint import latest_checkpoint
    from neobert.hf.export import export_hf
    from pipelines.tokenizer import default_tokenizer_dir
    from pipelines.train.recipe import (
        fit_phase_ray,
        load_recipe,
        marker_path,
        run_recipe,
        write_recipe_report,
    )

    recipe_a, plans_a, paths_a = clean
    storage = tmp_path / "b"
    # phase 1 as A finished it (run dir + marker), in B's recipe dir
    shutil.copytree(plans_a[0].run_dir, storage / recipe_a.name / Path(plans_a[0].run_dir).name)
    marker = marker_path(recipe_a, plans_a[0])
    (storage / recipe_a.name / "phases").mkdir(parents=True)
    shutil.copy(marker, storage / recipe_a.name / "phases" / marker.name)
    hf = tmp_path / "hf"
    export_hf(latest_checkpoint(plans_a[0].run_dir), hf, tokenizer_dir=default_tokenizer_dir())
    args = recipe_args(
        storage, data_root,
        "--phases.seq4096.overrides.train.init_from", str(hf),
        "--phases.seq4096.overrides.failure.inject_failure_at_step", "5",
        "--phases.seq4096.overrides.failure.max_failures", "0",
    )  # fmt: skip
    recipe = load_recipe(RECIPE, args)
    with pytest.raises(Exception, match="injected worker failure at step 5"):
        run_recipe(recipe, fit_phase_ray)
    run_recipe(load_recipe(RECIPE, args), fit_phase_ray)  # the same command again
    paths = write_recipe_report(recipe)

    a, b = json.loads(paths_a["phases"].read_text()), json.loads(paths["phases"].read_text())
    assert [s["steps_done"] for s in b] == [s["steps_done"] for s in a] == [6, 8]
    assert [s["tokens"] for s in b] == [s["tokens"] for s in a]
    assert b[1]["mixture"]["sources"] == a[1]["mixture"]["sources"]

    def losses(path: Path, key: str) -> dict[tuple[str, int], float]:
        return {(r["phase"], r["step"]): r[key] for r in read_jsonl(path) if key in r}

    for key in ("train/loss", "eval/loss"):
        want, got = losses(paths_a["metrics"], key), losses(paths["metrics"], key)
        assert sorted(got) == sorted(want), key
        assert all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want), (key, got, want)
    # the warm start from the HF export: phase 2's step-0 eval (the exported model's eval loss) is there, and equal
    # to A's step-0 eval of the checkpoint it was exported from (checked in the loop above)
    assert ("seq4096", 0) in losses(paths["metrics"], "eval/loss")
    # data order: every micro-batch of phase 2 (rows and masks), before the crash and after the resume
    run_a, run_b = Path(plans_a[1].run_dir), storage / recipe_a.name / Path(plans_a[1].run_dir).name
    ref = {k: r["sha"] for k, r in traces(run_a).items()}
    seen = all_traces(run_b)
    assert {k for k, _ in seen} == set(ref) and len(seen) > len(ref)  # steps 4-5 ran twice
    assert all(sha == ref[k] for k, sha in seen)
