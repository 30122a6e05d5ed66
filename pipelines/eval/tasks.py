"""The evaluation tasks: each maps (encoder, recipe, seed, size cap) -> {metric: value}.

    stsb       zero-shot STS-B test: cosine of the mean-pooled embeddings vs the gold score -> spearman, pearson
    stsb_ft    STS-B fine-tuned: a regression head a * cos(u, v) + b trained with the encoder on STS-B train (MSE
               against score / 5; sentence-transformers' CosineSimilarityLoss) -> spearman on test
    polarity   sentence polarity, fine-tuned: linear head on the mean-pooled embedding, cross-entropy -> accuracy,
               macro_f1 on the fixed test split
    trec       question type (6 coarse classes), same recipe shape as polarity
    retrieval  zero-shot: the held-out embedded contrastive triples (wiki sections, KJV -> WEB) as a BEIR-style
               corpus / queries / qrels, ranked by cosine -> ndcg@10, recall@10, mrr@10
    mlm        held-out masked-LM loss and accuracy on packed eval rows of the embedded corpus, masked exactly as
               the pretraining eval masks them (only models with an MLM head: NeoBERT "mlm" model dirs)

Recipes are fixed in recipes.yaml (`load_recipes`); `max_examples` > 0 caps train and test sets (and retrieval
queries, MLM rows) with a stable subset, the one knob for CI-sized runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.eval import data as D
from pipelines.eval import metrics as M
from pipelines.eval.encoders import Encoder

RECIPES_FILE = Path(__file__).with_name("recipes.yaml")
ZERO_SHOT = ("stsb", "retrieval", "mlm")
FINETUNED = ("stsb_ft", "polarity", "trec")
ALL_TASKS = ("stsb", "stsb_ft", "polarity", "trec", "retrieval", "mlm")


class SkipTask(Exception):
    """The task does not apply to this model (e.g. MLM without an MLM head); the message says why."""


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe:
    lr: float  # encoder learning rate
    head_lr: float  # learning rate of the new head
    num_epochs: int
    batch_size: int
    max_seq_len: int  # tokens per text incl. specials
    weight_decay: float
    warmup_ratio: float  # share of the steps with linear warmup

    def __post_init__(self) -> None:
        if (
            self.lr <= 0
            or self.head_lr <= 0
            or self.num_epochs < 1
            or self.batch_size < 1
            or self.max_seq_len < 3
        ):
            raise ValueError(f"bad fine-tuning recipe {self}: lr/head_lr > 0, num_epochs/batch_size >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclasses.dataclass(frozen=True)
class Recipes:
    seeds: tuple[int, ...]
    zero_shot: dict[str, dict[str, Any]]
    finetune: dict[str, FinetuneRecipe]

    def task_seeds(self, task: str, seeds: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Fine-tuned tasks: every seed; zero-shot tasks: deterministic, one run (seed 0)."""
        return tuple(seeds or self.seeds) if task in FINETUNED else (0,)


def load_recipes(path: str | Path | None = None) -> Recipes:
    import yaml

    p = Path(path or RECIPES_FILE)
    raw = yaml.safe_load(p.read_text())
    missing_zs = [t for t in ZERO_SHOT if t not in raw.get("zero_shot", {})]
    missing_ft = [t for t in FINETUNED if t not in raw.get("finetune", {})]
    if missing_zs or missing_ft or not raw.get("seeds"):
        raise ValueError(f"{p}: needs `seeds` and recipes for {missing_zs + missing_ft}")
    ft = {}
    for task, r in raw["finetune"].items():
        try:
            ft[task] = FinetuneRecipe(**r)
        except TypeError as e:
            raise ValueError(
                f"{p} finetune.{task}: {e}; fields are {list(FinetuneRecipe.__annotations__)}"
            ) from None
    return Recipes(tuple(int(s) for s in raw["seeds"]), dict(raw["zero_shot"]), ft)


