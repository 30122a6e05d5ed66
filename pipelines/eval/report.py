"""Side-by-side tables of results.json: `results.md` (Markdown) and `results.html` (Jinja2 template).

Rows are models, the reference model first (every table has a known-good row), columns are task / metric; a cell
is `mean ± std` over the fine-tuning seeds (just the mean for one run). Count entries (num_*) are not shown.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.eval.encoders import REFERENCE, REFERENCE_LABEL
from pipelines.eval.tasks import ALL_TASKS

TEMPLATE_DIR = Path(__file__).with_name("templates")


def columns(results: dict) -> list[tuple[str, str]]:
    """(task, metric) pairs present for any model, in ALL_TASKS order."""
    cols: list[tuple[str, str]] = []
    for task in ALL_TASKS:
        for model in results.values():
            for metric in model.get(task, {}):
                if metric.endswith("_std") or metric.startswith("num_") or (task, metric) in cols:
                    continue
                cols.append((task, metric))
    return cols


def cell(entry: dict | None, metric: str) -> str:
    if not entry or metric not in entry:
        return "–"
    mean, std, n = entry[metric], entry.get(f"{metric}_std", 0.0), entry.get("num_seeds", 1)
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def rows(results: dict, order: list[str]) -> list[tuple[str, list[str]]]:
    names = sorted(order, key=lambda m: m != REFERENCE)  # the reference row first, then the given order
    cols = columns(results)
    return [
        (REFERENCE_LABEL if m == REFERENCE else m, [cell(results.get(m, {}).get(t), met) for t, met in cols])
        for m in names
    ]


def markdown(results: dict, order: list[str], skipped: dict | None = None) -> str:
    cols = columns(results)
    head = "| model | " + " | ".join(f"{t} {m}" for t, m in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    body = ["| " + " | ".join([name, *cells]) + " |" for name, cells in rows(results, order)]
    notes = [f"- {m}: {t} skipped ({why})" for m, ts in (skipped or {}).items() for t, why in ts.items()]
    return "\n".join([head, sep, *body, *([""] + notes if notes else [])]) + "\n"


def html(results: dict, order: list[str], skipped: dict | None = None) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True)
    return env.get_template("results.html.j2").render(
        columns=columns(results), rows=rows(results, order), skipped=skipped or {}
    )


def write_tables(d: Path, results: dict, *, order: list[str], skipped: dict | None = None) -> None:
    (d / "results.md").write_text(markdown(results, order, skipped))
    (d / "results.html").write_text(html(results, order, skipped))
