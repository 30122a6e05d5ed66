"""LR schedules and optimizers: the closed formula of every segment against the real schedulers, step by step
and across phase boundaries; StableAdamW / AdamW with the no-decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from neobert.training import lr_lambda
from pipelines.train.schedule import (
    LRSegment,
    RecipeLR,
    build_lr_scheduler,
    build_optimizer,
    segment_from_train,
)


def scheduler_lrs(segments: list[LRSegment]) -> list[float]:
    """What a recipe run does: one parameter set, a new LR scheduler at each phase start, one step per step."""
    p = torch.nn.Parameter(torch.zeros(1))
    out: list[float] = []
    for seg in segments:
        opt = torch.optim.SGD([p], lr=seg.lr)
        sched = build_lr_scheduler(opt, seg)
        for _ in range(seg.num_steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


PHASES = [
    LRSegment(lr=1e-3, num_steps=17, kind="cosine", warmup_steps=4, min_lr_ratio=0.1),
    LRSegment(lr=1e-4, num_steps=9, kind="constant"),
    LRSegment(lr=8e-4, num_steps=20, kind="wsd", warmup_steps=5, stable_steps=15),
    LRSegment(lr=8e-4, num_steps=11, kind="wsd", decay_steps=11, decay_shape="1-sqrt"),
    LRSegment(
        lr=5e-4,
        num_steps=12,
        kind="wsd",
        warmup_steps=3,
        stable_steps=4,
        decay_steps=5,
        decay_shape="linear",
        min_lr_ratio=0.02,
    ),  # fmt: skip
    LRSegment(
        lr=5e-4, num_steps=10, kind="wsd", warmup_steps=2, stable_steps=3, decay_steps=5, min_lr_ratio=0.1
    ),
    # NeoBERT phase 1 shape: the decay ends before the phase does, the rest is held at the floor
    LRSegment(lr=1e-4, num_steps=14, kind="wsd", warmup_steps=2, decay_steps=8, min_lr_ratio=0.1),
]


def test_lr_at_every_global_step_equals_the_formula_across_phases():
    recipe = RecipeLR(tuple(PHASES))
    got = scheduler_lrs(PHASES)
    assert len(got) == recipe.num_steps == sum(s.num_steps for s in PHASES)
    for g, lr in enumerate(got):
        assert lr == pytest.approx(recipe.lr_at(g), rel=1e-12, abs=1e-15), (g, recipe.phase_of(g))
    # boundaries: phase 3 (1-sqrt decay) starts at the peak and ends one step before its floor (0)
    start = recipe.offsets[3]
    assert got[start] == pytest.approx(8e-4)
    assert got[start + 10] == pytest.approx(8e-4 * (1 - math.sqrt(10 / 11)))
    with pytest.raises(ValueError, match="outside"):
        recipe.lr_at(recipe.num_steps)


def test_legacy_segment_matches_neobert_training_lr_lambda():
    seg = PHASES[0]
    for s in range(seg.num_steps):
        want = lr_lambda(s, warmup_steps=4, total_steps=17, schedule="cosine", min_lr_ratio=0.1)
        assert seg.factor(s) == pytest.approx(want)


def test_wsd_parts_must_fit_the_phase():
    with pytest.raises(ValueError, match="exceeds the phase's num_steps=10"):
        LRSegment(lr=1e-3, num_steps=10, kind="wsd", warmup_steps=2, stable_steps=3, decay_steps=6)
    with pytest.raises(ValueError, match="decay shape"):
        LRSegment(lr=1e-3, num_steps=10, kind="wsd", decay_steps=10, decay_shape="sqrt")


@pytest.mark.parametrize("name", ["adamw", "stable_adamw"])
def test_optimizers_share_the_no_decay_groups(name):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]  # only the Linear weight
    assert len(no_decay["params"]) == 4  # embedding, bias, norm weight + bias
    assert type(opt).__name__ == {"adamw": "AdamW", "stable_adamw": "StableAdamW"}[name]
    loss = model[2](model[1](model[0](torch.tensor([1, 2])))).pow(2).sum()
    loss.backward()
    before = model[1].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[1].weight)
    with pytest.raises(ValueError, match="train.optimizer must be one of"):
        build_optimizer(model, "sgd", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.9), eps=1e-8)


def test_train_section_keys_build_the_segment_and_refuse_a_wsd_longer_than_the_run():
    from pipelines.train.config import TrainSection

    t = TrainSection(num_steps=14, lr=1e-4, schedule="wsd", warmup_steps=2, decay_steps=8, min_lr_ratio=0.1)
    assert segment_from_train(t) == PHASES[-1]
    # the cosine schedule ignores the wsd fields
    t = TrainSection(num_steps=17, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    assert segment_from_train(t) == PHASES[0]
    with pytest.raises(ValueError, match=r"train.decay_steps=10 = 14 exceeds train.num_steps=12"):
        TrainSection(num_steps=12, schedule="wsd", warmup_steps=2, stable_steps=2, decay_steps=10)


def test_wsd_holds_the_floor_after_its_decay():
    got = scheduler_lrs([PHASES[-1]])
    assert got[-4:] == pytest.approx([1e-5] * 4)  # steps 10..13: decay ended at step 10
    assert got[9] > 1e-5


@pytest.mark.parametrize("seg", [PHASES[4], PHASES[0]], ids=["wsd", "cosine"])
def test_a_resumed_scheduler_continues_the_formula(seg, tmp_path):
    """The runner saves `scheduler.state_dict()` in train_state.pt and loads it into a fresh scheduler on resume
    (the optimizer's state, with each group's current LR, comes back through dcp/)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=seg.lr)
    sched = build_lr_scheduler(opt, seg)
    for _ in range(5):
        opt.step()
        sched.step()
    torch.save({"scheduler": sched.state_dict(), "optim": opt.state_dict()}, tmp_path / "state.pt")
    opt2 = torch.optim.SGD([p], lr=seg.lr)
    sched2 = build_lr_scheduler(opt2, seg)
    saved = torch.load(tmp_path / "state.pt", weights_only=False)
    opt2.load_state_dict(saved["optim"])
    sched2.load_state_dict(saved["scheduler"])
    got = []
    for _ in range(5, seg.num_steps):
        got.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert got == pytest.approx([seg.lr_at(s) for s in range(5, seg.num_steps)])
