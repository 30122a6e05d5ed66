"""End-to-end contrastive fine-tuning on the embedded data (real Ray cluster, 2 CPU workers).

A subset of the embedded sources is validated with the real validation pipeline, then a freshly initialised
tiny NeoBERT (`random:tiny`: pretraining first would double the test time; the no-argument job starts from the
embedded pretraining checkpoint) is fine-tuned for a few dozen steps with the cross-worker gather. The run crashes
once on purpose after its first checkpoint (`failure.inject_failure_at_step`) and must resume from it. Held-out recall@10 after
training must beat recall@10 before it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROWS_PER_SOURCE = 400


def _subset_sources(tmp: Path) -> list:
    from pipelines.contrastive.sources import SourceConfig
    from pipelines.embedded import materialize

    out = []
    for name, path in sorted(materialize().contrastive_sources.items()):
        lines = path.read_text(encoding="utf-8").splitlines()
        stride = max(1, len(lines) // ROWS_PER_SOURCE)  # spread over the whole file (all Bible books)
        sub = tmp / f"{name}.jsonl"
        sub.write_text("\n".join(lines[::stride][:ROWS_PER_SOURCE]) + "\n", encoding="utf-8")
        out.append(SourceConfig(name=name, path=str(sub)))
    return out


def test_contrastive_training_improves_heldout_recall(ray_session, tmp_path):
    from neobert.checkpoint import load_model_dir
    from pipelines.contrastive.sources import ValidateContrastiveConfig
    from pipelines.contrastive.validate import validate_contrastive
    from pipelines.train import contrastive as ct

    val_dir = tmp_path / "validated"
    validate_contrastive(ValidateContrastiveConfig(sources=_subset_sources(tmp_path), output=str(val_dir)))
    rows = ct.load_rows(ct.ensure_validated(str(val_dir)))
    assert rows.num_rows > 1.5 * ROWS_PER_SOURCE

    out = tmp_path / "runs" / "ft"
    cfg = ct.load_contrastive_config(None, [
        f"--data.input_dir={val_dir}", "--data.eval_fraction=0.2", "--data.num_eval_rows=150",
        "--data.max_seq_len=64", "--model.init=random:tiny", "--model.pooling=mean", "--train.batch_size=16",
        "--train.num_steps=40", "--train.lr=1e-3", "--train.warmup_steps=4", "--logging.every_steps=5",
        "--logging.trace_data=true", "--checkpoint.every_steps=20", "--failure.inject_failure_at_step=25",
        f"--checkpoint.storage_path={out.parent}", "--checkpoint.name=ft", "--scaling.num_workers=2",
        "--scaling.resources_per_worker={CPU: 0.5}", "--failure.max_failures=1",
    ])  # fmt: skip
    evals = ct.fit(cfg)  # streams data.input_dir: the driver reads only the per-source counts
    saved = json.loads((out / "eval.json").read_text())
    assert saved["before"] == evals["before"] and saved["after"] == evals["after"]
    for phase in ("before", "after"):
        assert {"recall@1", "recall@10", "mrr@10"} <= set(saved[phase])
    before, after = saved["before"]["recall@10"], saved["after"]["recall@10"]
    print(f"held-out recall@10 {before:.3f} -> {after:.3f}; mrr@10 {saved['before']['mrr@10']:.3f} -> "
          f"{saved['after']['mrr@10']:.3f}")  # fmt: skip
    assert after > before + 0.05, saved
    assert saved["step"] == 40
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["num_steps"] == 40

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == list(
        range(5, 45, 5)
    )  # records past the checkpoint were dropped
    assert all("train/tokens_per_s" in r for r in train_records)
    # every query saw the GLOBAL batch: 2 workers x 16 rows x (1 positive + 1 hard negative) candidates
    assert {r["train/candidates"] for r in train_records} == {64.0}
    # the last rank crashed after step 25; the restart resumed from the step-20 checkpoint and replayed steps 21-25
    # with the same batches (the data position is the step)
    for rank in (0, 1):
        trace = [json.loads(line) for line in (out / f"data_trace.rank{rank}.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in trace]
        assert steps == list(range(1, 26)) + list(range(21, 41)), steps
        first = {r["step"]: r["sha"] for r in trace[:25]}
        assert [r["sha"] for r in trace[25:30]] == [first[s] for s in range(21, 26)], f"rank {rank}"
    assert sum("eval/before/recall@10" in r for r in records if r["step"] == 0) == 1  # "before" not re-run
    md = load_model_dir(out / "model")
    assert md.kind == "encoder" and md.pooling == "mean" and md.extra["step"] == 40
