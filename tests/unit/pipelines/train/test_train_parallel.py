"""DDP and FSDP2 on 2 gloo processes (CPU): same losses, and sharded checkpoints that load on another world size
and under the other strategy. The workers run in spawned processes (as Ray Train's do), one per rank."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neobert.model import NeoBERTConfig, NeoBERTForMLM
from neobert.packing import PackedMeta
from neobert.training import MicroBatch, build_optimizer, train_step
from pipelines.train.parallel import full_model_state, load_sharded, save_sharded, wrap_model

# fp32 throughout; the strategies differ only in the order of the gradient sums (all-reduce vs reduce-scatter)
LOSS_RTOL = 1e-5
NUM_STEPS = 4


def _cfg() -> NeoBERTConfig:
    return NeoBERTConfig.preset("tiny", attn_backend="sdpa", ffn_backend="torch", vocab_size=211)


def _micro_batch(step: int, rank: int, micro: int) -> MicroBatch:
    """A deterministic micro-batch of 3 documents; ranks and steps see different tokens."""
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    lengths = [7, 5, 9]
    ids = torch.randint(5, 200, (sum(lengths),), generator=g)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(ids.shape, generator=g) < 0.3
    pick[0] = True
    labels[pick] = ids[pick]
    ids = torch.where(pick, torch.full_like(ids, 4), ids)
    return MicroBatch(
        input_ids=ids,
        labels=labels,
        meta=PackedMeta.from_lengths(lengths),
        num_masked=int(pick.sum()),
        num_tokens=ids.numel(),
    )


def _init(rank: int, world: int, store: str) -> None:
    # a file store: no port picked in advance that another process on a busy box could take meanwhile
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _train(strategy: str, rank: int, world: int, steps: range, ckpt_in: str | None, ckpt_out: str | None):
    """Build, optionally load, train `steps` (2 accumulation micro-batches per rank and step), optionally save.
    Returns the global loss per step and the full model state (rank 0)."""
    torch.manual_seed(0)  # the same initial weights on every rank and in every run (FSDP2 does not broadcast)
    model = NeoBERTForMLM(_cfg())
    wrapped = wrap_model(model, strategy=strategy, device=torch.device("cpu"))
    opt = build_optimizer(model, lr=3e-3)
    if ckpt_in:
        load_sharded(ckpt_in, wrapped, opt)
    losses = []
    for s in steps:
        # the global batch of step s is the same for any world size: micro-batches (s, j) for j in range(4)
        # are dealt to ranks, 4 // world per rank
        per_rank = 4 // world
        mbs = [_micro_batch(s, 0, j) for j in range(rank * per_rank, (rank + 1) * per_rank)]
        stats = train_step(wrapped, opt, None, mbs, max_grad_norm=1.0)
        loss = stats.loss_sum.clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / float(stats.num_masked_global))
    if ckpt_out:
        save_sharded(ckpt_out, wrapped, opt)
    return losses, full_model_state(wrapped)


def _worker(rank: int, world: int, store: str, jobs: list, out: dict) -> None:
    _init(rank, world, store)
    try:
        results = [_train(*job[:1], rank, world, *job[1:]) for job in jobs]
        if rank == 0:
            out.update({i: r for i, r in enumerate(results)})
    finally:
        dist.destroy_process_group()


def _run(world: int, jobs: list) -> dict:
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, os.path.join(d, "store"), jobs, out), nprocs=world, join=True)
        return dict(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn per world size: uninterrupted DDP and FSDP2 runs, and runs that save at step 2."""
    d = tmp_path_factory.mktemp("ckpt")
    two = _run(
        2,
        [
            ("ddp", range(NUM_STEPS), None, None),
            ("fsdp2", range(NUM_STEPS), None, None),
            ("fsdp2", range(2), None, str(d / "fsdp2_w2")),
            ("ddp", range(2), None, str(d / "ddp_w2")),
        ],
    )
    one = _run(
        1,
        [
            ("ddp", range(2, NUM_STEPS), str(d / "fsdp2_w2"), None),  # FSDP2 on 2 -> DDP on 1
            ("fsdp2", range(2, NUM_STEPS), str(d / "ddp_w2"), None),  # DDP on 2 -> FSDP2 on 1
            ("fsdp2", range(2, 3), str(d / "ddp_w2"), str(d / "fsdp2_w1")),  # ... saved after step 3
        ],
    )
    back = _run(2, [("fsdp2", range(3, NUM_STEPS), str(d / "fsdp2_w1"), None)])  # 1 -> 2 under FSDP2
    return two, one, back


def test_fsdp2_matches_ddp(runs):
    two, _, _ = runs
    ddp, fsdp = two[0][0], two[1][0]
    assert len(ddp) == NUM_STEPS and ddp[-1] < ddp[0]  # it trains
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(ddp), rtol=LOSS_RTOL, atol=0)
    for k, v in two[0][1].items():
        torch.testing.assert_close(two[1][1][k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("job", [0, 1], ids=["fsdp2_w2_to_ddp_w1", "ddp_w2_to_fsdp2_w1"])
def test_resume_on_other_world_size_and_strategy(runs, job):
    two, one, _ = runs
    uninterrupted = two[0][0]
    resumed = one[job][0]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted[2:]), rtol=LOSS_RTOL, atol=0)


def test_resume_one_to_two_workers(runs):
    two, _, back = runs
    torch.testing.assert_close(torch.tensor(back[0][0]), torch.tensor(two[0][0][3:]), rtol=LOSS_RTOL, atol=0)


def test_incomplete_checkpoint_is_refused(tmp_path):
    model = NeoBERTForMLM(_cfg())
    with pytest.raises(ValueError, match="not a complete sharded checkpoint"):
        load_sharded(tmp_path, model, None)


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match=r"scaling.strategy='zero3'.*\['ddp', 'fsdp2'\]"):
        wrap_model(NeoBERTForMLM(_cfg()), strategy="zero3", device=torch.device("cpu"))


class _Seen(Exception):
    pass


def test_fsdp2_bf16_keeps_the_blocks_fp32_inputs():
    """With bf16 all-gathered parameters (what GPUs run) FSDP2 must not cast the blocks' floating-point inputs:
    the RoPE tables (cos, sin) stay fp32, as the fused RoPE kernels require (an assertion there failed on the
    H200 before) and as the bare model passes them."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = NeoBERTForMLM(_cfg())
        wrap_model(model, strategy="fsdp2", device=torch.device("cpu"), param_dtype=torch.bfloat16)
        seen: dict[str, torch.dtype] = {}

        def capture(_module, args):
            _x, cos, sin = args[:3]  # x is in the embedding's (all-gathered, bf16) dtype
            seen.update(cos=cos.dtype, sin=sin.dtype)
            raise _Seen  # the inputs are all this test needs

        model.encoder.layers[0].register_forward_pre_hook(capture)
        with pytest.raises(_Seen):
            ids = torch.tensor([5, 6, 7, 8])
            model(
                ids, PackedMeta.from_lengths([4]), ids
            )  # through the root, whose hooks gather the embeddings
        assert seen == {"cos": torch.float32, "sin": torch.float32}, seen
    finally:
        dist.destroy_process_group()
