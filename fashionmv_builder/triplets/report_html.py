"""`fashionmv report --html`: the build report as one self-contained HTML page with plots.

Everything is inline (CSS, plots as SVG, contact sheets as base64 images), so the page can be mailed or attached to
an issue and opens anywhere without a network. Every text that comes from the data is escaped: LMM texts are
untrusted. The page is drawn from the dict `build_report` returns (or its report.json), never from the shards, so
the HTML always shows the same numbers as the JSON and Markdown.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from fashionmv_builder.config import RunConfig
from fashionmv_builder.triplets.contact_sheets import Sheet, write_contact_sheets

STAGE_LABELS = {"candidates": "candidates (split)"}
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")
TOP_COMBINATIONS = 12
TOP_REASONS = 15
SHEET_JPEG_QUALITY = 85  # the sheets are embedded as JPEG: a PNG of photos is 3-4 times larger

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1180px; padding: 0 16px 48px; color: #222; }
h1 { margin-top: 24px; } h2 { border-bottom: 2px solid #ddd; margin-top: 40px; padding-bottom: 4px; }
h3 { margin: 24px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 12px; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.figure svg { max-width: 100%; height: auto; } .nodata { color: #888; font-style: italic; }
.note { color: #8a5a00; } nav a { margin-right: 12px; } code { background: #f4f4f4; padding: 0 3px; }
figure.sheet { margin: 8px 0 16px; } figure.sheet img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #666; font-size: 12px; }
"""


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


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _figure(name: str, svg: str | None) -> str:
    body = svg if svg is not None else '<p class="nodata">no data</p>'
    return f'<div class="figure" data-figure="{_e(name)}">{body}</div>'


def _table(header: list[str], rows: list[list[object]]) -> str:
    if not rows:
        return '<p class="nodata">no data</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if _number(c) else f"<td>{_e(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: object) -> object:
    return "no data" if value is None else value


def _words_row(name: str, words: dict) -> list[object]:
    return [name, *(words.get(k, "no data") for k in ("mean", "median", "max"))]


def _sheet_html(sheet: Sheet) -> str:
    """A contact sheet embedded as a base64 JPEG (the PNG beside the report is the full-quality file), then the
    texts of its triplets, whole (the image cuts long ones)."""
    buf = io.BytesIO()
    with Image.open(sheet.path) as img:
        img.convert("RGB").save(buf, format="JPEG", quality=SHEET_JPEG_QUALITY, optimize=True)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    name = f"{sheet.path.parent.name}/{sheet.path.name}"
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
    return (
        f'<figure class="sheet"><img alt="contact sheet {_e(name)}" src="data:image/jpeg;base64,{data}">'
        f"<figcaption>{_e(name)}</figcaption></figure>"
        + _table(["row", "split", "source", "target", "views involved", "modification (short)"], rows)
    )


