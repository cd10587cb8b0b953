"""Contact sheets: a seeded sample of triplets drawn as PNG images, to judge a build by eye.

One row per triplet: source views | short modification text | target views | hard negatives (first view of each,
half size). Thumbnails are small (96 px high by default) so the sheets stay small enough to embed in the HTML report.
Image bytes are read one ingest shard at a time, and only from shards that hold a sampled product.
"""

from __future__ import annotations

import io
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from fashionmv_builder.core.build import DEDUPE_VIEWS, HARD_NEGATIVES, TRIPLETS, Build
from fashionmv_builder.core.config import RunConfig

log = logging.getLogger(__name__)

THUMB_HEIGHT = 96
TEXT_WIDTH = 300
MAX_NEGATIVES = 10  # two rows of five at half height
GAP = 4
PAD = 8
HEADER = 38  # a title line, then the column names
BACKGROUND = (255, 255, 255)
PLACEHOLDER = (220, 220, 220)
INK = (30, 30, 30)
MUTED = (110, 110, 110)
RULE = (200, 200, 200)
TRIPLET_COLUMNS = ["triplet_id", "split", "source_id", "target_id", "modification_text_short", "views_involved"]


@dataclass
class SheetRow:
    """What one row shows: thumbnails already made, texts as the data has them."""

    triplet_id: str
    split: str
    text: str
    views_involved: list[str]
    source: list[Image.Image] = field(default_factory=list)
    target: list[Image.Image] = field(default_factory=list)
    negatives: list[Image.Image] = field(default_factory=list)


def sample_triplets(triplets: list[dict], n: int, seed: int, dataset: str) -> list[dict]:
    """A reproducible sample: the same build, seed and dataset always give the same triplets, in id order."""
    ordered = sorted(triplets, key=lambda t: t["triplet_id"])
    picked = random.Random(f"{seed}:{dataset}").sample(ordered, min(n, len(ordered)))
    return sorted(picked, key=lambda t: t["triplet_id"])


