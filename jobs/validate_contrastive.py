"""Validate contrastive (query, positive, negatives) sources -> OUTPUT/{valid,quarantine}/, report.json/.html.

  python jobs/validate_contrastive.py                                   # the embedded sources
  python jobs/validate_contrastive.py --source msmarco=data/msmarco.jsonl --source scifact=data/scifact \
      --output outputs/contrastive --max-reject-fraction 0.02 --max-seq-len 512 --truncation truncate
  python jobs/validate_contrastive.py --sources-yaml configs/contrastive_sources.example.yaml
  ray job submit --working-dir . -- python jobs/validate_contrastive.py --output /shared/contrastive

Exit codes: 0 ok; 2 bad arguments / a source cannot be read; 3 a source exceeds --max-reject-fraction or yields
no rows (all outputs are still written, the marker says passed=false); 1 an unexpected failure. The reason goes
to stderr.
See docs/contrastive_data.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere / ray job submit

from neobert.config_io import from_dict, load_yaml_dict  # noqa: E402
from pipelines.contrastive.sources import ValidateContrastiveConfig, parse_source_arg  # noqa: E402
from pipelines.contrastive.validate import (  # noqa: E402
    RejectThresholdExceeded,
    main_error,
    validate_contrastive,
)
from pipelines.io import describe, unwrap_error  # noqa: E402


def build_config(argv: list[str] | None = None) -> ValidateContrastiveConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH", help="repeatable")
    p.add_argument(
        "--sources-yaml",
        help="YAML: a list of sources, or a mapping with `sources:` plus any config key (output, max_seq_len, ...)",
    )
    p.add_argument("--output", help="output DIR (default outputs/contrastive)")
    p.add_argument("--max-reject-fraction", type=float)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--truncation", choices=["report", "truncate", "reject"])
    p.add_argument("--tokenize", action="store_true", default=None, help="add *_input_ids columns")
    p.add_argument("--tokenizer", help="tokenizer.json or dir (default: pipelines.tokenizer)")
    p.add_argument("--num-validator-actors", type=int)
    p.add_argument("--engine", choices=["ray", "local"], help="local: in-process, no Ray (small inputs)")
    a = p.parse_args(argv)
    data: dict = {}
    if a.sources_yaml:
        path = Path(a.sources_yaml)
        if not path.is_file():
            raise ValueError(f"--sources-yaml {path} does not exist; pass a YAML listing the sources")
        y = yaml.safe_load(path.read_text())
        # a bare list of sources, or a mapping of config keys (with optional `base:` inheritance)
        data = {"sources": y} if isinstance(y, list) else load_yaml_dict(path)
    cfg = from_dict(ValidateContrastiveConfig, data)
    if a.source:
        cfg = dataclasses.replace(cfg, sources=list(cfg.sources) + [parse_source_arg(s) for s in a.source])
    overrides = {
        "output": a.output,
        "max_reject_fraction": a.max_reject_fraction,
        "max_seq_len": a.max_seq_len,
        "truncation": a.truncation,
        "tokenize": a.tokenize,
        "tokenizer": a.tokenizer,
        "num_validator_actors": a.num_validator_actors,
        "engine": a.engine,
    }
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = build_config(argv)
        report = validate_contrastive(cfg)
    except RejectThresholdExceeded as e:
        main_error(str(e))
        return 3
    except (ValueError, OSError) as e:  # bad config / a source that cannot be read
        main_error(str(e))
        return 2
    except Exception as e:  # e.g. a file that breaks mid-read inside a Ray task
        if isinstance(unwrap_error(e), (ValueError, OSError)):  # a user error wrapped by Ray: one line
            main_error(describe(e))
            return 2
        import traceback

        traceback.print_exc()
        main_error(f"validation failed: {type(e).__name__}: {e}")
        return 1
    t = report["totals"]
    print(
        f"validate_contrastive: {t['rows_read']} rows read, {t['valid']} valid, {t['rejected']} rejected; "
        f"report: {Path(cfg.output) / 'report.html'}"
    )
    for name, s in report["sources"].items():
        print(f"  {name}: {s['valid']}/{s['rows_read']} valid, reasons {s['reasons']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
