"""Import path kept for existing callers: MLM pretraining lives in `pipelines.train.pretrain`."""

from pipelines.train.pretrain import (  # noqa: F401
    DEFAULT_CONFIG,
    PretrainConfig,
    PretrainRunner,
    build_datasets,
    build_trainer,
    fit,
    load_pretrain_config,
)
from pipelines.train.sinks import METRICS_FILE  # noqa: F401