def thumbnail(data: bytes, height: int) -> Image.Image:
    """An RGB thumbnail `height` px high, or a grey placeholder when the bytes do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            width = max(1, round(img.width * height / max(1, img.height)))
            return img.resize((width, height), Image.Resampling.LANCZOS)
    except Exception as err:  # an image the ingest accepted should decode; a sheet is no place to fail a report
        log.warning("contact sheet: undecodable image (%s)", err)
        return Image.new("RGB", (round(height * 0.8), height), PLACEHOLDER)


def load_thumbnails(config: RunConfig, dataset: str, products: set[str], height: int) -> dict[str, list[Image.Image]]:
    """Thumbnails of the kept views of `products`, in view order, one shard at a time (a shard's image bytes are
    read only when it holds one of the products)."""
    build = Build(config.output_dir)
    found: dict[str, list[Image.Image]] = {}
    for marker in build.markers(DEDUPE_VIEWS, dataset):
        for pid, views in build.kept_views(dataset, [marker.shard], products=products).items():
            found[pid] = [thumbnail(v["bytes"], height) for v in views]
    return found


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType: the bitmap font, fixed size
        return ImageFont.load_default()


def _cut(word: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """A word wider than the column, in pieces that fit (LMM texts can hold anything)."""
    pieces = []
    while word:
        end = len(word)
        while end > 1 and font.getlength(word[:end]) > width:
            end -= 1
        pieces.append(word[:end])
        word = word[end:]
    return pieces


def wrap_text(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; when the text needs more than `max_lines`, the last ends with an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        for piece in _cut(word, font, width):
            if lines and font.getlength(f"{lines[-1]} {piece}") <= width:
                lines[-1] = f"{lines[-1]} {piece}"
            else:
                lines.append(piece)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + " …") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + " …"
    return lines


def _strip_width(images: list[Image.Image]) -> int:
    return sum(i.width for i in images) + GAP * max(0, len(images) - 1)


def _negatives_width(negatives: list[Image.Image]) -> int:
    top, bottom = negatives[0::2], negatives[1::2]
    return max(_strip_width(top), _strip_width(bottom)) if negatives else 0


def _paste_strip(sheet: Image.Image, images: list[Image.Image], x: int, y: int) -> None:
    for img in images:
        sheet.paste(img, (x, y))
        x += img.width + GAP


def draw_sheet(rows: list[SheetRow], height: int = THUMB_HEIGHT, title: str = "") -> Image.Image:
    """One PNG-ready image: a header line, then one row per triplet with aligned columns."""
    font, small = _font(12), _font(10)
    line = 14
    negatives = [r.negatives[:MAX_NEGATIVES] for r in rows]
    widths = [
        max([_strip_width(r.source) for r in rows] + [60]),
        TEXT_WIDTH,
        max([_strip_width(r.target) for r in rows] + [60]),
        max([_negatives_width(n) for n in negatives] + [90]),
    ]
    starts = [PAD]
    for w in widths[:-1]:
        starts.append(starts[-1] + w + 2 * PAD)
    row_height = height + 2 * PAD
    sheet = Image.new("RGB", (starts[-1] + widths[-1] + PAD, HEADER + len(rows) * row_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, 4), title, fill=MUTED, font=small)
    for x, name in zip(starts, ("source views", "modification (short)", "target views", "hard negatives"), strict=True):
        draw.text((x, 20), name, fill=INK, font=font)
    for i, (row, negs) in enumerate(zip(rows, negatives, strict=True)):
        y = HEADER + i * row_height
        draw.line([(0, y), (sheet.width, y)], fill=RULE)
        y += PAD
        _paste_strip(sheet, row.source or [Image.new("RGB", (60, height), PLACEHOLDER)], starts[0], y)
        _paste_strip(sheet, row.target or [Image.new("RGB", (60, height), PLACEHOLDER)], starts[2], y)
        half = (height - GAP) // 2
        _paste_strip(sheet, negs[0::2], starts[3], y)
        _paste_strip(sheet, negs[1::2], starts[3], y + half + GAP)
        if not negs:
            draw.text((starts[3], y), "none", fill=MUTED, font=small)
        draw.text((starts[1], y), f"{row.split} · views: {'+'.join(row.views_involved)}", fill=MUTED, font=small)
        wrapped = wrap_text(row.text, font, TEXT_WIDTH, max_lines=max(1, (height - line) // line))
        for j, text in enumerate(wrapped):
            draw.text((starts[1], y + line * (j + 1)), text, fill=INK, font=font)
    return sheet


def build_rows(config: RunConfig, dataset: str, sample: list[dict], height: int = THUMB_HEIGHT) -> list[SheetRow]:
    """Rows for sampled triplets: their products' views and their hard negatives (in the order they were shown)."""
    ids = {t["triplet_id"] for t in sample}
    negatives: dict[str, list[tuple[int, str]]] = {}
    table = Build(config.output_dir).read(HARD_NEGATIVES, dataset, columns=["triplet_id", "negative_id", "rank_shown"])
    if table.num_rows:
        table = table.filter(pc.is_in(table.column("triplet_id"), value_set=pa.array(sorted(ids), type=pa.string())))
        for r in table.to_pylist():
            negatives.setdefault(r["triplet_id"], []).append((r["rank_shown"], r["negative_id"]))
    shown = {t: [pid for _, pid in sorted(n)][:MAX_NEGATIVES] for t, n in negatives.items()}
    products = {p for t in sample for p in (t["source_id"], t["target_id"])} | {p for n in shown.values() for p in n}
    thumbs = load_thumbnails(config, dataset, products, height)
    half = (height - GAP) // 2
    small = {p: _resize(views[0], half) for p, views in thumbs.items() if views}
    missing = Image.new("RGB", (round(half * 0.8), half), PLACEHOLDER)
    return [
        SheetRow(
            triplet_id=t["triplet_id"],
            split=t["split"],
            text=t["modification_text_short"] or "",
            views_involved=list(t["views_involved"] or []),
            source=thumbs.get(t["source_id"], []),
            target=thumbs.get(t["target_id"], []),
            negatives=[small.get(p, missing) for p in shown.get(t["triplet_id"], [])],
        )
        for t in sample
    ]


def _resize(img: Image.Image, height: int) -> Image.Image:
    return img.resize((max(1, round(img.width * height / img.height)), height), Image.Resampling.LANCZOS)


@dataclass
class Sheet:
    """A written sheet and the triplets on it, in row order (the HTML lists their texts under the image)."""

    path: Path
    triplets: list[dict]


def write_contact_sheets(
    config: RunConfig, folder: Path, sheets: int = 2, per_sheet: int = 4, seed: int = 0, height: int = THUMB_HEIGHT
) -> dict[str, list[Sheet]]:
    """`<folder>/contact_sheets/<dataset>-NN.png` for every dataset with triplets; returns the sheets per dataset.
    Sheets of an earlier run are removed first, so the folder only ever shows this build's sample."""
    out = folder / "contact_sheets"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    build = Build(config.output_dir)
    written: dict[str, list[Sheet]] = {}
    for source in config.sources:
        dataset = source.dataset
        triplets = build.read(TRIPLETS, dataset, columns=TRIPLET_COLUMNS)
        sample = sample_triplets(triplets.to_pylist(), sheets * per_sheet, seed, dataset)
        if not sample:
            continue
        rows = build_rows(config, dataset, sample, height)
        total = math.ceil(len(rows) / per_sheet)
        written[dataset] = []
        for n, start in enumerate(range(0, len(rows), per_sheet), start=1):
            path = out / f"{dataset}-{n:02d}.png"
            title = f"{dataset} · sheet {n} of {total} · seed {seed}"
            draw_sheet(rows[start : start + per_sheet], height, title=title).save(path, optimize=True)
            written[dataset].append(Sheet(path, sample[start : start + per_sheet]))
    return written