def _dataset_html(dataset: str, d: dict, sheets: list[Sheet] | None) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]", "_", dataset)
    funnel = d.get("funnel", {})
    rejects = [
        [STAGE_LABELS.get(s, s), level, reason, n]
        for s, f in funnel.items()
        for level, counts in f.get("rejects", {}).items()
        for reason, n in counts.items()
    ]
    verifier = d.get("verifier") or {}
    caption = d.get("caption_words") or {}
    redundancy = d.get("modality_redundancy") or {}
    cost = d.get("lmm_cost") or {}
    parts = [
        f'<section class="dataset" id="ds-{key}"><h2>{_e(dataset)}</h2>',
        "<h3>Funnel</h3>",
        _figure("funnel", funnel_svg(funnel, f"{key}-funnel")),
        _table(
            ["stage", "products in", "products out"],
            [[STAGE_LABELS.get(s, s), _cell(f.get("in")), _cell(f.get("out"))] for s, f in funnel.items()],
        ),
        _table(["stage", "level", "reject reason", "rows"], rejects) if rejects else "<p>no rejects</p>",
        "<h3>Counts</h3>",
        _table(
            ["split", "products", "triplets"],
            [[s, d.get("products", {}).get(s, 0), d.get("triplets", {}).get(s, 0)] for s in ("train", "val")],
        ),
        _table(
            ["triplets per source", "hard negatives", "share of triplets spanning ≥ 2 views (FashionMV: 0.9983)"],
            [[d.get("triplets_per_source"), d.get("hard_negatives"), _cell(d.get("share_multi_view"))]],
        ),
        "<h3>Views per product</h3>",
        _figure("views_per_product", views_per_product_svg(d.get("views_per_product") or {}, f"{key}-views")),
        "<h3>Caption lengths</h3>",
        _figure(
            "caption_words",
            histograms_svg(
                f"{key}-captions",
                [
                    ("long captions", (caption.get("long") or {}).get("histogram")),
                    ("short captions", (caption.get("short") or {}).get("histogram")),
                ],
            ),
        ),
        _table(
            ["caption", "mean words", "median", "max"],
            [_words_row(n, caption.get(n) or {}) for n in ("long", "short")],
        ),
        "<h3>Modification text lengths</h3>",
        _figure(
            "modification_words",
            histograms_svg(
                f"{key}-modifications",
                [
                    ("short modification texts", (d.get("words_short") or {}).get("histogram")),
                    ("long modification texts", (d.get("words_long") or {}).get("histogram")),
                ],
            ),
        ),
        _table(
            ["modification text", "mean words", "median", "max"],
            [_words_row("short", d.get("words_short") or {}), _words_row("long", d.get("words_long") or {})],
        ),
        "<h3><code>views_involved</code></h3>",
        _figure(
            "views_involved",
            views_involved_svg(d.get("views_involved_count") or {}, d.get("views_involved") or {}, f"{key}-vi"),
        ),
        "<h3>Verifier</h3>",
        _table(
            ["products verified", "judged hallucinated", "rate"],
            [[verifier["products_in"], verifier["verdicts_remove"], verifier["removal_rate"]]]
            if "removal_rate" in verifier
            else [],
        ),
        f'<p class="note">{_e(verifier["note"])}</p>' if verifier.get("note") and "removal_rate" in verifier else "",
        "<h3>LMM cost of this dataset</h3>",
        _table(
            ["LMM stage", "tokens in", "tokens out", "stage server-seconds (shared by all datasets)"],
            [[s, c.get("tokens_in"), c.get("tokens_out"), _cell(c.get("server_seconds"))] for s, c in cost.items()],
        ),
        "<h3>Modality redundancy</h3>",
        _figure("modality_redundancy", redundancy_svg(redundancy, f"{key}-redundancy")),
        _table(
            ["retrieval", "R@1", "R@5", "R@10"],
            [
                [r, *(redundancy[r].get(k) for k in ("R@1", "R@5", "R@10"))]
                for r in ("text_only", "image_only", "composed")
                if isinstance(redundancy.get(r), dict)
            ],
        ),
        f"<p>gallery {_e(redundancy.get('gallery'))}, queries {_e(redundancy.get('queries'))}</p>"
        if "gallery" in redundancy
        else "",
        f'<p class="note">{_e(redundancy["note"])}</p>' if redundancy.get("note") else "",
        "<h3>Contact sheets</h3>",
    ]
    if sheets:
        parts.append(
            "<p>A seeded sample of triplets: source views | short modification text | target views | hard negatives "
            "(first view of each, in the order the LMM saw them).</p>"
        )
        parts += [_sheet_html(p) for p in sheets]
    else:
        parts.append('<p class="nodata">no data</p>' if sheets is not None else "<p>not drawn (--sheets 0)</p>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(report: dict, sheets: dict[str, list[Sheet]] | None = None) -> str:
    """The whole page. `sheets`: the contact sheets per dataset (None: none were drawn)."""
    datasets = report.get("datasets", {})
    cost = report.get("lmm_cost") or {}
    nav = " ".join(f'<a href="#ds-{re.sub(r"[^A-Za-z0-9_-]", "_", d)}">{_e(d)}</a>' for d in datasets)
    verifier_rows = [
        [d, v["verifier"]["products_in"], v["verifier"]["verdicts_remove"], v["verifier"]["removal_rate"]]
        for d, v in datasets.items()
        if _rate(v) is not None
    ]
    notes = sorted(
        {v["verifier"]["note"] for v in datasets.values() if _rate(v) is not None and "note" in v["verifier"]}
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Build report: {_e(report.get('output_dir', ''))}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Build report</h1>",
        f"<p><code>{_e(report.get('output_dir', ''))}</code>, config hash "
        f"<code>{_e(str(report.get('config_hash', ''))[:12])}</code></p>",
        f"<nav>{nav}</nav>" if datasets else '<p class="nodata">no data: no dataset of this build has stats</p>',
        '<section id="overview"><h2>Whole build</h2>',
        "<h3>Verifier removal rate per dataset</h3>",
        _figure("verifier_removal", removal_svg(datasets)),
        _table(["dataset", "products verified", "judged hallucinated", "rate"], verifier_rows),
        *(f'<p class="note">{_e(n)}</p>' for n in notes),
        "<h3>Tokens and GPU-hours per LMM stage</h3>",
        _figure("lmm_cost", cost_svg(cost)),
        _table(
            ["LMM stage", "tokens in", "tokens out", "server-seconds", "GPU-hours"],
            [
                [s, c.get("tokens_in"), c.get("tokens_out"), _cell(c.get("server_seconds")), _cell(c.get("gpu_hours"))]
                for s, c in cost.items()
            ],
        ),
        "<p>Every dataset of a stage runs on the same server at the same time: a stage's GPU-hours are its server "
        "time (seconds × endpoints), counted once for the build.</p>",
        "</section>",
    ]
    parts += [_dataset_html(d, v, None if sheets is None else sheets.get(d, [])) for d, v in datasets.items()]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html_report(config: RunConfig, report: dict, folder: Path, sheets: int = 2, seed: int = 0) -> Path:
    """report.html (and contact_sheets/*.png unless `sheets` is 0) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    drawn = write_contact_sheets(config, folder, sheets=sheets, seed=seed) if sheets > 0 else None
    path = folder / "report.html"
    path.write_text(render_html(report, drawn), encoding="utf-8")
    return path
