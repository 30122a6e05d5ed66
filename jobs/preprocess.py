"""Tokenize and pack raw text into Parquet shards of packed rows (+ report.json / report.html).

  python jobs/preprocess.py                                  # embedded corpus -> outputs/preprocessed
  python jobs/preprocess.py --input data/*.jsonl s3://bucket/corpus/ --output /data/packed --max-seq-len 512
  python jobs/preprocess.py --config configs/preprocess_cluster.yaml --on-bad-row skip --pack-tokens 16384
  python jobs/preprocess.py --input data/ --output /data/packed --length-views 1024,2048  # + views/min1024/ ...
  ray job submit --working-dir . -- python jobs/preprocess.py --input /shared/raw --output /shared/packed

Packs hold --pack-tokens tokens (default 8192); jobs/pretrain.py on the output takes its pack size from
report.json. Every config key can also be set as --KEY VALUE (`--chunk_docs 256`). Under `ray job submit`
(RAY_ADDRESS set) it joins that cluster; otherwise it starts Ray in-process (`--address auto` joins a
`ray start` cluster on this machine instead).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / `--working-dir .`

from pipelines import cli  # noqa: E402
from pipelines.mlm.preprocess import PreprocessConfig, check_inputs, run_preprocess  # noqa: E402

F = cli.Flag
FLAGS = (
    F(("--input",), "input", "files, dirs, globs or URIs (default: the embedded corpus)", "many", "PATH"),
    F(("--output",), "output", "output dir: train/, eval/, report.json, report.html", metavar="DIR"),
    F(("--pack-tokens",), "pack_tokens", "tokens per packed row", metavar="N"),
    F(("--max-seq-len",), "max_seq_len", "longest segment; longer documents are split", metavar="N"),
    F(("--min-seq-len",), "min_seq_len", "shorter segments are dropped and counted", metavar="N"),
    F(("--eval-fraction",), "eval_fraction", "share of documents in the eval split", metavar="F"),
    F(("--on-bad-row",), "on_bad_row", "error | skip (count and report bad rows)", metavar="MODE"),
    F(("--text-column",), "text_column", "JSONL key / column holding the text", metavar="NAME"),
    F(("--tokenizer",), "tokenizer", "tokenizer.json or a dir holding one", metavar="PATH"),
    F(
        ("--length-views",),
        "length_views",
        "also write views of the documents >= L tokens (L,L,...)",
        metavar="L,...",
    ),
)


def run(cfg: PreprocessConfig, ctx: cli.Context) -> int:
    check_inputs(cfg)  # missing inputs, input/output overlap, tokenizer: reported before Ray starts
    ctx.init_ray(include_dashboard=False)
    report = run_preprocess(cfg)
    summary = {k: report[k] for k in ("documents", "segments", "tokens", "packs", "fill_ratio", "elapsed_s")}
    summary["skipped_rows"] = report["skipped_rows"]["by_reason"]
    summary["train_packs"] = report["splits"]["train"]["packs"]
    summary["eval_packs"] = report["splits"].get("eval", {}).get("packs", 0)
    print(json.dumps(summary, indent=2))
    print(f"shards: {report['output']}/train/  report: {report['output']}/report.html")
    return 0


SPEC = cli.JobSpec(
    name="preprocess",
    doc=__doc__,
    config_cls=PreprocessConfig,
    flags=FLAGS,
    output_keys=("output",),
    input_keys=("input", "tokenizer"),
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, run, argv)


if __name__ == "__main__":
    sys.exit(main())
