"""Embedded default data: the wiki-markup cleaner, the Bible triples, the cache (atomic, deterministic, fast
re-use) and the tokenizer ids. One full materialization (~1.5 s) is shared by the module."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from pipelines import embedded as emb
from pipelines.embedded import bible, contrastive_source_configs, packages, wiki
from pipelines.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, VOCAB_SIZE, load_tokenizer

MARKUP = ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "'''", "&nbsp;", "<!--", "__TOC__")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> emb.EmbeddedData:
    return emb.materialize(tmp_path_factory.mktemp("embedded"))


# ---------------------------------------------------------------------------------------------- cleaner


def test_wiki_cleaner_strips_every_kind_of_markup():
    wikitext = """{{Infobox country|name={{lang|fr|Pays}}|area={{convert|5|km2}}}}
{{Use dmy dates|date=June 2013}}
'''Foo''' is a ''[[bar (thing)|bar]]'' in [[Baz]]s<ref name="a">{{cite web|url=http://x.org|title=T}}</ref>,
located {{convert|12|km|mi}} from [http://example.org the coast] and [http://example.org/nolabel].<ref name="b"/>
It is called {{lang|de|Foostadt}} &ndash; see [[#History|below]].<!-- hidden comment -->
[[File:Foo.jpg|thumb|A caption with a [[link]] and [1.1.0] brackets]]
{| class="wikitable"
|-
| cell {{flag|X}} || cell
{| nested
| x
|}
|}
== History ==
The town<sup>1</sup> was founded in 1200.&nbsp;It grew{{citation needed|date=May 2010}}.

* a list item with [[Link|label]]
=== Sub section ===
Subsection prose here.
== References ==
{{reflist}}
* [http://example.org A source]
[[Category:Towns]]
[[fr:Foo]]
__NOTOC__
"""
    sections, residue = wiki.wiki_to_sections(wikitext)
    text = wiki.sections_to_text(sections)
    for token in MARKUP + ("http", "Category", "Towns", "caption", "cell", "hidden", "A source", "<sup>"):
        assert token not in text, (token, text)
    assert residue == 0
    assert [s.heading for s in sections] == ["", "History", "Sub section"]
    lead = sections[0].paragraphs[0]
    assert lead.startswith("Foo is a bar in Bazs, located 12 km from the coast and.")
    assert "It is called Foostadt – see below." in lead
    assert sections[1].paragraphs == ["The town1 was founded in 1200. It grew.", "a list item with label"]
    assert sections[2].paragraphs == ["Subsection prose here."]


def test_nested_and_unbalanced_templates():
    assert wiki.resolve_templates("a {{outer|{{inner|{{x}}}}|y}} b").strip() == "a  b"
    # single braces inside a template that no inner pass can match: the whole span is dropped
    assert wiki.resolve_templates("a {{chem|H{2}O|{{x}}}} b") == "a  b"
    # an unclosed template keeps the rest of the text instead of swallowing it
    assert wiki.resolve_templates("a {{broken b c") == "a broken b c"


def test_links_render_labels_and_drop_files_and_categories():
    assert wiki.resolve_links("[[Paris]] and [[Paris, Texas|Paris]] and [[London]]ers") == (
        "Paris and Paris and Londoners"
    )
    assert wiki.resolve_links("[[Image:x.png|thumb|cap [[y]] with [z] text]]after") == "after"
    assert wiki.resolve_links("[[File:x.png|thumb|multi\nline caption]]ok") == "ok"
    assert wiki.resolve_links("[[Category:X]][[de:Y]][[:Category:Z|Z cats]]") == "Z cats"
    assert wiki.resolve_links("[[Foo (bar)|]]") == "Foo"


def test_page_skip_reasons():
    page = wiki.WikiPage(1, "T", 0, False, "Some text")
    assert wiki.page_skip_reason(page) is None
    assert wiki.page_skip_reason(wiki.WikiPage(1, "T", 4, False, "x")) == "non_article_namespace"
    assert wiki.page_skip_reason(wiki.WikiPage(1, "T", 0, True, "#REDIRECT [[X]]")) == "redirect"
    assert wiki.page_skip_reason(wiki.WikiPage(1, "A (disambiguation)", 0, False, "x")) == "disambiguation"
    assert (
        wiki.page_skip_reason(wiki.WikiPage(1, "Ada", 0, False, "x\n{{Disambiguation|geo}}"))
        == "disambiguation"
    )


def test_wiki_section_triples_use_another_section_of_the_same_article():
    para = " ".join(["word"] * 20)
    wikitext = (
        f"Lead {para}\n== A ==\nA {para}\n== B ==\n* only a list\n== C ==\nC {para}\n=== A ===\nA2 {para}\n"
    )
    skipped: Counter = Counter()
    (article,) = wiki.build_wiki_articles([wiki.WikiPage(7, "T", 0, False, wikitext)], skipped)
    rows = wiki.wiki_section_triples([article], skipped)
    assert rows == [
        {"query": "T: A", "corpus": f"A {para}", "negative": f"C {para}"},
        {"query": "T: C", "corpus": f"C {para}", "negative": f"A2 {para}"},  # a duplicate name still negates
    ]
    assert skipped["duplicate_section_heading"] == 1
    assert skipped["section_without_prose_paragraph"] == 1  # B: a list is not a first paragraph


def test_bible_triples_skip_and_count_missing_verses():
    kjv = bible.BibleText({1001001: "k1", 1001002: "k2", 1001003: "k3", 1002001: "k4"}, {1: "Genesis"})
    web = bible.BibleText({1001001: "w1", 1001002: "w2", 1001003: "w3", 1001004: "w4x"}, {1: "Genesis"})
    skipped: Counter = Counter()
    rows = bible.bible_triples(kjv, web, skipped)
    assert rows == [
        {"query": "k1", "corpus": "w1", "negative": "w2"},
        {"query": "k2", "corpus": "w2", "negative": "w3"},
        {"query": "k3", "corpus": "w3", "negative": "w4x"},
    ]
    assert skipped == Counter({"verse_missing_in_web": 1, "verse_missing_in_kjv": 1})
    # the last verse of a chapter takes the previous verse as its negative
    rows = bible.bible_triples(
        bible.BibleText({1001002: "k"}, {}), bible.BibleText({1001001: "a", 1001002: "b"}, {}), Counter()
    )
    assert rows == [{"query": "k", "corpus": "b", "negative": "a"}]


def test_clean_verse():
    assert bible.clean_verse(" 2. And darkness [was] upon the face of\n the deep.") == (
        "And darkness was upon the face of the deep."
    )
    assert bible.clean_verse("3. God`s Spirit,    `Yes`") == "God's Spirit, 'Yes'"


def test_missing_package_names_the_fix(monkeypatch):
    def missing(name):
        raise packages.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packages.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gensim==4\.4\.0"):
        packages.wikipedia_dump_path()


# ------------------------------------------------------------------------------------ full materialization


def test_counts_and_manifest(data: emb.EmbeddedData):
    manifest = data.load_manifest()
    files = manifest["files"]
    wiki = files["mlm/wikipedia.jsonl"]
    # 206 pages in the dump: 99 redirects, 1 project page (ns 4), 8 disambiguation pages, 98 articles.
    assert wiki["rows"] == 98
    assert wiki["skipped"] == {
        "disambiguation": 8,
        "markup_tokens_removed_unbalanced": wiki["skipped"]["markup_tokens_removed_unbalanced"],
        "non_article_namespace": 1,
        "redirect": 99,
    }
    assert wiki["skipped"]["markup_tokens_removed_unbalanced"] < 20
    assert 2_000_000 < wiki["chars"] < 4_000_000
    assert files["mlm/web_bible.jsonl"]["rows"] == 66
    verses = files["contrastive/bible_kjv_web.jsonl"]
    # 31102 verses in each; Romans' closing doxology is 14:24-26 in WEB and 16:25-27 in KJV.
    # 31099 aligned verses, minus those the contrastive validator would reject (counted, not dropped silently)
    assert verses["rows"] == 30408
    assert verses["skipped"] == {
        "verse_missing_in_kjv": 3,
        "verse_missing_in_web": 3,
        "positive_equals_query": 479,
        "duplicate_pair": 212,
    }
    assert files["contrastive/wiki_sections.jsonl"]["rows"] > 1000
    for rel, info in files.items():
        blob = (data.root / rel).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == info["sha256"], rel
        assert len(blob.splitlines()) == info["rows"], rel
        assert info["license"] and info["attribution"] and info["sources"][0]["version"], rel
    assert manifest["code_version"] == emb.CODE_VERSION
    assert [p.name for p in data.mlm_files] == ["wikipedia.jsonl", "web_bible.jsonl"]
    assert sorted(data.contrastive_sources) == ["bible_kjv_web", "wiki_sections"]


def test_rows_are_clean_nonempty_text(data: emb.EmbeddedData):
    ids = set()
    for path in data.mlm_files:
        for row in _rows(path):
            assert list(row) == ["id", "title", "text", "source"]
            assert row["text"].strip() and row["title"].strip(), row["id"]
            assert row["id"] not in ids
            ids.add(row["id"])
            for token in MARKUP:
                assert token not in row["text"], (row["id"], token)
    genesis = next(r for r in _rows(data.mlm_files[1]) if r["title"] == "Genesis")
    assert genesis["text"].startswith("In the beginning God created the heavens and the earth. Now the earth")
    for name, path in data.contrastive_sources.items():
        for row in _rows(path):
            assert list(row) == ["query", "corpus", "negative"], name
            assert all(v.strip() for v in row.values()), (name, row)
            assert row["corpus"] != row["negative"], (name, row)
            for token in MARKUP:
                assert not any(token in v for v in row.values()), (name, token, row)
    first = _rows(data.contrastive_sources["bible_kjv_web"])[0]
    assert first == {
        "query": "In the beginning God created the heaven and the earth.",
        "corpus": "In the beginning God created the heavens and the earth.",
        "negative": "Now the earth was formless and empty. Darkness was on the surface of the deep. "
        "God's Spirit was hovering over the surface of the waters.",
    }


def test_materialize_is_deterministic(data: emb.EmbeddedData, tmp_path):
    other = emb.materialize(tmp_path, force=True)
    assert other.root.name == data.root.name  # same cache key
    for a, b in zip(sorted(data.root.rglob("*")), sorted(other.root.rglob("*")), strict=True):
        assert a.relative_to(data.root) == b.relative_to(other.root)
        if a.is_file():
            assert a.read_bytes() == b.read_bytes(), a


def test_reuse_is_fast_and_does_not_reparse(data: emb.EmbeddedData, monkeypatch, capsys):
    def must_not_build(*_args, **_kwargs):
        raise AssertionError("a complete cache must be reused, not rebuilt")

    before = {p: p.stat().st_mtime_ns for p in data.root.rglob("*")}
    monkeypatch.setattr(emb, "build", must_not_build)
    t0 = time.perf_counter()
    again = emb.materialize(data.root.parent)
    assert emb.main(["--cache-dir", str(data.root.parent)]) == 0
    assert time.perf_counter() - t0 < 2.0  # ~0.05 s unloaded; the monkeypatch proves nothing is re-parsed
    assert again == data
    assert {p: p.stat().st_mtime_ns for p in data.root.rglob("*")} == before
    assert "bible_kjv_web=30408" in capsys.readouterr().err


def test_crash_leaves_no_partial_cache(tmp_path, monkeypatch):
    def crash(out_dir: Path, versions=None):
        (out_dir / "mlm").mkdir()
        (out_dir / "mlm" / "wikipedia.jsonl").write_text('{"id": "half')
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(emb, "build", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        emb.materialize(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cache_is_rebuilt(data: emb.EmbeddedData, tmp_path, monkeypatch):
    root = tmp_path / data.root.name
    (root / "mlm").mkdir(parents=True)
    (root / "manifest.json").write_bytes(data.manifest.read_bytes())
    (root / "mlm" / "wikipedia.jsonl").write_text("truncated\n")  # wrong size: incomplete copy
    builds = []

    def fake_build(out_dir: Path, versions=None):  # the real build is covered by the determinism test
        builds.append(out_dir)
        shutil.copytree(data.root, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(emb, "build", fake_build)
    monkeypatch.setenv(emb.CACHE_ENV, str(tmp_path))
    rebuilt = emb.materialize()  # default cache dir comes from $NEOBERT_CACHE_DIR
    assert len(builds) == 1 and rebuilt.root == root
    assert (root / "mlm" / "wikipedia.jsonl").read_bytes() == data.mlm_files[0].read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp and trash dirs removed
    emb.materialize()  # now complete: no second build
    assert len(builds) == 1


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_ids():
    tok = load_tokenizer()
    assert tok.encode("Hello, my dog is cute").ids == [101, 7592, 1010, 2026, 3899, 2003, 10140, 102]
    assert tok.get_vocab_size() == VOCAB_SIZE == 30522
    specials = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID, "[MASK]": MASK_ID}
    assert {t: tok.token_to_id(t) for t in specials} == {
        "[PAD]": 0,
        "[UNK]": 100,
        "[CLS]": 101,
        "[SEP]": 102,
        "[MASK]": 103,
    }
    long = tok.encode(" ".join(["word"] * 300))
    assert len(long.ids) == 302 and 0 not in long.ids  # no truncation to 128, no padding


def test_tokenizer_on_embedded_text(data: emb.EmbeddedData):
    tok = load_tokenizer()
    row = _rows(data.mlm_files[0])[0]
    ids = tok.encode(row["text"][:2000]).ids
    unk_fraction = ids.count(UNK_ID) / len(ids)
    assert len(ids) > 300 and unk_fraction < 0.01, unk_fraction


def test_embedded_contrastive_sources_validate_without_rejections(tmp_path):
    """The builder skips (and counts) what the contrastive validator would reject, with the validator's own
    rules, so validating the embedded sources rejects nothing."""
    from pipelines.contrastive.sources import ValidateContrastiveConfig
    from pipelines.contrastive.validate import validate_contrastive

    report = validate_contrastive(
        ValidateContrastiveConfig(sources=contrastive_source_configs(), output=str(tmp_path / "v")),
        engine="local",
    )
    assert report["sources"], report
    for name, s in report["sources"].items():
        assert s["rows_read"] > 1000 and s["rejected"] == 0, (name, s["reasons"])
