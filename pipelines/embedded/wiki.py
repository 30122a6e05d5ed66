"""Wikipedia: MediaWiki XML pages -> wiki markup -> sections of plain-text paragraphs -> MLM documents and
("Title: Section", first paragraph, another section's first paragraph) triples.

The markup cleaner handles templates, tables, refs, comments, files/categories, links, quotes and HTML
tags/entities, keeping the section structure. The dump is read through `pipelines.io` (bz2 detected from the name).
"""

from __future__ import annotations

import dataclasses
import html
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipelines.embedded.triples import keep_triple
from pipelines.io import filesystem_for

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
    fs, p = filesystem_for(str(path))
    with fs.open_input_stream(p, compression="detect") as f:
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
            if not keep_triple(query, s.prose_first, negative, pairs, skipped):
                continue
            rows.append({"query": query, "corpus": s.prose_first, "negative": negative})
    return rows
