from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A checkpoint dir (`model/` inside) of a freshly initialised tiny NeoBERT with an MLM head, step 20."""
    import torch

    from neobert.checkpoint import save_model_dir
    from neobert.model import NeoBERTConfig, NeoBERTForMLM

    torch.manual_seed(0)
    model = NeoBERTForMLM(NeoBERTConfig.preset("tiny"))
    root = tmp_path_factory.mktemp("run") / "checkpoint_2026-01-01_00-00-00.000000"
    save_model_dir(root / "model", model, model.config, kind="mlm", extra={"step": 20})
    return root
