"""Contrastive training streams its pairs and resumes on another number of workers (real Ray cluster).

Two synthetic sources are validated in-process; the driver may hold only `data.max_driver_bytes` = 16 KiB of rows,
less than the validated set (`load_rows` under that cap is refused), and training still runs: the rows stream from
the validated files to the workers. The run stops at step 4 on 2 FSDP2 workers and continues to step 8 on 1 DDP
worker. The pairs
each global step trained on (from the per-rank data traces) must be exactly those of the global pair order, which
depends on the per-source counts only: every pair of an uninterrupted run once, none twice, the same pairs in every
step, rank 0's part first.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CAP = 16 << 10
SOURCES = {"alpha": 360, "beta": 120}
WORDS = ["river", "stone", "light", "field", "wind", "house", "bread", "salt", "tree", "night", "king", "road", "sea", "hill", "fire", "cloud", "gold", "song", "water", "iron", "grass", "door", "bird", "snow", "star", "lamp", "ship", "wall", "seed", "horse"]  # fmt: skip


def _write_source(path: Path, name: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(8))
            row = {"query": f"{name} question {i} about {words}", "corpus": f"{name} passage {i}: {words} indeed",
                   "negative": [f"{name} other passage {i}: {' '.join(rng.choice(WORDS) for _ in range(6))}"]}  # fmt: skip
            f.write(json.dumps(row) + "\n")


def _reference_steps(counts: dict[str, int], cfg, num_steps: int) -> list[list[int]]:
    """The pair keys of every global step of an uninterrupted run, from the per-source counts alone (keys are a
    function of source, epoch and position, so stand-in rows of the same counts give the same keys)."""
    import numpy as np
    import pyarrow as pa

    from pipelines.train.contrastive import pair_order
    from pipelines.train.contrastive_data import ContrastiveStepSource
    from pipelines.train.data import row_keys

    pairs = pair_order(cfg, counts)
    pairs.prefetch_steps = 0
    opens = {n: (lambda e, k=k: [pa.table({"i": list(range(k))})]) for n, k in counts.items()}
    src = ContrastiveStepSource(pairs, opens, None, max_steps=num_steps)
    names = [s.name for s in pairs.sources]
    # each row's key from its (source, epoch, position): what the runner's collate gets for it
    src._collate = lambda rows: [int(row_keys(names[r.source], r.epoch, np.array([r.pos]))[0]) for r in rows]
    out = [src.next_step()[0] for _ in range(num_steps)]
    src.close()
    return out


def test_contrastive_streams_past_the_driver_cap_and_resumes_on_fewer_workers(ray_session, tmp_path):
    from pipelines.contrastive.sources import SourceConfig, ValidateContrastiveConfig
    from pipelines.contrastive.validate import validate_contrastive
    from pipelines.train import contrastive as ct

    srcs = []
    for seed, (name, n) in enumerate(SOURCES.items()):
        _write_source(tmp_path / f"{name}.jsonl", name, n, seed)
        srcs.append(SourceConfig(name=name, path=str(tmp_path / f"{name}.jsonl")))
    val_dir = tmp_path / "validated"
    validate_contrastive(ValidateContrastiveConfig(sources=srcs, output=str(val_dir), engine="local"))
    assert ct.load_rows(val_dir).nbytes > 4 * CAP
    with pytest.raises(ValueError, match="passes data.max_driver_bytes=16384"):
        ct.load_rows(val_dir, max_bytes=CAP)  # the validated set does not fit the driver's cap

    out = tmp_path / "runs" / "cs"

    def cfg(workers: int, steps: int, strategy: str = "ddp"):
        return ct.load_contrastive_config(None, [
            f"--data.input_dir={val_dir}", "--data.eval_fraction=0.1", "--data.num_eval_rows=16",
            "--data.max_seq_len=32", f"--data.max_driver_bytes={CAP}", "--data.shuffle_window_rows=64",
            "--model.init=random:tiny", "--train.batch_size=6", "--train.global_batch_size=12",
            f"--train.num_steps={steps}", "--train.warmup_steps=1", "--logging.every_steps=2",
            "--logging.trace_data=true", "--checkpoint.every_steps=4", f"--checkpoint.storage_path={out.parent}",
            "--checkpoint.name=cs", f"--scaling.num_workers={workers}", "--scaling.resources_per_worker={CPU: 0.5}",
            f"--scaling.strategy={strategy}",
        ])  # fmt: skip

    first = ct.fit(cfg(2, 4, "fsdp2"))  # stops at step 4 on 2 workers, sharded (the eval runs on both ranks)
    assert first["step"] == 4
    second = ct.fit(cfg(1, 8))  # continues on 1 worker under DDP (the sharded checkpoint reshards)
    assert second["step"] == 8

    c = cfg(1, 8)
    counts = ct.count_pairs(c, ct.validated_rows(c))
    assert set(counts) == set(SOURCES) and sum(counts.values()) > 0.8 * sum(SOURCES.values())
    want = _reference_steps(counts, c, 8)
    traces = {
        r: [json.loads(x) for x in (out / f"data_trace.rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    }
    assert [t["step"] for t in traces[0]] == list(range(1, 9)) and [t["step"] for t in traces[1]] == [
        1,
        2,
        3,
        4,
    ]
    by_step = {s: [] for s in range(1, 9)}
    for r in (0, 1):  # rank 0's part of a step first
        for t in traces[r]:
            by_step[t["step"]] += t["keys"]
    assert [by_step[s] for s in range(1, 9)] == want  # every step holds the uninterrupted run's pairs
    consumed = [k for s in range(1, 9) for k in by_step[s]]
    assert len(consumed) == len(set(consumed)) == 8 * 12  # none twice
    state = json.loads(sorted(out.glob("checkpoint_*/train_state.json"))[-1].read_text())
    assert state["world_size"] == 1 and state["data"]["global_step"] == 8 and state["strategy"] == "ddp"
    assert "recall@10" in first["after"] and "recall@10" in second["after"]
    assert sum(s["rows"] for s in state["data"]["sources"].values()) == 96
