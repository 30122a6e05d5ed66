"""Validate contrastive (query, positive, negatives) sources -> OUTPUT/{valid,quarantine}/, report.json/.html.

  python jobs/validate_contrastive.py                                   # the embedded sources
  python jobs/validate_contrastive.py --source msmarco=data/msmarco.jsonl --source scifact=data/scifact \\
      --output outputs/contrastive --max-reject-fraction 0.02 --max-seq-len 512 --truncation truncate
  python jobs/validate_contrastive.py --sources-yaml configs/contrastive_sources.example.yaml
  ray job submit --working-dir . -- python jobs/validate_contrastive.py --output /shared/contrastive

--sources-yaml (= --config) is a YAML list of sources, or a mapping with `sources:` plus any config key.
A source rejecting more than --max-reject-fraction of its rows (or yielding none) fails the job with exit 2;
all outputs are still written and the marker says passed=false. See docs/contrastive_data.md.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / `--working-dir .`

from pipelines import cli  # noqa: E402
from pipelines.contrastive.sources import ValidateContrastiveConfig, parse_source_arg  # noqa: E402
from pipelines.contrastive.validate import (  # noqa: E402
    RejectThresholdExceeded,
    check_inputs,
    validate_contrastive,
)
from pipelines.embedded import contrastive_source_configs  # noqa: E402

F = cli.Flag
FLAGS = (
    F(("--source",), "sources", "a source, repeatable", "append", "NAME=PATH",
      lambda s: dataclasses.asdict(parse_source_arg(s))),
    F(("--output",), "output", "output dir: valid/, quarantine/, report.json, report.html", metavar="DIR"),
    F(("--max-reject-fraction",), "max_reject_fraction", "a source rejecting more fails the job", metavar="F"),
    F(("--max-seq-len",), "max_seq_len", "tokens incl. [CLS]/[SEP]", metavar="N"),
    F(("--truncation",), "truncation", "report | truncate | reject (texts over max_seq_len)", metavar="MODE"),
    F(("--tokenize",), "tokenize", "add *_input_ids columns", "none"),
    F(("--engine",), "engine", "ray | local (in-process, no Ray: small inputs)", metavar="ENGINE"),
)  # fmt: skip


def run(cfg: ValidateContrastiveConfig, ctx: cli.Context) -> int:
    if not cfg.sources:  # no --source: the embedded sources
        cfg = dataclasses.replace(cfg, sources=contrastive_source_configs())
    check_inputs(cfg)  # unreadable sources, a source inside the output: refused before Ray starts
    if cfg.engine == "ray":
        ctx.init_ray(include_dashboard=False)
    report = validate_contrastive(cfg)
    t = report["totals"]
    print(
        f"validate_contrastive: {t['rows_read']} rows read, {t['valid']} valid, {t['rejected']} rejected; "
        f"report: {Path(cfg.output) / 'report.html'}"
    )
    for name, s in report["sources"].items():
        print(f"  {name}: {s['valid']}/{s['rows_read']} valid, reasons {s['reasons']}")
    return 0


SPEC = cli.JobSpec(
    name="validate_contrastive",
    doc=__doc__,
    config_cls=ValidateContrastiveConfig,
    flags=FLAGS,
    config_flags=("--sources-yaml", "--config"),
    list_key="sources",
    output_keys=("output",),
    input_keys=("sources[].path", "tokenizer"),
    user_errors=(RejectThresholdExceeded,),
)


def build_config(argv: list[str]) -> ValidateContrastiveConfig:
    return cli.load(SPEC, argv)[0]


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, run, argv)


if __name__ == "__main__":
    sys.exit(main())
