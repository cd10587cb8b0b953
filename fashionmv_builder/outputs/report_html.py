"""`fashionmv report --html`: the build report as one self-contained HTML page with plots.

Everything is inline (CSS, plots as SVG, contact sheets as base64 images), so the page can be mailed or attached to
an issue and opens anywhere without a network. The page is a Jinja2 template (templates/report.html.j2) rendered
with autoescaping, so every text that comes from the data is escaped: LMM texts are untrusted. The page is drawn
from the dict `build_report` returns (or its report.json), never from the shards, so the HTML always shows the same
numbers as the JSON and Markdown.
"""

from __future__ import annotations

import base64
import io
import itertools
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import matplotlib
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from fashionmv_builder.core.build import CANDIDATES
from fashionmv_builder.core.config import RunConfig
from fashionmv_builder.outputs.contact_sheets import Sheet, write_contact_sheets
from fashionmv_builder.outputs.report import RUN_HEADER, run_rows

STAGE_LABELS = {CANDIDATES.stage: f"{CANDIDATES.stage} (split)"}
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")
TOP_COMBINATIONS = 12
TOP_REASONS = 15
SHEET_JPEG_QUALITY = 85  # the sheets are embedded as JPEG: a PNG of photos is 3-4 times larger


# --- plots -------------------------------------------------------------------------------------------------------


def _style(key: str) -> AbstractContextManager:
    """Text as SVG text (small, searchable), a fixed hash salt (the same report gives the same bytes, and ids differ
    between figures), and no mathtext: a `$` in a label from the data must not be parsed."""
    return matplotlib.rc_context(
        {"svg.fonttype": "none", "svg.hashsalt": key, "text.parse_math": False, "font.size": 9, "axes.titlesize": 10}
    )


def _svg(fig: Figure) -> str:
    """The figure as an inline <svg> element: no XML prolog, DOCTYPE or metadata."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.DOTALL)


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#888")
    ax.set_xticks([])
    ax.set_yticks([])


def _hist_panel(ax: Axes, hist: dict | None, title: str, xlabel: str) -> bool:
    ax.set_title(title)
    edges, counts = (hist or {}).get("edges", []), (hist or {}).get("counts", [])
    if not counts:
        _no_data(ax)
        return False
    widths = [b - a for a, b in itertools.pairwise(edges)]
    if set(widths) == {1}:  # one bin per whole number: a bar centred on it reads better
        ax.bar(edges[:-1], counts, width=0.9, color=COLOURS[0])
    else:
        ax.bar(edges[:-1], counts, width=widths, align="edge", color=COLOURS[0], edgecolor="white")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return True


def _bar_panel(
    ax: Axes, values: dict, title: str, xlabel: str = "", ylabel: str = "count", horizontal: bool = False
) -> bool:
    """Bars in the dict's order (horizontal: the first on top, the value axis labelled `ylabel`)."""
    ax.set_title(title)
    if not values:
        _no_data(ax)
        return False
    labels, heights = [str(k) for k in values], list(values.values())
    whole = all(isinstance(h, int) for h in heights)
    if horizontal:
        ax.barh(labels[::-1], heights[::-1], color=COLOURS[0])
        ax.set_xlabel(ylabel)
        if whole:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.bar(labels, heights, color=COLOURS[0])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if whole:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return True


def _panels(key: str, draw: list[Callable[[Axes], bool]], width: float = 10.0, height: float = 3.2) -> str | None:
    """One figure with a panel per drawer; None when no panel had data (the section then says so)."""
    with _style(key):
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(1, len(draw), squeeze=False)[0]
        if not any([d(ax) for d, ax in zip(draw, axes, strict=True)]):
            return None
        fig.tight_layout()
        return _svg(fig)


