"""HTML reports through Jinja2 templates (`pipelines/templates/`), shared by the preprocessing and the contrastive
validation reports.

Autoescaping is on for every template: texts, file and source names from user data can never inject markup
(tested with `<script>` / `<img onerror>` payloads). Charts are inline SVG drawn by template macros
(`_charts.html.j2`), so a report is one self-contained file with no scripts.
"""

from __future__ import annotations

import math
from typing import Any

import jinja2

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("pipelines", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def fmt_number(v: Any, digits: int = 3) -> str:
    """Numbers for people: integers with thousands separators, floats to `digits` significant decimals."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:,.{max(digits - 1, 1)}f}"
    return str(v)


def fmt_percent(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


_ENV.filters["num"] = fmt_number
_ENV.filters["pct"] = fmt_percent


def render(template: str, **context: Any) -> str:
    """Render `pipelines/templates/<template>` with autoescaping."""
    return _ENV.get_template(template).render(**context)