def run_task(
    task: str, enc: Encoder, recipes: Recipes, *, seed: int, max_examples: int = 0
) -> dict[str, float]:
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {','.join(ALL_TASKS)}")
    if task in FINETUNED:
        return FINETUNE_TASKS[task](enc, recipes.finetune[task], seed=seed, max_examples=max_examples)
    return ZERO_SHOT_TASKS[task](enc, recipes.zero_shot[task], max_examples=max_examples)


# ------------------------------------------------------------------------------------------------ zero-shot
def stsb_zero_shot(enc: Encoder, r: dict, *, max_examples: int = 0) -> dict[str, float]:
    test = D.stsb("test").limit(max_examples)
    a = enc.embed(test.sentences1, max_seq_len=r["max_seq_len"], batch_size=r["batch_size"])
    b = enc.embed(test.sentences2, max_seq_len=r["max_seq_len"], batch_size=r["batch_size"])
    cos = M.paired_cosine(a, b)
    return {
        "spearman": M.spearman(cos, test.scores),
        "pearson": M.pearson(cos, test.scores),
        "num_pairs": len(test),
    }


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
    """BEIR-style: corpus {doc_id: text}, queries {query_id: text}, qrels {query_id: {doc_id: relevance}}."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


@functools.lru_cache(maxsize=4)
def retrieval_set(eval_fraction: float, num_queries: int) -> RetrievalSet:
    """The embedded contrastive triples held out by `split_rows` (the contrastive job's stable query-hash split),
    as `build_eval_set` turns them into queries and a corpus of every held-out positive and hard negative."""
    import pyarrow as pa

    from pipelines.embedded import materialize
    from pipelines.train.contrastive_data import build_eval_set, split_rows

    rows = []
    for name, path in sorted(materialize().contrastive_sources.items()):
        with open(path, encoding="utf-8") as f:
            for line in f:
                t = json.loads(line)
                rows.append(
                    {
                        "query": t["query"],
                        "positive": t["corpus"],
                        "negatives": [t["negative"]],
                        "source": name,
                    }
                )
    _, held = split_rows(pa.Table.from_pylist(rows), eval_fraction)
    queries, corpus, pos_idx = build_eval_set(held, num_queries)
    return RetrievalSet(
        corpus={f"d{i}": t for i, t in enumerate(corpus)},
        queries={f"q{i}": t for i, t in enumerate(queries)},
        qrels={f"q{i}": {f"d{int(p)}": 1} for i, p in enumerate(pos_idx)},
    )


def retrieval_zero_shot(enc: Encoder, r: dict, *, max_examples: int = 0) -> dict[str, float]:
    n = r["num_queries"] if max_examples <= 0 else min(max_examples, r["num_queries"])
    rs = retrieval_set(float(r["eval_fraction"]), int(n))
    doc_ids, qids = list(rs.corpus), list(rs.queries)
    doc_index = {d: i for i, d in enumerate(doc_ids)}
    q = enc.embed([rs.queries[i] for i in qids], max_seq_len=r["max_seq_len"], batch_size=r["batch_size"])
    c = enc.embed([rs.corpus[d] for d in doc_ids], max_seq_len=r["max_seq_len"], batch_size=r["batch_size"])
    qrels = [{doc_index[d]: rel for d, rel in rs.qrels[i].items()} for i in qids]
    out = M.ranking_metrics(M.cosine_matrix(q, c), qrels, k=int(r["k"]))
    return {**out, "num_queries": len(qids), "num_docs": len(doc_ids)}


@functools.lru_cache(maxsize=2)
def mlm_eval_rows(pack_tokens: int, num_rows: int):
    """Packed eval rows of the embedded corpus, as the pretraining job builds them on the fly (same tokenizer,
    eval split, segmenting and best-fit packing), produced in-process by the same Ray Data step classes."""
    import pyarrow as pa

    from pipelines.mlm.pack import PackChunks
    from pipelines.mlm.preprocess import PreprocessConfig, input_files
    from pipelines.mlm.tokenize import TokenizeFiles

    cfg = PreprocessConfig(
        pack_tokens=pack_tokens, max_seq_len=min(pack_tokens, PreprocessConfig.max_seq_len)
    )
    files = input_files(cfg)
    tok = TokenizeFiles(
        tokenizer_path=None, max_seq_len=cfg.max_seq_len, min_seq_len=cfg.min_seq_len,
        read_options=cfg.read_options(), eval_fraction=cfg.eval_fraction, seed=cfg.seed, splits=("eval",),
    )  # fmt: skip
    packer = PackChunks(
        num_units=len(files), pack_tokens=cfg.pack_tokens, max_seq_len=cfg.max_seq_len,
        buffer_segments=cfg.pack_buffer_segments, close_fill=cfg.pack_close_fill,
        rows_per_shard=cfg.rows_per_shard, splits=("eval",),
    )  # fmt: skip
    tables = []
    for i, f in enumerate(files):
        unit = pa.Table.from_pylist(
            [{"unit": i, "uri": f.uri, "format": f.format, "name": f.name, "size": f.size}]
        )
        for chunk in tok(unit):
            tables.extend(packer(chunk))
    rows = pa.concat_tables(tables)
    return rows.slice(0, num_rows) if num_rows else rows


@torch.no_grad()
def mlm_heldout(enc: Encoder, r: dict, *, max_examples: int = 0) -> dict[str, float]:
    """Sum of token losses / masked tokens over micro-batches of `rows_per_batch` rows (token budget
    rows_per_batch * pack_tokens); masks from `mask_seed(mask_seed, -1, 0, i)` as in the pretraining eval."""
    from neobert.packing import PackedMeta
    from neobert.training import mask_seed, mask_tokens
    from pipelines.tokenizer import MASK_ID, SPECIAL_IDS
    from pipelines.train.collate import collate_packed

    model = enc.mlm
    if model is None:
        raise SkipTask("no MLM head (an encoder-only or HF model)")
    rows_per_batch, pack_tokens = int(r["rows_per_batch"]), int(r["pack_tokens"])
    num_rows = int(r["num_rows"]) if max_examples <= 0 else min(max_examples, int(r["num_rows"]))
    if pack_tokens > model.config.max_position_embeddings:
        raise SkipTask(f"pack_tokens={pack_tokens} > the model's max_position_embeddings")
    rows = mlm_eval_rows(pack_tokens, num_rows)
    dev = enc.device
    loss_sum = correct = masked = 0.0
    was_training = model.training
    model.eval()
    for i, start in enumerate(range(0, rows.num_rows, rows_per_batch)):
        b = collate_packed(
            rows.slice(start, rows_per_batch), rows_per_batch * pack_tokens, max_pad_segment=pack_tokens
        )
        gen = torch.Generator().manual_seed(mask_seed(int(r["mask_seed"]), -1, 0, i))
        ids, labels = mask_tokens(
            b.input_ids, generator=gen, mask_prob=float(r["mask_prob"]), mask_id=MASK_ID,
            special_ids=SPECIAL_IDS, vocab_size=model.config.vocab_size,
        )  # fmt: skip
        meta = PackedMeta(b.cu_seqlens, b.max_seqlen, b.position_ids).to(dev)
        with enc.autocast():
            out = model(ids.to(dev), meta, labels.to(dev))
        loss_sum += float(out.loss_sum)
        correct += float(out.num_correct)
        masked += float(out.num_masked)
    model.train(was_training)
    if masked == 0:
        raise SkipTask("the MLM eval rows hold no maskable tokens")
    return {"loss": loss_sum / masked, "accuracy": correct / masked, "num_masked": masked}


ZERO_SHOT_TASKS = {"stsb": stsb_zero_shot, "retrieval": retrieval_zero_shot, "mlm": mlm_heldout}


# ------------------------------------------------------------------------------------------------ fine-tuning
def finetune(
    enc: Encoder, head: nn.Module, n: int, forward, loss_fn, recipe: FinetuneRecipe, seed: int
) -> None:
    """Train encoder + head on `n` examples: `forward(idx) -> prediction`, `loss_fn(pred, idx) -> loss`.
    Batches are a seeded permutation per epoch; AdamW with linear warmup/decay (transformers' schedule)."""
    from transformers import get_linear_schedule_with_warmup

    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = steps_per_epoch * recipe.num_epochs
    opt = torch.optim.AdamW(
        [{"params": enc.parameters(), "lr": recipe.lr}, {"params": head.parameters(), "lr": recipe.head_lr}],
        weight_decay=recipe.weight_decay,
    )
    sched = get_linear_schedule_with_warmup(opt, int(recipe.warmup_ratio * total), total)
    enc.train()
    head.train()
    for _ in range(recipe.num_epochs):
        perm = rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = perm[s * recipe.batch_size : (s + 1) * recipe.batch_size]
            loss = loss_fn(forward(idx), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*enc.parameters(), *head.parameters()], 1.0)
            opt.step()
            sched.step()
    enc.eval()
    head.eval()


class CosineRegressionHead(nn.Module):
    """score = a * cos(u, v) + b: the sentence-transformers CosineSimilarityLoss setup with a learned scale and
    offset, so the MSE against score / 5 is well posed from step 0 (a head on the raw pair features starts from
    noise and, with few steps, scrambles a good zero-shot ranking)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.cosine_similarity(u, v, dim=-1) + self.bias  # (B,)


def stsb_finetuned(enc: Encoder, r: FinetuneRecipe, *, seed: int, max_examples: int = 0) -> dict[str, float]:
    train, test = D.stsb("train").limit(max_examples), D.stsb("test").limit(max_examples)
    torch.manual_seed(seed)
    head = CosineRegressionHead().to(enc.device)
    target = torch.tensor(train.scores, dtype=torch.float32, device=enc.device) / 5.0

    def forward(idx):
        u = enc.encode([train.sentences1[i] for i in idx], r.max_seq_len)
        v = enc.encode([train.sentences2[i] for i in idx], r.max_seq_len)
        return head(u, v)

    finetune(enc, head, len(train), forward, lambda p, idx: nn.functional.mse_loss(p, target[idx]), r, seed)
    with torch.no_grad():
        u = torch.from_numpy(enc.embed(test.sentences1, max_seq_len=r.max_seq_len)).to(enc.device)
        v = torch.from_numpy(enc.embed(test.sentences2, max_seq_len=r.max_seq_len)).to(enc.device)
        pred = head(u, v).cpu().numpy()
    return {"spearman": M.spearman(pred, test.scores)}


def classify_finetuned(sets: dict, enc: Encoder, r: FinetuneRecipe, *, seed: int, max_examples: int) -> dict:
    train, test = sets["train"].limit(max_examples), sets["test"].limit(max_examples)
    num_labels = len(train.label_names)
    torch.manual_seed(seed)
    head = nn.Linear(enc.dim, num_labels).to(enc.device)
    target = torch.tensor(train.labels, dtype=torch.long, device=enc.device)

    def forward(idx):
        return head(enc.encode([train.texts[i] for i in idx], r.max_seq_len))

    finetune(
        enc, head, len(train), forward, lambda p, idx: nn.functional.cross_entropy(p, target[idx]), r, seed
    )
    with torch.no_grad():
        emb = torch.from_numpy(enc.embed(test.texts, max_seq_len=r.max_seq_len)).to(enc.device)
        pred = head(emb).argmax(-1).cpu().numpy()
    return M.classification_metrics(pred, test.labels, num_labels)


FINETUNE_TASKS = {
    "stsb_ft": stsb_finetuned,
    "polarity": lambda enc, r, **kw: classify_finetuned(D.polarity(), enc, r, **kw),
    "trec": lambda enc, r, **kw: classify_finetuned(D.trec(), enc, r, **kw),
}
