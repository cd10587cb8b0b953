"""The HTML build report and the triplet contact sheets: pure parts on tiny synthetic data, then the real build."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from fashionmv_builder.core.build import DEDUPE_VIEWS, INGEST_IMAGES, TRIPLETS, Build
from fashionmv_builder.core.config import RunConfig, validate_config
from fashionmv_builder.outputs import contact_sheets as cs
from fashionmv_builder.outputs.report import build_report, count_rejects, histogram, to_markdown
from fashionmv_builder.outputs.report_html import STAGE_LABELS, render_html

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)
FIGURE = re.compile(r'<div class="figure" data-figure="([^"]+)">(.*?)</div>', re.DOTALL)


def _figures(page: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, body in FIGURE.findall(page):
        found.setdefault(name, []).append(body)
    return found


def _config(tmp_path: Path) -> RunConfig:
    return validate_config(
        {
            "output_dir": str(tmp_path / "build"),
            "sources": [{"kind": "folder", "dataset": "shop", "root": str(tmp_path / "unused")}],
        }
    )


def _write(config: RunConfig, stage: str, tables: dict[str, list[dict]], counts: dict, **extra: object) -> None:
    """One marked shard of a stage (tables given as rows) and its stats.json, as a stage would leave them."""
    build = Build(config.output_dir)
    arrow = {name: pa.Table.from_pylist(rows) for name, rows in tables.items()}
    build.write_shard(stage, "shop", 0, arrow, config_hash="h", fingerprint="f", counts=counts, metadata={})
    build.store(stage, "shop").write_stats(extra)


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 50)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


# --- pure parts --------------------------------------------------------------------------------------------------


def test_histogram_bins_whole_numbers():
    assert histogram([]) == {"edges": [], "counts": []}
    assert histogram([3, 3, 4, 7]) == {"edges": [3, 4, 5, 6, 7, 8], "counts": [2, 1, 0, 0, 1]}
    wide = histogram(list(range(100)), max_bins=30)
    assert len(wide["counts"]) <= 30 and sum(wide["counts"]) == 100
    width = wide["edges"][1] - wide["edges"][0]
    assert width == 4 and all(b - a == width for a, b in zip(wide["edges"], wide["edges"][1:], strict=False))
    assert wide["edges"][0] <= 0 and wide["edges"][-1] > 99


def test_rejects_are_counted_per_level_and_reason_most_frequent_first():
    rows = [
        {"level": "view", "reason": "corrupt_image"},
        {"level": "product", "reason": "too_few_views"},
        {"level": "view", "reason": "duplicate_view"},
        {"level": "view", "reason": "duplicate_view"},
    ]
    counted = count_rejects(rows)
    assert counted == {"product": {"too_few_views": 1}, "view": {"duplicate_view": 2, "corrupt_image": 1}}
    assert list(counted["view"]) == ["duplicate_view", "corrupt_image"]
    assert count_rejects([]) == {}


def test_sample_is_seeded_and_a_subset():
    triplets = [{"triplet_id": f"t{i:02d}"} for i in range(30)]
    first = cs.sample_triplets(triplets, 5, seed=1, dataset="shop")
    assert first == cs.sample_triplets(list(reversed(triplets)), 5, seed=1, dataset="shop")
    assert first != cs.sample_triplets(triplets, 5, seed=2, dataset="shop")
    assert len(first) == 5 and all(t in triplets for t in first)
    assert len(cs.sample_triplets(triplets[:3], 5, seed=1, dataset="shop")) == 3


def test_wrap_text_fits_the_column_and_cuts_with_an_ellipsis():
    font = cs._font(12)
    text = "same dress but with a deep V-neck at the front and criss-cross straps at the back " * 3
    lines = cs.wrap_text(text + "x" * 200, font, 120, max_lines=4)
    assert len(lines) == 4 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 120 for line in lines)
    assert cs.wrap_text("short text", font, 300, max_lines=4) == ["short text"]


def test_sheet_has_one_row_per_triplet_with_the_thumbnails_in_their_columns():
    red, green, blue = Image.new("RGB", (77, 96), "red"), Image.new("RGB", (77, 96), "lime"), (0, 0, 255)
    rows = [
        cs.SheetRow(
            f"t{i}",
            "train",
            "wider sleeves",
            ["back", "front"],
            [red, red],
            [green],
            [Image.new("RGB", (37, 46), blue)],
        )
        for i in range(3)
    ]
    sheet = cs.draw_sheet(rows, 96, title="shop")
    assert sheet.height == cs.HEADER + 3 * (96 + 2 * cs.PAD)
    source_width = 2 * 77 + cs.GAP
    target_x = cs.PAD + source_width + 2 * cs.PAD + cs.TEXT_WIDTH + 2 * cs.PAD
    negatives_x = target_x + 77 + 2 * cs.PAD
    for i in range(3):
        y = cs.HEADER + i * (96 + 2 * cs.PAD) + cs.PAD + 10
        assert sheet.getpixel((cs.PAD + 5, y)) == (255, 0, 0)
        assert sheet.getpixel((cs.PAD + 77 + cs.GAP + 5, y)) == (255, 0, 0)
        assert sheet.getpixel((target_x + 5, y)) == (0, 255, 0)
        assert sheet.getpixel((negatives_x + 5, y)) == blue
    assert sheet.width == negatives_x + 90 + cs.PAD  # the negatives column is at least 90 px wide


def test_html_escapes_untrusted_texts_and_is_self_contained(tmp_path):
    image = tmp_path / "contact_sheets" / "shop-01.png"
    image.parent.mkdir()
    Image.new("RGB", (20, 10), "white").save(image)
    evil = "<script>alert(1)</script>"
    entry = {
        "products": {"train": 2},
        "triplets": {"train": 1},
        "funnel": {"ingest": {"in": 2, "out": 2, "rejects": {"view": {'"><img src=x onerror=alert(1)>': 1}}}},
        "views_involved": {evil: 1},
        "views_involved_count": {"2": 1},
        "words_short": {"mean": 3, "median": 3, "max": 3, "histogram": histogram([3])},
        "verifier": {"note": "no data"},
        "modality_redundancy": {"note": evil},
    }
    triplet = {
        "split": "train",
        "source_id": "a",
        "target_id": '"><img src=x onerror=alert(2)>',
        "views_involved": ["back", "front"],
        "modification_text_short": f"make it red {evil}",
    }
    report = {"output_dir": "/b<i>", "config_hash": "abc", "datasets": {"shop": entry}}
    page = render_html(report, {"shop": [cs.Sheet(image, [triplet])]})
    assert "<script" not in page.lower() and "<img src=x" not in page and "<i>" not in page
    assert "make it red &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not EXTERNAL.search(page) and "<link" not in page
    assert page.count('src="data:image/jpeg;base64,') == 1
    figures = _figures(page)
    assert "<svg" in figures["views_involved"][0] and "<svg" in figures["funnel"][0]
    assert "no data" in figures["caption_words"][0] and "no data" in figures["modality_redundancy"][0]


def test_report_of_a_build_without_llm_stages_says_no_data(tmp_path):
    """Ingest and dedupe only: no captions, no verify stage, no triplets; nothing fails, the sections say so."""
    config = _config(tmp_path)
    reject = {"stage": "dedupe", "level": "product", "reason": "too_few_views", "product_id": "c"}
    _write(config, "ingest", {"rejects": []}, {"products_in": 3, "products_out": 3})
    _write(
        config,
        "dedupe",
        {"products": [{"product_id": p, "n_views": n} for p, n in (("a", 2), ("b", 3))], "rejects": [reject]},
        {"products_in": 3, "products_out": 2, "products_rejected": 1},
    )
    report = build_report(config)
    d = report["datasets"]["shop"]
    assert d["funnel"]["dedupe"] == {"in": 3, "out": 2, "rejects": {"product": {"too_few_views": 1}}}
    assert d["funnel"]["verify"]["in"] is None and d["funnel"]["select"]["out"] is None
    assert list(d["funnel"]) == [
        "ingest",
        "dedupe",
        "caption",
        "verify",
        "embed",
        "candidates",
        "select",
        "discriminate",
    ]
    assert list(report["lmm_cost"]) == list(d["lmm_cost"]) == ["caption", "verify", "select", "discriminate"]
    assert d["views_per_product"] == {"2": 1, "3": 1}
    assert d["verifier"] == {"note": "no data"} and d["words_short"] == {} and d["caption_words"]["long"] == {}
    assert report["lmm_cost"]["caption"]["gpu_hours"] is None
    assert json.loads(json.dumps(report)) == report  # report.json holds exactly what the HTML is drawn from
    assert "| verify | no data | no data |" in to_markdown(report)
    figures = _figures(render_html(report, {}))
    assert "<svg" in figures["funnel"][0] and "<svg" in figures["views_per_product"][0]
    for name in ("caption_words", "modification_words", "views_involved", "modality_redundancy", "lmm_cost"):
        assert "no data" in figures[name][0], name


def test_contact_sheets_join_kept_views_and_hard_negatives(tmp_path):
    config = _config(tmp_path)
    colours = {"a": (255, 0, 0), "b": (0, 255, 0), "n1": (0, 0, 255), "n2": (255, 255, 0)}
    views = {"a": 3, "b": 2, "n1": 2, "n2": 2}
    images = [
        {"product_id": p, "view_index": v, "image": {"bytes": _png(colours[p]), "path": None}}
        for p, n in views.items()
        for v in range(n)
    ]
    kept = [
        {"product_id": p, "view_index": v, "file_name": f"{v}.jpg"}
        for p, n in views.items()
        for v in range(n)
        if (p, v) != ("a", 2)
    ]
    _write(config, INGEST_IMAGES.stage, {INGEST_IMAGES.table: images}, {})
    _write(config, DEDUPE_VIEWS.stage, {DEDUPE_VIEWS.table: kept}, {})
    triplet = {
        "triplet_id": "shop:a->b",
        "split": "val",
        "source_id": "a",
        "target_id": "b",
        "modification_text_short": "make it green",
        "modification_text_long": "make it green everywhere",
        "views_involved": ["back", "front"],
    }
    negatives = [
        {"triplet_id": "shop:a->b", "negative_id": "n2", "rank_shown": 1},
        {"triplet_id": "shop:a->b", "negative_id": "n1", "rank_shown": 0},
    ]
    _write(config, TRIPLETS.stage, {"triplets": [triplet], "hard_negatives": negatives}, {})

    thumbs = cs.load_thumbnails(config, "shop", {"a", "n1"}, 96)
    assert sorted(thumbs) == ["a", "n1"] and len(thumbs["a"]) == 2  # view 2 of a was not kept
    assert all(t.height == 96 and t.width == round(40 * 96 / 50) for t in thumbs["a"])

    (tmp_path / "out" / "contact_sheets").mkdir(parents=True)
    stale = tmp_path / "out" / "contact_sheets" / "old-07.png"
    stale.write_bytes(b"")
    sheets = cs.write_contact_sheets(config, tmp_path / "out", sheets=3, per_sheet=4)
    assert not stale.exists()
    [sheet] = sheets["shop"]
    assert sheet.path.name == "shop-01.png" and sheet.triplets[0]["triplet_id"] == "shop:a->b"
    with Image.open(sheet.path) as img:
        img = img.convert("RGB")
        assert img.height == cs.HEADER + 96 + 2 * cs.PAD
        y = cs.HEADER + cs.PAD + 10
        width = round(40 * 96 / 50)
        target_x = cs.PAD + 2 * width + cs.GAP + 2 * cs.PAD + cs.TEXT_WIDTH + 2 * cs.PAD
        negatives_x = target_x + 2 * width + cs.GAP + 2 * cs.PAD
        assert img.getpixel((cs.PAD + 5, y)) == colours["a"]
        assert img.getpixel((target_x + 5, y)) == colours["b"]
        assert img.getpixel((negatives_x + 5, y)) == colours["n1"]  # shown first (rank 0), so drawn first
        small = (96 - cs.GAP) // 2
        assert img.getpixel((negatives_x + 5, y + small + cs.GAP)) == colours["n2"]


# --- the real build ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_html_report_of_a_real_build(stage3_build, tmp_path):
    from fashionmv_builder.outputs.report import write_report
    from fashionmv_builder.outputs.report_html import write_html_report

    report = write_report(stage3_build, tmp_path)
    page_path = write_html_report(stage3_build, report, tmp_path, sheets=2, seed=0)
    assert page_path == tmp_path / "report.html"
    page = page_path.read_text(encoding="utf-8")

    assert not EXTERNAL.search(page) and "<link" not in page and "<script" not in page.lower()
    figures = _figures(page)
    expected = {"verifier_removal", "lmm_cost", "funnel", "views_per_product", "caption_words", "modification_words"}
    assert set(figures) == expected | {"views_involved", "modality_redundancy"}
    for name, bodies in figures.items():
        assert all("<svg" in b for b in bodies), f"{name} has no plot"

    build = Build(stage3_build.output_dir)
    for stage, numbers in report["datasets"]["deepfashion"]["funnel"].items():
        counts = build.counts(stage, "deepfashion")
        assert (numbers["in"], numbers["out"]) == (counts["products_in"], counts["products_out"])
        label = STAGE_LABELS.get(stage, stage)
        row = f'<tr><td>{label}</td><td class="n">{numbers["in"]}</td><td class="n">{numbers["out"]}</td></tr>'
        assert row in page, stage

    triplets = sum(report["datasets"]["deepfashion"]["triplets"].values())
    pngs = sorted((tmp_path / "contact_sheets").glob("*.png"))
    assert [p.name for p in pngs] == [f"deepfashion-{n:02d}.png" for n in range(1, math.ceil(min(8, triplets) / 4) + 1)]
    for png in pngs:
        with Image.open(png) as img:
            img.verify()
    assert page.count('src="data:image/jpeg;base64,') == len(pngs) > 0
