"""The world-size-independent global data order (`pipelines.train.data`), on in-memory Arrow tables (no Ray)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pytest

from neobert.schema import PACKED_SCHEMA
from pipelines.train.config import ConfigError
from pipelines.train.data import (
    BatchRamp,
    DataExhausted,
    GlobalStepSource,
    MixtureSection,
    SourceSection,
    plan_accumulation,
    row_keys,
)

PACK = 16


def packed_table(uid0: int, lengths: list[int]) -> pa.Table:
    """One segment per row; every token of row i is the row's uid (uid0 + i), so a row is recognizable anywhere."""
    ids = [[uid0 + i] * n for i, n in enumerate(lengths)]
    return pa.table(
        {
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "position_ids": pa.array([list(range(n)) for n in lengths], pa.list_(pa.int32())),
            "cu_seqlens": pa.array([[0, n] for n in lengths], pa.list_(pa.int32())),
            "max_seqlen": pa.array(lengths, pa.int32()),
            "num_tokens": pa.array(lengths, pa.int32()),
            "num_segments": pa.array([1] * len(lengths), pa.int32()),
        },
        schema=PACKED_SCHEMA,
    )


def make_source(uid0: int, num_rows: int, seed: int, batch_rows: int = 7) -> tuple[pa.Table, list[int]]:
    lengths = np.random.default_rng(seed).integers(4, PACK + 1, num_rows).tolist()
    return packed_table(uid0, lengths), lengths


class Reader:
    """`open_epoch`: the table in batches of `batch_rows` (another batch size per reader must not matter)."""

    def __init__(self, table: pa.Table, batch_rows: int = 7) -> None:
        self.table, self.batch_rows, self.opened = table, batch_rows, []

    def __call__(self, epoch: int):
        self.opened.append(epoch)
        return iter(self.table.to_batches(max_chunksize=self.batch_rows))


def row_uids(batch) -> list[int]:
    """The uid of every real row of a collated batch (one segment per row in these tables)."""
    cu = batch.cu_seqlens.numpy()
    starts = [int(s) for s in cu[:-1] if s < batch.num_tokens]
    return [int(batch.input_ids[s]) for s in starts]


def mixture(*sources: SourceSection, gbt: int = 6 * PACK, window: int = 5, **kw) -> MixtureSection:
    return MixtureSection(
        sources=list(sources), global_batch_tokens=gbt, shuffle_window_rows=window, prefetch_steps=0, **kw
    )


TABLES = {"a": make_source(1000, 23, 1)[0], "b": make_source(5000, 41, 2)[0]}


def opener(batch_rows: int = 7):
    return {n: Reader(t, batch_rows) for n, t in TABLES.items()}


def run(cfg, *, world: int, m: int, steps: int, state=None, batch_rows: int = 7):
    """Per global step: the rows of every rank in rank order (uids and row keys), and the state after each step."""
    srcs = [
        GlobalStepSource(
            cfg, opener(batch_rows + r), pack_tokens=PACK, rows_per_micro_batch=m, rank=r, world_size=world,
            state=json.loads(json.dumps(state)) if state else None,
        )
        for r in range(world)
    ]  # fmt: skip
    out, states = [], []
    for _ in range(steps):
        uids, keys = [], []
        for s in srcs:
            batches = s.next_step()  # global step s.step - 1 (0-based): ramp.rows of it over all ranks
            assert len(batches) == cfg.ramp(PACK).rows(s.step - 1) // (world * m)
            for b in batches:
                assert b.row_keys is not None and len(b.row_keys) == b.num_rows == m
                uids += row_uids(b)
                keys += b.row_keys.tolist()
        out.append((uids, keys))
        st = [s.state_dict() for s in srcs]
        assert all(x == st[0] for x in st), "every rank must hold the same global position"
        states.append(st[0])
    for s in srcs:
        s.close()
    return out, states


TWO = (SourceSection("a", "/a", weight=1.0), SourceSection("b", "/b", weight=3.0))


@pytest.mark.parametrize("world,m", [(2, 1), (3, 2), (6, 1), (1, 3)])
def test_global_order_does_not_depend_on_world_size(world, m):
    cfg = mixture(*TWO)
    ref, _ = run(cfg, world=1, m=2, steps=12)
    got, _ = run(cfg, world=world, m=m, steps=12)
    assert got == ref  # the same rows, in the same order, with the same keys in every global step
    uids = [u for step, _ in ref for u in step]
    assert len(uids) == 72


