"""Tokenize and pack raw text into Parquet shards of packed rows (+ report.json / report.html).

    python jobs/preprocess.py                                  # embedded corpus -> outputs/preprocessed
    python jobs/preprocess.py --input data/*.jsonl s3://bucket/corpus/ --output /data/packed --max-seq-len 512
    python jobs/preprocess.py --config configs/my_preprocess.yaml --on-bad-row skip --pack-tokens 16384
    python jobs/preprocess.py --input data/ --output /data/packed --length-views 1024,2048  # + views/min1024/ ...
    ray job submit --working-dir . -- python jobs/preprocess.py --input /shared/raw --output /shared/packed

Flags with dashes map onto `pipelines.mlm.preprocess.PreprocessConfig` fields; any other field can be set with a
dotted/underscored override (`--chunk_docs 256`). Under `ray job submit` (RAY_ADDRESS set) it joins that cluster;
otherwise it starts Ray in-process (`--address auto` joins a `ray start` cluster on this machine instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout / `--working-dir .`

from neobert.config_io import load_config  # noqa: E402
from pipelines.io import BadRowError, describe, unwrap_error  # noqa: E402
from pipelines.mlm.preprocess import PreprocessConfig, check_inputs, run_preprocess  # noqa: E402

FLAGS = ("output", "tokenizer", "max_seq_len", "min_seq_len", "pack_tokens", "text_column", "eval_fraction")
FLAGS += ("on_bad_row", "seed", "id_column", "text_split", "length_views")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", default=None, help="files, dirs, globs or URIs (default: embedded)"
    )
    for name in FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None)
    parser.add_argument("--config", default=None, help="YAML with PreprocessConfig fields")
    parser.add_argument(
        "--address", default=None, help="Ray address; default: $RAY_ADDRESS, else start locally"
    )
    args, overrides = parser.parse_known_args(argv)
    for name in FLAGS:
        if getattr(args, name) is not None:
            value = getattr(args, name)
            if name == "length_views" and not value.startswith("["):
                value = f"[{value}]"  # --length-views 1024,2048
            overrides += [f"--{name}", value]
    cfg = load_config(PreprocessConfig, args.config, overrides)
    if args.input:
        cfg.input = list(args.input)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from pipelines.ray_session import init_ray

    try:
        check_inputs(cfg)  # missing inputs, input/output overlap, tokenizer: reported before Ray starts
    except (ValueError, OSError) as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    init_ray(args.address, REPO, include_dashboard=False)
    try:
        report = run_preprocess(cfg)
    except Exception as e:  # Ray wraps a worker's BadRowError: print the cause as one line
        if not isinstance(unwrap_error(e), (BadRowError, ValueError, OSError)):
            traceback.print_exc()  # not a user error: keep the trace
            print(f"error: {describe(e)}", file=sys.stderr)
            return 1
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("documents", "segments", "tokens", "packs", "fill_ratio", "elapsed_s")}
    summary["skipped_rows"] = report["skipped_rows"]["by_reason"]
    summary["train_packs"] = report["splits"]["train"]["packs"]
    summary["eval_packs"] = report["splits"].get("eval", {}).get("packs", 0)
    print(json.dumps(summary, indent=2))
    print(f"shards: {report['output']}/train/  report: {report['output']}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