def funnel_svg(funnel: dict, key: str = "funnel") -> str | None:
    """Products left after each stage, and every stage's reject reasons."""
    stages = [s for s, f in funnel.items() if f.get("out") is not None]
    reasons = {
        f"{STAGE_LABELS.get(s, s)}: {reason} ({level})": n
        for s, f in funnel.items()
        for level, counts in f.get("rejects", {}).items()
        for reason, n in counts.items()
    }
    top = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:TOP_REASONS])

    def products(ax: Axes) -> bool:
        ax.set_title("products after each stage (grey: products in)")
        if not stages:
            _no_data(ax)
            return False
        labels = [STAGE_LABELS.get(s, s) for s in stages]
        outs = [funnel[s]["out"] for s in stages]
        ins = [funnel[s]["in"] or 0 for s in stages]
        ax.barh(labels[::-1], ins[::-1], color="#dddddd")
        ax.barh(labels[::-1], outs[::-1], color=COLOURS[0])
        for y, (i, o) in enumerate(zip(ins[::-1], outs[::-1], strict=True)):
            ax.text(max(i, o), y, f" {i}→{o}", va="center", fontsize=8)
        ax.set_xlim(0, 1.3 * max(ins + outs + [1]))
        ax.set_xlabel("products")
        return True

    def rejects(ax: Axes) -> bool:
        ax.set_title("reject reasons (rows of each stage's rejects table)")
        if not top:
            _no_data(ax)
            return bool(stages)  # no rejects is a fact, not missing data
        return _bar_panel(ax, top, ax.get_title(), ylabel="rows", horizontal=True)

    return _panels(key, [products, rejects], height=max(3.2, 0.28 * max(len(stages), len(top)) + 1))


def histograms_svg(key: str, panels: list[tuple[str, dict | None]], xlabel: str = "words") -> str | None:
    return _panels(key, [lambda ax, t=t, h=h: _hist_panel(ax, h, t, xlabel) for t, h in panels])


def views_per_product_svg(counts: dict, key: str = "views") -> str | None:
    return _panels(
        key, [lambda ax: _bar_panel(ax, counts, "products by number of kept views", "views", "products")], width=5
    )


def views_involved_svg(count: dict, combinations: dict, key: str = "views_involved") -> str | None:
    top = dict(list(combinations.items())[:TOP_COMBINATIONS])
    return _panels(
        key,
        [
            lambda ax: _bar_panel(ax, count, "triplets by number of views involved", "views", "triplets"),
            lambda ax: _bar_panel(
                ax, top, f"most frequent view sets (top {TOP_COMBINATIONS})", ylabel="triplets", horizontal=True
            ),
        ],
        height=max(3.2, 0.25 * len(top) + 1),
    )


def redundancy_svg(redundancy: dict, key: str = "redundancy") -> str | None:
    """Grouped R@1/5/10 bars for text-only, image-only and composed retrieval."""
    runs = [r for r in ("text_only", "image_only", "composed") if isinstance(redundancy.get(r), dict)]

    def draw(ax: Axes) -> bool:
        ax.set_title("modality redundancy on val (recall, %)")
        if not runs:
            _no_data(ax)
            return False
        ks = ("R@1", "R@5", "R@10")
        for i, run in enumerate(runs):
            xs = [j + (i - 1) * 0.27 for j in range(len(ks))]
            ax.bar(xs, [redundancy[run].get(k, 0) for k in ks], width=0.27, label=run, color=COLOURS[i])
        ax.set_xticks(range(len(ks)), ks)
        ax.set_ylabel("recall (%)")
        ax.legend(fontsize=8)
        return True

    return _panels(key, [draw], width=6)


def removal_svg(datasets: dict, key: str = "verifier") -> str | None:
    rates = {d: round(100 * v["verifier"]["removal_rate"], 2) for d, v in datasets.items() if _rate(v) is not None}
    title = "products the verifier judged hallucinated (%)"
    return _panels(key, [lambda ax: _bar_panel(ax, rates, title, "dataset", "% of products verified")], width=6)


def _rate(entry: dict) -> float | None:
    return (entry.get("verifier") or {}).get("removal_rate")


