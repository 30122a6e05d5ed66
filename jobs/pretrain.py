"""Pretrain NeoBERT with masked LM on Ray Train.

  python jobs/pretrain.py                                   # tiny preset, embedded corpus, 2 CPU workers
  python jobs/pretrain.py --config configs/pretrain_base_1gpu.yaml --train.num_steps 200
  python jobs/pretrain.py --data.packed_dir outputs/preprocessed --train.tokens_per_micro_batch 16384
  python jobs/pretrain.py --config configs/recipes/neobert_tiny.yaml --data_root DATA   # phases (docs/recipes.md)
  ray job submit --working-dir . -- python jobs/pretrain.py --checkpoint.storage_path /shared/runs

Re-running with the same checkpoint.name and storage path resumes from the latest checkpoint. With
data.packed_dir, the pack size is taken from the data's report.json (an explicit --data.pack_tokens must
match it). Under `ray job submit` (RAY_ADDRESS set) it joins that cluster; otherwise it starts Ray in-process
(`--address auto` joins a cluster started with `ray start` on this machine instead).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / `--working-dir .`

from pipelines import cli, contracts  # noqa: E402
from pipelines.eval.in_training import VALIDATOR  # noqa: E402
from pipelines.train import recipe  # noqa: E402
from pipelines.train.pretrain import (  # noqa: E402
    DEFAULT_CONFIG,
    PretrainConfig,
    fit,
    load_pretrain_config,
    prepare_pretrain_run,
)
from pipelines.train.sinks import METRICS_FILE  # noqa: E402


def prepare(cfg: PretrainConfig, ctx: cli.Context) -> list[str]:
    """Driver-side checks before Ray starts: the validation tasks; a packed dir (data.pack_tokens comes from its
    report.json unless the user set it)."""
    VALIDATOR.check(cfg.validation)  # a typo in a task name is an error even while validation is off
    if not cfg.data.packed_dir:
        return []
    contracts.check_packed_dir(cfg.data.packed_dir)
    pack = contracts.packed_pack_tokens(
        cfg.data.packed_dir, cfg.data.pack_tokens, user_set=ctx.user_set("data.pack_tokens")
    )
    if pack == cfg.data.pack_tokens:
        return []
    contracts.check_pack_fits_model(cfg.data.packed_dir, pack, cfg.model.max_position_embeddings)
    budget = contracts.tokens_per_micro_batch_for(
        pack, cfg.train.tokens_per_micro_batch, user_set=ctx.user_set("train.tokens_per_micro_batch")
    )
    return [f"--data.pack_tokens={pack}", f"--train.tokens_per_micro_batch={budget}"]


def run(cfg: PretrainConfig, ctx: cli.Context) -> int:
    # Config, data and resume checks first: an error is one line, before Ray starts (and never retried).
    cfg = prepare_pretrain_run(cfg)
    # >= 4 logical CPUs locally so Train workers and Ray Data tasks fit on small boxes
    ctx.init_ray(local_num_cpus=max(4, os.cpu_count() or 1))
    print(f"run dir: {cfg.run_dir}", flush=True)
    result = fit(cfg, validator=VALIDATOR, prepared=True)  # Ray Train V2 raises when the run fails for good
    print(f"metrics: {os.path.join(cfg.run_dir, METRICS_FILE)}")
    print(f"final checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    if result.error:
        raise result.error
    return 0


SPEC = cli.JobSpec(
    name="pretrain",
    doc=__doc__,
    config_cls=PretrainConfig,
    default_config=DEFAULT_CONFIG,
    load=load_pretrain_config,
    prepare=prepare,
    output_keys=("checkpoint.storage_path",),
    input_keys=("data.packed_dir", "train.init_from"),
)


RECIPE_SPEC = recipe.job_spec(__doc__)  # --config configs/recipes/*.yaml: several phases, one run each


def spec_for(argv: list[str]) -> cli.JobSpec:
    """The recipe job when `--config` names a recipe (a YAML with `phases`), else the single run."""
    return RECIPE_SPEC if recipe.recipe_config_in(argv) else SPEC


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    spec = spec_for(argv)
    if spec is RECIPE_SPEC:
        return cli.main(spec, functools.partial(recipe.run_job, validator=VALIDATOR), argv)
    return cli.main(spec, run, argv)


if __name__ == "__main__":
    sys.exit(main())
