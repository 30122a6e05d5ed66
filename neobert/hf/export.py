"""Export a NeoBERT-on-Ray model dir to a Hugging Face `transformers` directory, with a built-in parity check.

    OUTDIR/config.json                 NeoBERTConfig (model_type "neobert") + `auto_map` -> the two .py files
    OUTDIR/configuration_neobert.py    copied from neobert/hf (self-contained: torch + transformers only)
    OUTDIR/modeling_neobert.py
    OUTDIR/model.safetensors           weights mapped by the declarative key map (neobert/hf/keymap.py)
    OUTDIR/tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json
                                       the training tokenizer, with its fixed 128-token padding/truncation
                                       removed (model_max_length = max_position_embeddings)
    OUTDIR/modules.json, sentence_bert_config.json, 1_Pooling/config.json
                                       only for a contrastive ("encoder" + pooling) model: a sentence-transformers dir
    OUTDIR/neobert_export.json         provenance and the parity numbers
    OUTDIR/README.md                   model card (neobert/hf/model_card.py): architecture, training data, tokens
                                       seen, evaluation scores (results.json), intended use, limitations, license

An "mlm" model dir exports `NeoBERTForMaskedLM` (AutoModel loads its encoder); an "encoder" dir exports
`NeoBERTModel`. Vocabulary rows are sliced from the padded training width to the real `vocab_size`.

Parity check (on by default; CPU, fp32): the exported directory is loaded back the way users load it
(`AutoModel[ForMaskedLM].from_pretrained(OUTDIR, trust_remote_code=True, local_files_only=True)`, tokenizer via
`AutoTokenizer`), run on a few sentences of different lengths as one right-padded batch, and compared with the
training model's packed varlen forward (exact `sdpa` backend) on the same sentences: hidden states within
`atol` (1e-5), MLM logits within `logits_atol`, identical token ids from both tokenizers, and for a
sentence-transformers dir `SentenceTransformer.encode` vs our own pooling. Any miss raises `ParityError`
with the max differences.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from neobert.checkpoint import (
    HF_CONFIG_FILE,
    MODEL_FILE,
    ModelDir,
    encoder_state_dict,
    load_model_dir,
    resolve_model_dir,
)
from neobert.config import NeoBERTConfig
from neobert.hf.config_map import from_hf_config, to_hf_config
from neobert.hf.keymap import hf_to_training, training_to_hf
from neobert.hf.model_card import load_eval_results, write_model_card
from neobert.model import NeoBERT, NeoBERTForMLM
from neobert.packing import PackedMeta

log = logging.getLogger(__name__)

HF_SOURCE_DIR = Path(__file__).parent  # configuration_neobert.py, modeling_neobert.py
HF_SOURCE_FILES = ("configuration_neobert.py", "modeling_neobert.py")
AUTO_MAP_BASE = {
    "AutoConfig": "configuration_neobert.NeoBERTConfig",
    "AutoModel": "modeling_neobert.NeoBERTModel",
    "AutoModelForSequenceClassification": "modeling_neobert.NeoBERTForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_neobert.NeoBERTForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_neobert.NeoBERTForQuestionAnswering",
}
AUTO_MAP_MLM = {"AutoModelForMaskedLM": "modeling_neobert.NeoBERTForMaskedLM"}
SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
ST_POOLING = ("mean", "cls")  # pooling modes of neobert.contrastive that sentence-transformers reproduces

PARITY_SENTENCES = (
    "NeoBERT is a next-generation encoder for English text.",
    "Packing removes padding.",
    "In the beginning God created the heavens and the earth. Now the earth was formless and empty, and "
    "darkness was on the surface of the deep.",
    "Ray Data tokenizes raw text and packs documents into Arrow rows; Ray Train streams them into the model.",
)


@dataclasses.dataclass
class ExportConfig:
    checkpoint: str = (
        ""  # model dir or training checkpoint dir (holding model/); "" = demo (see jobs/export_hf.py)
    )
    output: str = "outputs/hf_export"  # the HF directory to write
    tokenizer: str = ""  # dir holding the training tokenizer.json; "" = pipelines.tokenizer default
    parity: bool = True  # load the export back with transformers and compare with the training model
    atol: float = 1e-5  # max |diff| of hidden states / sentence embeddings (fp32)
    logits_atol: float = 1e-4  # max |diff| of MLM logits (fp32; logits are ~sqrt(D) x larger than hidden)
    overwrite: bool = False  # replace a non-empty output dir
    eval_results: str = ""  # results.json of the evaluation harness for README.md; "" = beside the checkpoint
    license: str = ""  # model card license (Hub id); "" = derived from the training data

    def __post_init__(self) -> None:
        if self.atol <= 0 or self.logits_atol <= 0:
            raise ValueError(f"atol and logits_atol must be > 0, got {self.atol} and {self.logits_atol}")
        if not self.output:
            raise ValueError("output must name the directory to write, e.g. --output outputs/hf_export")


class ParityError(RuntimeError):
    """The exported model does not reproduce the training model."""


@dataclasses.dataclass
class ExportReport:
    outdir: str
    source: str
    kind: str  # "mlm" | "encoder"
    architecture: str  # the class in config.json `architectures`
    sentence_transformers: bool  # a sentence-transformers dir was written
    parity_checked: bool
    num_parity_tokens: int = 0
    max_abs_diff_hidden: float | None = None  # AutoModel last_hidden_state vs training varlen hidden
    max_abs_diff_logits: float | None = None  # AutoModelForMaskedLM logits vs training logits (mlm only)
    max_abs_diff_sentence_embedding: float | None = None  # SentenceTransformer.encode vs our pooling
    atol: float = 1e-5
    logits_atol: float = 1e-4


def hf_config_dict(md: ModelDir) -> dict[str, Any]:
    """The kwargs of `neobert.hf.NeoBERTConfig` for a model dir (`neobert.hf.config_map.to_hf_config`)."""
    return to_hf_config(md.cfg, kind=md.kind, pooling=md.pooling)


def load_hf_encoder(path: str | Path) -> tuple[NeoBERT, NeoBERTConfig, str | None]:
    """(NeoBERT encoder, its training config, pooling or None) from an HF dir written by `export_hf`: config.json
    through `config_map.from_hf_config`, weights through the inverse key map (`keymap.hf_to_training`, vocabulary
    rows zero-padded back to the training width). The pooling is the sentence-transformers one when the dir has
    modules.json, else None."""
    from safetensors.torch import load_file

    d = resolve_model_dir(path)
    hf = json.loads((d / HF_CONFIG_FILE).read_text())
    cfg = from_hf_config(hf, source=str(d / HF_CONFIG_FILE))
    try:
        weights = load_file(str(d / MODEL_FILE))
    except Exception as e:  # SafetensorError of a truncated file, or an OSError
        raise ValueError(
            f"{d / MODEL_FILE} cannot be read ({type(e).__name__}: {e}); re-export the model with jobs/export_hf.py"
        ) from None
    state = hf_to_training(weights, num_layers=cfg.num_layers, padded_vocab_size=cfg.padded_vocab_size)
    encoder = NeoBERT(cfg)
    encoder.load_state_dict(encoder_state_dict(state), strict=True)
    pooling = hf.get("classifier_pooling") if (d / "modules.json").exists() else None
    return encoder, cfg, pooling


def export_hf(
    checkpoint: str | Path,
    outdir: str | Path,
    *,
    tokenizer_dir: str | Path,
    parity: bool = True,
    atol: float = 1e-5,
    logits_atol: float = 1e-4,
    sentences: tuple[str, ...] | list[str] = PARITY_SENTENCES,
    overwrite: bool = False,
    eval_results: str | Path | None = None,
    license: str = "",
) -> ExportReport:
    """Write the HF directory for `checkpoint` (a model dir or a training checkpoint holding one under `model/`)
    into `outdir`, then (by default) verify it numerically. Returns the report also written to
    `outdir/neobert_export.json`."""
    from neobert.hf.configuration_neobert import NeoBERTConfig as HFConfig

    md = load_model_dir(checkpoint)
    if eval_results:  # a bad results.json fails before anything is written
        load_eval_results(eval_results)
    outdir = Path(outdir)
    if outdir.exists() and any(outdir.iterdir()):
        if not overwrite:
            raise ValueError(
                f"output dir {outdir} is not empty; pass overwrite=True (--overwrite true) or a new dir"
            )
        if not ((outdir / "neobert_export.json").exists() or (outdir / "config.json").exists()):
            raise ValueError(f"refusing to overwrite {outdir}: it is not an HF export dir (no config.json)")
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    is_mlm = md.kind == "mlm"
    write_st = md.kind == "encoder" and md.pooling is not None
    if write_st and md.pooling not in ST_POOLING:
        raise ValueError(
            f"{md.path}: pooling {md.pooling!r} has no sentence-transformers equivalent here; expected one of "
            f"{ST_POOLING}"
        )

    # config.json with auto_map, plus the two source files it points to
    hf_cfg = HFConfig(**hf_config_dict(md))
    hf_cfg.architectures = ["NeoBERTForMaskedLM" if is_mlm else "NeoBERTModel"]
    hf_cfg.auto_map = {**AUTO_MAP_BASE, **(AUTO_MAP_MLM if is_mlm else {})}
    hf_cfg.save_pretrained(outdir)
    for name in HF_SOURCE_FILES:
        shutil.copyfile(HF_SOURCE_DIR / name, outdir / name)

    # weights
    hf_state = training_to_hf(
        md.state_dict, num_layers=md.cfg.num_layers, vocab_size=md.cfg.vocab_size, with_decoder=is_mlm
    )
    save_file(hf_state, str(outdir / "model.safetensors"), metadata={"format": "pt"})

    write_tokenizer(tokenizer_dir, outdir, model_max_length=md.cfg.max_position_embeddings)
    if write_st:
        write_sentence_transformers(outdir, md.pooling, md.cfg.hidden_size, md.cfg.max_position_embeddings)

    report = ExportReport(
        outdir=str(outdir),
        source=str(md.path),
        kind=md.kind,
        architecture=hf_cfg.architectures[0],
        sentence_transformers=write_st,
        parity_checked=False,
        atol=atol,
        logits_atol=logits_atol,
    )
    if parity:
        check_parity(md, outdir, tokenizer_dir, report, sentences=list(sentences))
        report.parity_checked = True
    (outdir / "neobert_export.json").write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
    write_model_card(outdir, md, report, eval_results=eval_results or None, license=license)
    log.info(
        "[export] wrote %s (%s, %s)", outdir, report.architecture, "parity ok" if parity else "no parity"
    )
    return report


def write_tokenizer(tokenizer_dir: str | Path, outdir: Path, *, model_max_length: int) -> None:
    """Copy the training tokenizer so `AutoTokenizer.from_pretrained(outdir)` loads it offline. The default
    tokenizer.json pads and truncates every input to 128 tokens; both are removed (padding and truncation are
    then per call, as users expect), and `model_max_length` becomes the model's context length."""
    src = Path(tokenizer_dir)
    if src.is_file():
        src = src.parent
    tok_json = src / "tokenizer.json"
    if not tok_json.exists():
        raise FileNotFoundError(
            f"no tokenizer.json in {src}; pass --tokenizer DIR holding the training tokenizer"
        )
    data = json.loads(tok_json.read_text())
    data["padding"] = None
    data["truncation"] = None
    (outdir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    if (src / "vocab.txt").exists():
        shutil.copyfile(src / "vocab.txt", outdir / "vocab.txt")
    lowercase = bool((data.get("normalizer") or {}).get("lowercase", False))
    tok_cfg = {
        "tokenizer_class": "BertTokenizer",  # fast (tokenizers-backed) variant is picked by AutoTokenizer
        "do_lower_case": lowercase,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "truncation_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: the model has none
        "clean_up_tokenization_spaces": False,
        **SPECIAL_TOKENS,
    }
    (outdir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (outdir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")


def write_sentence_transformers(outdir: Path, pooling: str, hidden_size: int, max_seq_length: int) -> None:
    """modules.json = Transformer (this dir, loaded with trust_remote_code) -> Pooling (our pooling mode).
    No Normalize module: our contrastive loss normalizes inside the similarity, and `encode(...,
    normalize_embeddings=True)` or cosine similarity gives the same ranking."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (outdir / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (outdir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2) + "\n"
    )
    (outdir / "1_Pooling").mkdir(exist_ok=True)
    pool_cfg = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    (outdir / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2) + "\n")
    (outdir / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2)
        + "\n"
    )


# ------------------------------------------------------------------------------------------------ parity
def _training_hidden(md: ModelDir, ids_T: torch.Tensor, lengths: list[int]):
    """Training model (exact sdpa varlen backend, fp32, CPU): hidden (T, D) and, for mlm, logits (T, V)."""
    cfg = dataclasses.replace(md.cfg, attn_backend="sdpa", ffn_backend="torch")
    meta = PackedMeta.from_lengths(lengths)
    with torch.no_grad():
        if md.kind == "mlm":
            model = NeoBERTForMLM(cfg)
            model.load_state_dict(md.state_dict, strict=True)
            model.eval()
            hidden = model.encoder(ids_T, meta)
            return hidden, model.logits(hidden), meta
        enc = NeoBERT(cfg)
        enc.load_state_dict(encoder_state_dict(md.state_dict), strict=True)
        enc.eval()
        return enc(ids_T, meta), None, meta


def check_parity(
    md: ModelDir, outdir: Path, tokenizer_dir: str | Path, report: ExportReport, *, sentences: list[str]
) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    if not sentences:
        raise ValueError("parity check needs at least one sentence")
    # tokenizers: the exported one (as users load it) must give the training tokenizer's ids
    src = Path(tokenizer_dir)
    train_tok = Tokenizer.from_file(str(src / "tokenizer.json" if src.is_dir() else src))
    train_tok.no_padding()
    train_tok.no_truncation()
    train_ids = [e.ids for e in train_tok.encode_batch(sentences)]
    hf_tok = AutoTokenizer.from_pretrained(outdir, local_files_only=True, trust_remote_code=True)
    batch = hf_tok(sentences, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()  # (B, S)
    hf_ids = [row[m].tolist() for row, m in zip(batch["input_ids"], mask, strict=True)]
    if hf_ids != train_ids:
        bad = next(i for i, (a, b) in enumerate(zip(hf_ids, train_ids, strict=True)) if a != b)
        raise ParityError(
            f"exported tokenizer disagrees with {src} on sentence {bad}: {hf_ids[bad][:12]} vs {train_ids[bad][:12]}"
        )
    lengths = [len(x) for x in train_ids]
    ids_T = torch.tensor([t for x in train_ids for t in x], dtype=torch.long)
    ref_hidden, ref_logits, meta = _training_hidden(md, ids_T, lengths)
    report.num_parity_tokens = int(ids_T.numel())

    load = dict(trust_remote_code=True, local_files_only=True)
    with torch.no_grad():
        base = AutoModel.from_pretrained(outdir, **load).float().eval()
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        report.max_abs_diff_hidden = float((hidden[mask] - ref_hidden).abs().max())
        del base
        if ref_logits is not None:
            mlm = AutoModelForMaskedLM.from_pretrained(outdir, **load).float().eval()
            logits = mlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if logits.shape[-1] != ref_logits.shape[-1]:
                raise ParityError(
                    f"exported vocab {logits.shape[-1]} != training vocab {ref_logits.shape[-1]}"
                )
            report.max_abs_diff_logits = float((logits[mask] - ref_logits).abs().max())
            del mlm
    if report.sentence_transformers:
        report.max_abs_diff_sentence_embedding = _st_parity(outdir, md.pooling, ref_hidden, meta, sentences)

    failures = []
    if report.max_abs_diff_hidden > report.atol:
        failures.append(f"hidden states max |diff| {report.max_abs_diff_hidden:.3e} > atol {report.atol:.1e}")
    if report.max_abs_diff_logits is not None and report.max_abs_diff_logits > report.logits_atol:
        failures.append(f"MLM logits max |diff| {report.max_abs_diff_logits:.3e} > {report.logits_atol:.1e}")
    emb = report.max_abs_diff_sentence_embedding
    if emb is not None and emb > report.atol:
        failures.append(f"sentence embeddings max |diff| {emb:.3e} > atol {report.atol:.1e}")
    if failures:
        raise ParityError(
            f"export {outdir} does not reproduce {md.path} on {len(sentences)} sentences "
            f"({report.num_parity_tokens} tokens): "
            + "; ".join(failures)
            + ". The export dir is left in place for inspection; check neobert/hf/keymap.py against neobert/model.py"
        )
    log.info(
        "[export] parity ok: hidden %.2e, logits %s, sentence emb %s",
        report.max_abs_diff_hidden,
        report.max_abs_diff_logits,
        report.max_abs_diff_sentence_embedding,
    )


def _st_parity(
    outdir: Path, pooling: str, ref_hidden: torch.Tensor, meta, sentences: list[str]
) -> float | None:
    from neobert.contrastive import pool_sequences

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        log.warning(
            "[export] sentence-transformers not installed: the sentence-transformers dir is not verified"
        )
        return None
    st = SentenceTransformer(str(outdir), trust_remote_code=True, device="cpu", local_files_only=True)
    got = torch.as_tensor(st.encode(sentences, convert_to_numpy=True, batch_size=len(sentences)))
    want = pool_sequences(ref_hidden, meta.cu_seqlens, pooling).float()
    return float((got - want).abs().max())
