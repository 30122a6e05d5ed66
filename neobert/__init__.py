"""NeoBERT: a variable-length (packed) BERT-style encoder in pure PyTorch. No Ray import anywhere here.

from neobert import NeoBERTConfig, NeoBERT, NeoBERTForMLM, PackedMeta
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NeoBERTConfig": "neobert.config",
    "NeoBERT": "neobert.model",
    "NeoBERTForMLM": "neobert.model",
    "PackedMeta": "neobert.packing",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy, so `import neobert.schema` stays light (no torch import)
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neobert' has no attribute {name!r}")