def test_resume_at_every_step_on_another_world_and_micro_batch_size():
    cfg = mixture(*TWO)
    steps = 14
    ref, states = run(cfg, world=2, m=3, steps=steps)
    for k in range(steps):
        for world, m in [(3, 1), (1, 2), (6, 1)]:
            got, _ = run(cfg, world=world, m=m, steps=steps - k - 1, state=states[k])
            assert got == ref[k + 1 :], f"resume after step {k + 1} on W={world}, m={m}"
    # within one epoch of a source no row comes twice, and consumption covers each epoch fully before the next
    seen = [u for step, _ in ref for u in step]
    for uid0, n in ((1000, 23), (5000, 41)):
        rows = [u for u in seen if uid0 <= u < uid0 + n]
        for e in range(len(rows) // n):
            assert sorted(rows[e * n : (e + 1) * n]) == list(range(uid0, uid0 + n))


def test_state_is_json_and_counts_global_position():
    cfg = mixture(*TWO)
    _, states = run(cfg, world=2, m=1, steps=9)
    st = states[-1]
    assert json.loads(json.dumps(st)) == st
    assert st["global_step"] == 9 and st["rows_per_step"] == 6
    rows = sum(s["rows"] for s in st["sources"].values())
    assert rows == 54
    for name, n in (("a", 23), ("b", 41)):
        s = st["sources"][name]
        assert s["rows"] == s["epoch"] * n + s["rows_in_epoch"]


def test_epoch_rollover_reshuffles_and_counts_epochs():
    cfg = mixture(SourceSection("a", "/a"), gbt=4 * PACK, window=5)
    out, states = run(cfg, world=1, m=4, steps=12)  # 48 rows of a 23-row source: epochs 0, 1 and 2 begin
    uids = [u for step, _ in out for u in step]
    e0, e1 = uids[:23], uids[23:46]
    assert sorted(e0) == sorted(e1) == list(range(1000, 1023))
    assert e0 != e1, "each epoch has its own permutation"
    assert states[-1]["sources"]["a"] == {"epoch": 2, "rows_in_epoch": 2, "tokens": states[-1]["sources"]["a"]["tokens"],
                                          "rows": 48, "exhausted": False}  # fmt: skip
    keys = [k for _, ks in out for k in ks]
    assert len(set(keys)) == 48, "row keys differ across epochs"
    assert keys[:23] == row_keys("a", 0, np.arange(23)).tolist()


def test_shuffle_window_permutes_within_windows_only_and_zero_keeps_file_order():
    out, _ = run(mixture(SourceSection("a", "/a"), gbt=PACK, window=0), world=1, m=1, steps=23)
    assert [u for step, _ in out for u in step] == list(range(1000, 1023))
    out, _ = run(mixture(SourceSection("a", "/a"), gbt=PACK, window=5), world=1, m=1, steps=23)
    uids = [u for step, _ in out for u in step]
    assert uids != list(range(1000, 1023))
    for w in range(5):
        assert sorted(uids[w * 5 : w * 5 + 5]) == list(range(1000 + w * 5, min(1023, 1005 + w * 5)))


def test_batching_of_the_input_stream_does_not_matter():
    cfg = mixture(*TWO)
    a, _ = run(cfg, world=2, m=1, steps=10, batch_rows=1)
    b, _ = run(cfg, world=2, m=1, steps=10, batch_rows=50)
    assert a == b


def test_mixture_token_share_within_one_percent():
    tables = {n: make_source(10_000 * (i + 1), 97, 10 + i)[0] for i, n in enumerate("xyz")}
    weights = {"x": 0.2, "y": 0.4, "z": 0.4}
    cfg = mixture(*(SourceSection(n, f"/{n}", weight=w) for n, w in weights.items()), gbt=4 * PACK, window=16)
    src = GlobalStepSource(
        cfg, {n: Reader(t) for n, t in tables.items()}, pack_tokens=PACK, rows_per_micro_batch=2, world_size=2
    )
    tokens = dict.fromkeys(weights, 0.0)
    for _ in range(100):  # 400 rows, several epochs of every source
        src.next_step()
        for n in weights:
            tokens[n] += src.step_stats()[f"data/tokens/{n}"]
    total = sum(tokens.values())
    st = src.state_dict()["sources"]
    for n, w in weights.items():
        assert abs(tokens[n] / total - w) < 0.01, (n, tokens[n] / total)
        assert abs(src.step_stats()[f"data/share/{n}"] - w) < 0.01
        assert st[n]["tokens"] == tokens[n]
    assert st["y"]["epoch"] >= 1  # 160 rows of a 97-row source


def _exhaust_cfg(on_exhausted):
    return mixture(
        SourceSection("a", "/a", weight=1.0, repeat=False), SourceSection("b", "/b", weight=1.0),
        gbt=4 * PACK, on_exhausted=on_exhausted,
    )  # fmt: skip


def test_non_repeating_source_stops_the_stream():
    src = GlobalStepSource(_exhaust_cfg("stop"), opener(), pack_tokens=PACK, rows_per_micro_batch=4)
    n = 0
    with pytest.raises(DataExhausted, match="'a' .*repeat=false.*ran out"):
        while True:
            src.next_step()
            n += 1
    st = src.state_dict()
    assert st["global_step"] == n and st["sources"]["a"]["rows"] <= 23
    assert sum(s["rows"] for s in st["sources"].values()) == 4 * n  # the partial step is not counted


def test_non_repeating_source_renormalizes_and_resumes_after_running_out():
    cfg = _exhaust_cfg("renormalize")
    ref, states = run(cfg, world=1, m=4, steps=30)
    st = states[-1]["sources"]
    assert st["a"]["rows"] == 23 and st["a"]["exhausted"]
    assert st["b"]["rows"] == 120 - 23 and st["b"]["epoch"] == 2
    assert [u for u in ref[-1][0] if u < 5000] == []  # only b after a ran out
    for k in (5, 20):  # before and after the exhaustion
        got, _ = run(cfg, world=2, m=2, steps=30 - k - 1, state=states[k])
        assert got == ref[k + 1 :]


def test_all_sources_exhausted():
    cfg = mixture(
        SourceSection("a", "/a", repeat=False), SourceSection("b", "/b", repeat=False),
        gbt=4 * PACK, on_exhausted="renormalize",
    )  # fmt: skip
    src = GlobalStepSource(cfg, opener(), pack_tokens=PACK, rows_per_micro_batch=4)
    with pytest.raises(DataExhausted, match="every data source ran out"):
        for _ in range(100):
            src.next_step()
    assert src.state_dict()["global_step"] == 16  # 64 rows = 16 full steps of 4


def test_background_prefetch_gives_the_same_steps_and_stops_at_max_steps():
    cfg = mixture(*TWO)
    ref, _ = run(cfg, world=2, m=1, steps=8)
    pre = MixtureSection(**{**cfg.__dict__, "prefetch_steps": 3})
    with GlobalStepSource(
        pre, opener(), pack_tokens=PACK, rows_per_micro_batch=3, rank=1, world_size=2, max_steps=8
    ) as src:
        got = [row_uids(src.next_step()[0]) for _ in range(8)]
        with pytest.raises(RuntimeError, match="past max_steps"):
            src.next_step()
    assert got == [uids[3:] for uids, _ in ref]


def test_config_and_plan_errors_name_the_fix(caplog):
    with pytest.raises(ValueError, match="rename it"):
        SourceSection("a/b", "/x")
    with pytest.raises(ValueError, match="set its path"):
        SourceSection("a", "")
    with pytest.raises(ValueError, match="weight must be"):
        SourceSection("a", "/a", weight=0)
    with pytest.raises(ValueError, match="distinct names"):
        MixtureSection(sources=[SourceSection("a", "/a"), SourceSection("a", "/b")])
    with pytest.raises(ValueError, match="set it to e.g. 96"):
        MixtureSection(sources=[SourceSection("a", "/a")], global_batch_tokens=100).check(PACK)
    with pytest.raises(ValueError, match="no data sources"):
        MixtureSection().check(PACK)
    with pytest.raises(ValueError, match="workers x rows_per_micro_batch divides 6"):
        plan_accumulation(6 * PACK, PACK, world_size=4, rows_per_micro_batch=1)
    assert plan_accumulation(12 * PACK, PACK, world_size=2, rows_per_micro_batch=3) == 2
    with caplog.at_level(logging.WARNING):
        MixtureSection(sources=[SourceSection("a", "/a")], on_exhausted="renormalize")
    assert "has no effect" in caplog.text


def test_resume_refuses_another_order():
    cfg = mixture(*TWO)
    _, states = run(cfg, world=1, m=1, steps=2)
    other = mixture(*TWO, seed=1)
    with pytest.raises(ValueError, match="set seed: 0 to resume"):
        GlobalStepSource(other, opener(), pack_tokens=PACK, rows_per_micro_batch=1, state=states[-1])
    with pytest.raises(ValueError, match="differ from the config"):
        GlobalStepSource(
            mixture(TWO[0]), opener(), pack_tokens=PACK, rows_per_micro_batch=1, state=states[-1]
        )


def test_resume_refuses_the_position_of_another_job():
    cfg = mixture(*TWO)
    _, states = run(cfg, world=1, m=1, steps=2)
    pairs = {**states[-1], "kind": "contrastive"}  # same sources and order: only the kind tells them apart
    with pytest.raises(
        ValueError, match=r"one of a 'contrastive' order, not of the packed-row order of pretraining"
    ):
        GlobalStepSource(cfg, opener(), pack_tokens=PACK, rows_per_micro_batch=1, state=pairs)
    GlobalStepSource(cfg, opener(), pack_tokens=PACK, rows_per_micro_batch=1, state=states[-1]).close()


def test_empty_source_is_an_error():
    empty = {"a": Reader(TABLES["a"].slice(0, 0))}
    src = GlobalStepSource(mixture(SourceSection("a", "/a")), empty, pack_tokens=PACK, rows_per_micro_batch=1)
    with pytest.raises(ValueError, match="holds no rows"):
        src.next_step()


def test_resume_with_another_global_batch_is_refused():
    cfg = mixture(*TWO)
    _, states = run(cfg, world=2, m=1, steps=4)
    with pytest.raises(ValueError, match=r"global step is 6 rows .* set global_batch_tokens: 96 \(or leave"):
        run(mixture(*TWO, gbt=4 * PACK), world=2, m=2, steps=1, state=states[3])


@pytest.mark.parametrize("rows_in_epoch", [24, 999])
def test_resume_past_the_end_of_a_changed_source_is_an_error(rows_in_epoch):
    cfg = mixture(*TWO)
    _, states = run(cfg, world=1, m=1, steps=2)
    st = json.loads(json.dumps(states[-1]))
    st["sources"]["a"]["rows_in_epoch"] = rows_in_epoch  # source a has 23 rows
    st["sources"]["b"]["tokens"] = 10**6  # so that a is picked next
    src = GlobalStepSource(cfg, opener(), pack_tokens=PACK, rows_per_micro_batch=1, state=st)
    with pytest.raises(ValueError, match="'a': the saved position .* past the end of its epoch"):
        src.next_step()


def test_rows_longer_than_pack_tokens_are_an_error_on_every_rank():
    big = {"a": Reader(packed_table(1, [4] * 12 + [PACK + 3]))}
    cfg = mixture(SourceSection("a", "/a"), gbt=2 * PACK, window=5)
    for rank in (0, 1):  # rank 0 never collates row 12; it still refuses it
        src = GlobalStepSource(cfg, big, pack_tokens=PACK, rows_per_micro_batch=1, rank=rank, world_size=2)
        with pytest.raises(ValueError, match="'a': input row 12 of epoch 0 holds 19 tokens > pack_tokens=16"):
            for _ in range(7):
                src.next_step()


def test_check_sources_on_the_driver(tmp_path):
    import pyarrow.parquet as pq

    from pipelines.train.data import check_sources

    (tmp_path / "ok" / "train").mkdir(parents=True)
    pq.write_table(TABLES["a"], tmp_path / "ok" / "train" / "part-0.parquet")
    good = SourceSection("ok", str(tmp_path / "ok"))
    check_sources(mixture(good), PACK)
    with pytest.raises(ValueError, match="'gone': .* has no train/\\*.parquet shards; build it with"):
        check_sources(mixture(good, SourceSection("gone", str(tmp_path / "gone"))), PACK)


def test_background_thread_hands_over_exhaustion_and_keeps_the_last_full_state():
    cfg = MixtureSection(**{**_exhaust_cfg("stop").__dict__, "prefetch_steps": 3})
    sync = GlobalStepSource(_exhaust_cfg("stop"), opener(), pack_tokens=PACK, rows_per_micro_batch=4)
    with GlobalStepSource(cfg, opener(), pack_tokens=PACK, rows_per_micro_batch=4) as src:
        while True:
            try:
                want = sync.next_step()
            except DataExhausted:
                break
            assert row_uids(src.next_step()[0]) == row_uids(want[0])
        with pytest.raises(DataExhausted):
            src.next_step()
        with pytest.raises(DataExhausted):  # and again on every later call
            src.next_step()
        assert src.state_dict() == sync.state_dict()


# ----------------------------------------------------------------------------------------------------------------
# Batch-size warmup
# ----------------------------------------------------------------------------------------------------------------
def ramp_cfg(**kw) -> MixtureSection:
    """12 rows per full step; the warmup starts at 4 rows and adds 4 (3 levels), 2 steps per level."""
    warm = dict(batch_warmup_start_tokens=4 * PACK, batch_warmup_tokens=2 * PACK * 4 * 3)
    return mixture(*TWO, gbt=12 * PACK, **{**warm, **kw})


RAMPS = [  # (global batch, start, warmup) in tokens of pack 16
    (12 * PACK, 4 * PACK, 384),
    (12 * PACK, 3 * PACK, 5000),
    (12 * PACK, 6 * PACK, 1),  # n rounds to 0: at least one step per level
    (4608 * PACK, 768 * PACK, 10**9),
    (12 * PACK, 0, 0),  # flat
]


@pytest.mark.parametrize("gbt,start,warm", RAMPS)
def test_ramp_rows_levels_and_token_budget(gbt, start, warm):
    r = BatchRamp.from_tokens(gbt, PACK, start, warm)
    R, S = gbt // PACK, (start // PACK) or gbt // PACK
    K = R // S
    assert (r.full_rows, r.start_rows, r.num_levels, r.enabled) == (R, S, K, K > 1)
    steps = r.warmup_steps + 7
    rows = [r.rows(s) for s in range(steps)]
    # levels k x S, each k < K for steps_per_level steps, then R for good
    n = r.steps_per_level
    assert n == (max(1, round(warm / (PACK * S * K * (K - 1) / 2))) if K > 1 else 0)
    assert rows == [k * S for k in range(1, K) for _ in range(n)] + [R] * 7
    assert [lv[0] for lv in r.levels()] == [k * S for k in range(1, K + 1)]
    # tokens_through is the sum of every step's budget, and steps_for_tokens its inverse
    cum = [0]
    for x in rows:
        cum.append(cum[-1] + x * PACK)
    assert [r.tokens_through(k) for k in range(steps + 1)] == cum
    assert r.tokens_through(-1) == 0 and r.steps_for_tokens(0) == 1 and r.steps_for_tokens(1) == 1
    for k in range(1, steps + 1):
        assert r.steps_for_tokens(cum[k]) == k  # exactly the budget of k steps
        assert r.steps_for_tokens(cum[k - 1] + 1) == k  # one token more than k - 1 steps: the k-th step
    if K > 1:  # the warmup spans about batch_warmup_tokens (one step per level at least)
        assert r.tokens_through(r.warmup_steps) == n * PACK * S * K * (K - 1) // 2
    assert BatchRamp(**{**r.__dict__}) == r and r.identity()["steps_per_level"] == n


def test_modernbert_ramp_spans_fifty_billion_tokens():
    r = BatchRamp.from_tokens(4608 * 1024, 1024, 768 * 1024, 50_000_000_000)
    assert [lv[0] for lv in r.levels()] == [768, 1536, 2304, 3072, 3840, 4608]
    assert r.tokens_through(r.warmup_steps) == pytest.approx(50e9, rel=1e-3)
    assert [r.accumulation(s, 8, 96) for s in (0, r.steps_per_level, r.warmup_steps)] == [1, 2, 6]
    r.check_split(8, 96)
    with pytest.raises(ValueError, match="multiple of 1024 rows"):
        r.check_split(16, 64)


def test_ramp_refusals_name_the_keys_and_a_value_that_works():
    with pytest.raises(
        ValueError, match=r"train\.batch_warmup_start_tokens=64 and train\.batch_warmup_tokens=0: set both"
    ):
        BatchRamp.from_tokens(12 * PACK, PACK, 4 * PACK, 0)
    with pytest.raises(
        ValueError,
        match=r"train\.batch_warmup_start_tokens=70 is not a multiple of pack_tokens=16.* e\.g\. 64",
    ):
        BatchRamp.from_tokens(12 * PACK, PACK, 70, 100)
    with pytest.raises(
        ValueError, match=r"smaller than train\.global_batch_tokens=192 and divide it.* e\.g\. 96"
    ):
        BatchRamp.from_tokens(12 * PACK, PACK, 12 * PACK, 100)
    with pytest.raises(ValueError, match=r"train\.batch_warmup_start_tokens=80 .* e\.g\. 64"):
        BatchRamp.from_tokens(12 * PACK, PACK, 5 * PACK, 100)  # 5 rows do not divide 12
    with pytest.raises(ValueError, match="start_tokens=80"):  # the caller's key names
        BatchRamp.from_tokens(12 * PACK, PACK, 5 * PACK, 100, keys=("start_tokens", "tokens", "global"))
    with pytest.raises(
        ValueError, match=r"train\.batch_warmup_start_tokens=64 and train\.batch_warmup_tokens=0"
    ):
        mixture(*TWO, gbt=12 * PACK, batch_warmup_start_tokens=64).check(PACK)
    with pytest.raises(ValueError, match="make it a multiple of 3 rows"):  # 4 start rows on 3 workers
        GlobalStepSource(ramp_cfg(), opener(), pack_tokens=PACK, rows_per_micro_batch=1, world_size=3)


@pytest.mark.parametrize("world,m", [(2, 1), (4, 1), (1, 4), (2, 2)])
def test_ramp_steps_hold_the_same_rows_on_every_world_and_micro_batch_size(world, m):
    cfg = ramp_cfg()
    ramp = cfg.ramp(PACK)
    ref, _ = run(cfg, world=1, m=1, steps=10)
    assert [len(u) for u, _ in ref] == [ramp.rows(s) for s in range(10)] == [4, 4, 8, 8] + [12] * 6
    got, _ = run(cfg, world=world, m=m, steps=10)
    assert got == ref
    # the ramp takes the same global order as a flat run, only cut into steps of other sizes
    flat, _ = run(mixture(*TWO, gbt=4 * PACK), world=1, m=1, steps=ramp.tokens_through(10) // (4 * PACK))
    assert [u for step, _ in ref for u in step] == [u for step, _ in flat for u in step]


def test_resume_mid_ramp_on_another_world_size_continues_with_the_same_rows():
    cfg = ramp_cfg()
    ref, states = run(cfg, world=2, m=2, steps=9)
    assert states[2]["ramp"] == cfg.ramp(PACK).identity() and states[2]["global_step"] == 3
    for k in range(8):  # after every step, inside every level and after the warmup
        for world, m in [(1, 1), (4, 1), (1, 2)]:
            got, _ = run(cfg, world=world, m=m, steps=9 - k - 1, state=states[k])
            assert got == ref[k + 1 :], f"resume after step {k + 1} on W={world}, m={m}"


def test_resume_with_another_ramp_is_refused_with_the_keys_to_restore():
    _, states = run(ramp_cfg(), world=1, m=1, steps=3)
    # the same full batch without the warmup
    with pytest.raises(
        ConfigError,
        match=r"batch-size warmup .* differs .* set train\.batch_warmup_start_tokens: 64 and "
        r"train\.batch_warmup_tokens: 384 \(2 steps per level\) to resume",
    ):
        run(mixture(*TWO, gbt=12 * PACK), world=1, m=1, steps=1, state=states[-1])
    with pytest.raises(ConfigError, match="set train.batch_warmup_start_tokens: 64"):  # other steps per level
        run(ramp_cfg(batch_warmup_tokens=1000), world=1, m=1, steps=1, state=states[-1])
    # a flat run cannot continue with a warmup; a flat state of an older version (no "ramp") still resumes flat
    flat = mixture(*TWO, gbt=12 * PACK)
    _, flat_states = run(flat, world=1, m=1, steps=2)
    with pytest.raises(
        ConfigError, match=r"set train\.batch_warmup_start_tokens: 0 and train\.batch_warmup_tokens: 0"
    ):
        run(ramp_cfg(), world=1, m=1, steps=1, state=flat_states[-1])
    old = {k: v for k, v in flat_states[0].items() if k != "ramp"}
    assert (
        run(flat, world=2, m=1, steps=1, state=old)[0]
        == run(flat, world=1, m=1, steps=1, state=flat_states[0])[0]
    )