def cost_svg(cost: dict, key: str = "cost") -> str | None:
    tokens = {s: c for s, c in cost.items() if c.get("tokens_in") or c.get("tokens_out")}
    hours = {s: c["gpu_hours"] for s, c in cost.items() if c.get("gpu_hours") is not None}

    def draw_tokens(ax: Axes) -> bool:
        ax.set_title("tokens per LMM stage (all datasets)")
        if not tokens:
            _no_data(ax)
            return False
        xs = range(len(tokens))
        ax.bar([x - 0.2 for x in xs], [c["tokens_in"] for c in tokens.values()], 0.4, label="in", color=COLOURS[0])
        ax.bar([x + 0.2 for x in xs], [c["tokens_out"] for c in tokens.values()], 0.4, label="out", color=COLOURS[1])
        ax.set_xticks(list(xs), list(tokens))
        ax.set_ylabel("tokens")
        ax.legend(fontsize=8)
        return True

    return _panels(
        key, [draw_tokens, lambda ax: _bar_panel(ax, hours, "GPU-hours per LMM stage", "stage", "GPU-hours")]
    )


# --- HTML --------------------------------------------------------------------------------------------------------


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Autoescape on for every template: report texts (LMM output, product ids, paths) are untrusted. StrictUndefined
# turns a misspelt name in the template into an error instead of an empty cell.
_ENV = Environment(
    loader=PackageLoader("fashionmv_builder.outputs", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.tests["numeric"] = _number  # numbers are right-aligned; Jinja's own `number` test counts booleans too


def _safe(svg: str | None) -> Markup | None:
    """A plot this module drew (matplotlib escapes the texts in it), to be inserted as it is."""
    return None if svg is None else Markup(svg)


def _anchor(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", dataset)


def _cell(value: object) -> object:
    return "no data" if value is None else value


def _words_row(name: str, words: dict) -> list[object]:
    return [name, *(words.get(k, "no data") for k in ("mean", "median", "max"))]


def _sheet(sheet: Sheet) -> dict[str, Any]:
    """A contact sheet embedded as a base64 JPEG (the PNG beside the report is the full-quality file), and the
    texts of its triplets, whole (the image cuts long ones)."""
    buf = io.BytesIO()
    with Image.open(sheet.path) as img:
        img.convert("RGB").save(buf, format="JPEG", quality=SHEET_JPEG_QUALITY, optimize=True)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    rows = [
        [
            i,
            t["split"],
            t["source_id"],
            t["target_id"],
            "+".join(t["views_involved"] or []),
            t["modification_text_short"],
        ]
        for i, t in enumerate(sheet.triplets, start=1)
    ]
    return {
        "name": f"{sheet.path.parent.name}/{sheet.path.name}",
        "src": Markup(f"data:image/jpeg;base64,{data}"),  # base64 of our own JPEG: nothing in it to escape
        "rows": rows,
    }


def _dataset(dataset: str, d: dict, sheets: list[Sheet] | None) -> dict[str, Any]:
    """What the template shows of one dataset: plots, table rows and notes."""
    key = _anchor(dataset)
    funnel = d.get("funnel", {})
    verifier = d.get("verifier") or {}
    caption = d.get("caption_words") or {}
    redundancy = d.get("modality_redundancy") or {}
    cost = d.get("lmm_cost") or {}
    has_rate = "removal_rate" in verifier
    return {
        "name": dataset,
        "key": key,
        "funnel_svg": _safe(funnel_svg(funnel, f"{key}-funnel")),
        "funnel_rows": [[STAGE_LABELS.get(s, s), _cell(f.get("in")), _cell(f.get("out"))] for s, f in funnel.items()],
        "reject_rows": [
            [STAGE_LABELS.get(s, s), level, reason, n]
            for s, f in funnel.items()
            for level, counts in f.get("rejects", {}).items()
            for reason, n in counts.items()
        ],
        "count_rows": [[s, d.get("products", {}).get(s, 0), d.get("triplets", {}).get(s, 0)] for s in ("train", "val")],
        "share_rows": [[d.get("triplets_per_source"), d.get("hard_negatives"), _cell(d.get("share_multi_view"))]],
        "views_svg": _safe(views_per_product_svg(d.get("views_per_product") or {}, f"{key}-views")),
        "captions_svg": _safe(
            histograms_svg(
                f"{key}-captions",
                [
                    ("long captions", (caption.get("long") or {}).get("histogram")),
                    ("short captions", (caption.get("short") or {}).get("histogram")),
                ],
            )
        ),
        "caption_rows": [_words_row(n, caption.get(n) or {}) for n in ("long", "short")],
        "modifications_svg": _safe(
            histograms_svg(
                f"{key}-modifications",
                [
                    ("short modification texts", (d.get("words_short") or {}).get("histogram")),
                    ("long modification texts", (d.get("words_long") or {}).get("histogram")),
                ],
            )
        ),
        "modification_rows": [
            _words_row("short", d.get("words_short") or {}),
            _words_row("long", d.get("words_long") or {}),
        ],
        "views_involved_svg": _safe(
            views_involved_svg(d.get("views_involved_count") or {}, d.get("views_involved") or {}, f"{key}-vi")
        ),
        "verifier_rows": [[verifier["products_in"], verifier["verdicts_remove"], verifier["removal_rate"]]]
        if has_rate
        else [],
        "verifier_note": verifier.get("note") if has_rate else None,
        "cost_rows": [
            [s, c.get("tokens_in"), c.get("tokens_out"), _cell(c.get("server_seconds"))] for s, c in cost.items()
        ],
        "redundancy_svg": _safe(redundancy_svg(redundancy, f"{key}-redundancy")),
        "redundancy_rows": [
            [r, *(redundancy[r].get(k) for k in ("R@1", "R@5", "R@10"))]
            for r in ("text_only", "image_only", "composed")
            if isinstance(redundancy.get(r), dict)
        ],
        "sizes": {"gallery": redundancy.get("gallery"), "queries": redundancy.get("queries")}
        if "gallery" in redundancy
        else None,
        "redundancy_note": redundancy.get("note"),
        "sheets": None if sheets is None else [_sheet(s) for s in sheets],
    }


def render_html(report: dict, sheets: dict[str, list[Sheet]] | None = None) -> str:
    """The whole page. `sheets`: the contact sheets per dataset (None: none were drawn)."""
    datasets = report.get("datasets", {})
    cost = report.get("lmm_cost") or {}
    verifier_rows = [
        [d, v["verifier"]["products_in"], v["verifier"]["verdicts_remove"], v["verifier"]["removal_rate"]]
        for d, v in datasets.items()
        if _rate(v) is not None
    ]
    notes = sorted(
        {v["verifier"]["note"] for v in datasets.values() if _rate(v) is not None and "note" in v["verifier"]}
    )
    cost_rows = [
        [s, c.get("tokens_in"), c.get("tokens_out"), _cell(c.get("server_seconds")), _cell(c.get("gpu_hours"))]
        for s, c in cost.items()
    ]
    return _ENV.get_template("report.html.j2").render(
        output_dir=report.get("output_dir", ""),
        config_hash=str(report.get("config_hash", ""))[:12],
        removal_svg=_safe(removal_svg(datasets)),
        verifier_rows=verifier_rows,
        notes=notes,
        cost_svg=_safe(cost_svg(cost)),
        cost_rows=cost_rows,
        run_header=RUN_HEADER,
        run_rows=run_rows(report.get("runs", [])),
        datasets=[_dataset(d, v, None if sheets is None else sheets.get(d, [])) for d, v in datasets.items()],
    )


def write_html_report(config: RunConfig, report: dict, folder: Path, sheets: int = 2, seed: int = 0) -> Path:
    """report.html (and contact_sheets/*.png unless `sheets` is 0) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    drawn = write_contact_sheets(config, folder, sheets=sheets, seed=seed) if sheets > 0 else None
    path = folder / "report.html"
    path.write_text(render_html(report, drawn), encoding="utf-8")
    return path
