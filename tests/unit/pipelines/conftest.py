from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def tree_digests() -> Callable[[Path], dict[str, str]]:
    """Relative path -> sha256 of every file below a directory: compares an output before and after a run."""

    def digests(d: Path) -> dict[str, str]:
        return {
            str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*"))
            if p.is_file()
        }

    return digests
