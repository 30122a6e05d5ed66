"""Vanilla Hugging Face `transformers` implementation of NeoBERT (the export target of `jobs/export_hf.py`).

`configuration_neobert.py` and `modeling_neobert.py` are self-contained (torch + transformers only): the export
copies them next to the weights so `AutoModel.from_pretrained(dir, trust_remote_code=True)` works without this
package installed. `keymap.py` maps training state-dict keys to these modules' keys, `config_map.py` translates
the configs (both directions), `export.py` writes and verifies an export (and reads one back),
`convert_original.py` imports the published chandar-lab/NeoBERT checkpoint, `model_card.py` renders the
export's README.md.

The classes are imported lazily, so `neobert.hf.keymap` (used by training code) does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "NeoBERTConfig": "configuration_neobert",
    "NeoBERTPreTrainedModel": "modeling_neobert",
    "NeoBERTModel": "modeling_neobert",
    "NeoBERTForMaskedLM": "modeling_neobert",
    "NeoBERTForSequenceClassification": "modeling_neobert",
    "NeoBERTForTokenClassification": "modeling_neobert",
    "NeoBERTForQuestionAnswering": "modeling_neobert",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
