"""Bibles: World English Bible and King James Version from the pythonbible packages -> one MLM document per book
and (KJV verse, same verse in WEB, neighbouring WEB verse) triples."""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections import Counter

from pipelines.embedded.packages import BIBLE_MODULES, distribution
from pipelines.embedded.triples import keep_triple

_SPACES = re.compile(r"[ \t\u00a0\u2009\u200a\u202f]+")
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
    distribution(package)
    module = importlib.import_module(BIBLE_MODULES[package])
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
    reject (`keep_triple`), are skipped and counted."""
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
        if not keep_triple(query, positive, negative, pairs, skipped):
            continue
        rows.append({"query": query, "corpus": positive, "negative": negative})
    skipped["verse_missing_in_kjv"] += sum(1 for vid in web.verses if vid not in kjv.verses)
    return rows
