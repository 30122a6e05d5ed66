"""Import path kept for existing callers: contrastive training lives in `pipelines.train.contrastive`."""

from pipelines.train.contrastive import (  # noqa: F401
    RANDOM_INIT_PREFIX,
    ContrastiveConfig,
    default_init,
    ensure_validated,
    fit,
    load_contrastive_config,
    load_rows,
    resolve_init,
)
