"""End-to-end contrastive fine-tuning on the embedded data (real Ray cluster, 2 CPU workers).

A subset of the embedded sources is validated with the real validation pipeline, then a freshly initialised
tiny NeoBERT (`random:tiny`: pretraining first would double the test time; the no-argument job starts from the
embedded pretraining checkpoint) is fine-tuned for a few dozen steps with the cross-worker gather. The run crashes
once on purpose after its first checkpoint (`fail_at_step`) and must resume from it. Held-out recall@10 after
training must beat recall@10 before it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    from pipelines import contrastive_train as ct
    from pipelines.contrastive.sources import ValidateContrastiveConfig
    from pipelines.contrastive.validate import validate_contrastive

    val_dir = tmp_path / "validated"
    validate_contrastive(ValidateContrastiveConfig(sources=_subset_sources(tmp_path), output=str(val_dir)))
    rows = ct.load_rows(ct.ensure_validated(str(val_dir)))
    assert rows.num_rows > 1.5 * ROWS_PER_SOURCE

    cfg = ct.ContrastiveConfig(
        data=ct.ContrastiveDataConfig(
            input_dir=str(val_dir), eval_fraction=0.2, num_eval_rows=150, max_seq_len=64
        ),
        model=ct.ContrastiveModelConfig(init="random:tiny", pooling="mean"),
        train=ct.ContrastiveTrainConfig(
            batch_size=16,
            max_steps=40,
            lr=1e-3,
            warmup_steps=4,
            log_every=5,
            checkpoint_every=20,
            fail_at_step=25,
        ),
        run=ct.ContrastiveRunConfig(
            output_dir=str(tmp_path / "out"), num_workers=2, cpus_per_worker=0.5, max_failures=1
        ),
    )
    evals = ct.run_contrastive(cfg, rows)
    out = tmp_path / "out"
    saved = json.loads((out / "eval.json").read_text())
    assert saved["before"] == evals["before"] and saved["after"] == evals["after"]
    for phase in ("before", "after"):
        assert {"recall@1", "recall@10", "mrr@10"} <= set(saved[phase])
    before, after = saved["before"]["recall@10"], saved["after"]["recall@10"]
    print(f"held-out recall@10 {before:.3f} -> {after:.3f}; mrr@10 {saved['before']['mrr@10']:.3f} -> "
          f"{saved['after']['mrr@10']:.3f}")  # fmt: skip
    assert after > before + 0.05, saved
    assert saved["step"] == 40

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    assert train_records[-1]["step"] == 40 and all("train/tokens_per_s" in r for r in train_records)
    # every query saw the GLOBAL batch: 2 workers x 16 rows x (1 positive + 1 hard negative) candidates
    assert {r["train/candidates"] for r in train_records} == {64.0}
    # rank 0 crashed after step 25; the restart resumed from the step-20 checkpoint and replayed steps 21-25 with
    # the same batches (the data position is the step), so step 25 is logged twice with the same loss
    at25 = [r["train/loss"] for r in train_records if r["step"] == 25]
    assert len(at25) == 2 and abs(at25[0] - at25[1]) < 1e-4, at25
    assert sum("eval/before/recall@10" in r for r in records if r["step"] == 0) == 1  # "before" not re-run
    md = load_model_dir(out / "model")
    assert md.kind == "encoder" and md.pooling == "mean" and md.extra["step"] == 40
