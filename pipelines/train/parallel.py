"""Data-parallel strategies for the training runtime: DDP or FSDP2, and one sharded checkpoint format for both.

    wrap_model(model, strategy="ddp" | "fsdp2", ...)  -> the module the step calls
    save_sharded(dir, model, optimizer)               -> DCP files (every rank writes its part; collective)
    load_sharded(dir, model, optimizer)               -> reshards onto this run's world size and strategy
    full_model_state(model)                           -> the whole fp32 state dict (collective; for model/)

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each encoder block, then the root (embeddings, final
norm, MLM decoder), as torchtitan does: a block's parameters are all-gathered just before its forward and
backward and freed after, so parameter + gradient + optimizer memory per rank is ~1/W of DDP's. Blocks
compiled with `compile_layers()` are sharded after compilation (the compiled module is what FSDP wraps).
Gradients are averaged (reduce-scatter, `reduce_dtype` fp32), the same reduction DDP applies, so
`neobert.training.train_step`'s exact token-mean scaling holds for both strategies.

Checkpoints go through `torch.distributed.checkpoint` (DCP) with the state-dict helpers of
`torch.distributed.checkpoint.state_dict`: they name parameters by their unwrapped FQN (no `module.` of DDP, no
`_orig_mod.` of torch.compile) and store global tensor shapes, so a checkpoint written by W ranks under one
strategy loads on W' ranks under either (DCP reads the slices each rank needs). DDP's replicated tensors are
written once (DCP's planner de-duplicates them). The same files therefore serve DDP -> FSDP2, FSDP2 -> DDP and
any change of world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

Strategy = Literal["ddp", "fsdp2"]
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp2")
DCP_DIR = "dcp"  # the sharded state inside a checkpoint dir


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"scaling.strategy={strategy!r} is not one of {list(STRATEGIES)}; ddp replicates the model on "
            "every worker, fsdp2 shards parameters, gradients and optimizer state (see docs/scaling.md)"
        )


def wrap_model(
    model: nn.Module,
    *,
    strategy: str,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The module the training step calls: `model` moved to `device` and wrapped for `strategy`.

    ddp: `DistributedDataParallel` when a process group with > 1 rank exists (else the bare model).
    fsdp2: `fully_shard` on every block of `model.encoder.layers` (or `model.layers`), then on the root; the
    returned object is `model` itself (FSDP2 changes the module's class in place). `param_dtype`: the dtype
    parameters are all-gathered in for compute (e.g. torch.bfloat16 on GPUs; None = keep fp32); gradients are
    reduced in fp32 either way. Needs an initialized process group (world size 1 included).
    """
    check_strategy(strategy)
    model = model.to(device)
    if strategy == "ddp":
        if distributed() and dist.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model
    if not distributed():
        raise ValueError(
            "scaling.strategy=fsdp2 needs a torch.distributed process group (Ray Train sets one up on every "
            "worker; in a plain script call torch.distributed.init_process_group first)"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in _blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    owner = getattr(model, "encoder", model)
    layers = getattr(owner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(
            f"fsdp2 shards the encoder blocks, found at model.encoder.layers or model.layers; "
            f"{type(model).__name__} has neither"
        )
    return list(layers)


def unwrap(model: nn.Module) -> nn.Module:
    """The module holding the parameters under their plain names (DDP's `.module`; FSDP2 modules are in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------------ checkpoints
def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Write model (+ optimizer) state under `path` with DCP. Collective: every rank calls it with its own
    (local) `path`; the files of all ranks together form the checkpoint (Ray Train merges the ranks' dirs)."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    Path(path).mkdir(parents=True, exist_ok=True)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=not distributed())


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a `save_sharded` checkpoint into `model` (+ `optimizer`), whatever strategy and world size wrote it.

    Collective. The templates come from this run's own (wrapped) model, so DCP reads exactly the slices this
    rank holds: resharding is a by-product of loading."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ValueError(
            f"{path} is not a complete sharded checkpoint (no .metadata: the write was interrupted?); resume "
            "from an earlier checkpoint or start a new run"
        )
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not distributed())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on the CPU under plain names, for a model dir. Collective under FSDP2
    (parameters are all-gathered); rank 0 gets the tensors, the other ranks an empty dict."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=opts)
    return state if not distributed() or dist.get_rank() == 0 else {}
