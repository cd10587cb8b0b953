"""The embedded sample catalogue: drawn multi-view garments with known attributes and planted faults.

`generate_sample` draws a small catalogue of garments (front, side, back, detail and sometimes a zoomed-out "full"
view), writes the same catalogue in the five source layouts the crawlers read (DeepFashion In-shop, Fashion200K,
FashionGen h5, a plain folder tree, a JSONL manifest of relative URLs) and writes `ground_truth.json`: every
product's attributes, role (base, sibling, near-miss, re-listed copy, fault host), ids per layout, the planted
faults with the reject reason each must produce, and the counts ingest must report per layout.

Conventions the drawing keeps, so captions and verifiers can be checked against the truth:
- the front view faces the camera, so a chest pocket on the WEARER's left is drawn on the IMAGE's right half;
- the back view never shows the pocket and always shows the back detail;
- the side view is the wearer's left profile (the wearer faces image-left), so only a left pocket shows there;
- the detail view is a 2× crop of the pocket, else of the back detail, else of the neckline / waist.

Everything is seeded from `(products, seed)`: a rerun writes the same bytes (fixed JPEG qualities, no timestamps,
h5 datasets created without time tracking).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image, ImageDraw

from fashionmv_builder.data_schema.reasons import RejectReason

LAYOUTS = ("deepfashion", "fashion200k", "fashiongen", "folder", "manifest")
FILE_LAYOUTS = ("deepfashion", "fashion200k", "folder", "manifest")  # layouts made of files (not h5 rows)
ATTRIBUTES = ("category", "colour", "pattern", "sleeve", "neckline", "pocket", "back_detail", "hem", "gender")
NA = "n/a"
MIN_PRODUCTS = 30  # below this the fixed set of planted faults and near-misses leaves too few base products

W, H = 256, 320  # canvas: width × height of every view
S = 2  # views are drawn at S× and downsampled (smooth edges); detail views are S× crops
JPEG_QUALITY = 90
RELISTED_QUALITY = 75
RELISTED_SCALE = 0.9
FULL_SCALE = 0.7  # the "full" view: the front zoomed out
FASHIONGEN_SIZE = 256
MANIFEST_LICENCE = "CC-BY-4.0"
BAD_FOLDER_ID = "bad id!"
TRAVERSAL_ID = "../../etc/passwd_like"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (240, 130, 30),
    "yellow": (240, 210, 50),
    "green": (40, 140, 60),
    "teal": (0, 128, 128),
    "navy": (30, 40, 110),
    "purple": (120, 60, 150),
    "pink": (235, 130, 170),
    "brown": (120, 75, 40),
    "black": (30, 30, 30),
}
PATTERNS = ("solid", "stripes", "dots", "check")
CLOTHING = ("tee", "shirt", "dress", "skirt", "trousers", "jacket")
NON_CLOTHING = ("bag", "shoe")
UPPER = ("tee", "shirt", "dress", "jacket")  # garments with sleeves, neckline and a chest

_UPPER_OPTIONS = {
    "sleeve": ("none", "short", "long"),
    "neckline": ("crew", "v", "collar", "none"),
    "pocket": ("none", "left", "right"),
    "back_detail": ("none", "zip", "cut-out", "straps", "print"),
    "hem": ("straight", "curved", "ruffle"),
}
_LOWER_OPTIONS = {
    "sleeve": (NA,),
    "neckline": (NA,),
    "pocket": (NA,),
    "back_detail": ("none", "zip", "print"),
}

DF_CATEGORY = {
    "tee": "Tees_Tanks",
    "shirt": "Shirts_Blouses",
    "dress": "Dresses",
    "skirt": "Skirts",
    "trousers": "Pants",
    "jacket": "Jackets_Coats",
    "bag": "Bags",
    "shoe": "Shoes",
}
F200K_CATEGORY = {
    "tee": ("tops", "tees"),
    "shirt": ("tops", "shirts"),
    "dress": ("dresses", "day_dresses"),
    "skirt": ("skirts", "midi_skirts"),
    "trousers": ("pants", "trousers"),
    "jacket": ("jackets", "jackets"),
    "bag": ("bags", "handbags"),
    "shoe": ("shoes", "sneakers"),
}
FG_CATEGORY = {
    "tee": "TOPS",
    "shirt": "SHIRTS",
    "dress": "DRESSES",
    "skirt": "SKIRTS",
    "trousers": "PANTS",
    "jacket": "JACKETS & COATS",
    "bag": "BAGS",
    "shoe": "SHOES",
}
DF_VIEW_NUMBER = {"front": 1, "side": 2, "back": 3, "full": 4, "detail": 7}
DF_VIEW_NAME = {"front": "front", "side": "side", "back": "back", "full": "full", "detail": "additional"}
VIEW_SETS = {
    2: ("front", "back"),
    3: ("front", "side", "back"),
    4: ("front", "side", "back", "detail"),
    5: ("front", "side", "back", "full", "detail"),
}
_VIEW_CODE = {"front": 1, "side": 2, "back": 3, "full": 4, "detail": 5, "detail_back": 6, "detail_hem": 7}

# Planted file-level faults: (bad bytes kind, ingest reason). They occupy the "full" slot of a 5-file product.
_FILE_FAULTS = {
    "corrupt_jpeg": RejectReason.CORRUPT_IMAGE,
    "zero_byte": RejectReason.EMPTY_FILE,
    "non_image": RejectReason.NOT_AN_IMAGE,
    "decompression_bomb": RejectReason.DECOMPRESSION_BOMB,
}

Point = tuple[float, float]
RGB = tuple[int, int, int]


# ----------------------------------------------------------------------------------------------------------
# planning: who is what


@dataclass
class _Slot:
    label: str  # the view name files are labelled with (front/side/back/full/detail)
    render: str  # what is drawn: front/side/back/full/detail/detail_back/detail_hem
    fault: str | None = None  # a file-level fault or "duplicate_view" (bytes of slot 0)


@dataclass
class _Product:
    role: str
    attrs: dict[str, str]
    slots: list[_Slot]
    bg_seed: int
    base: _Product | None = None  # for siblings, near-misses and re-listed copies
    differs_in: list[str] = field(default_factory=list)
    planted: str | None = None  # the product-level fault this product hosts
    index: int = -1
    ids: dict[str, str | None] = field(default_factory=dict)
    split: str | None = None
    files: dict[str, list[str]] = field(default_factory=dict)  # per layout, in slot order (bad slots included)

    @property
    def in_layouts(self) -> tuple[str, ...]:
        return tuple(k for k in LAYOUTS if self.ids.get(k) is not None)

    @property
    def colour_sibling(self) -> bool:
        return self.role == "sibling" and self.differs_in == ["colour"]


def _options(category: str) -> dict[str, tuple[str, ...]]:
    """The values each attribute can take for a category (n/a where it does not apply)."""
    opts: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "pattern": PATTERNS}
    if category in UPPER:
        opts.update(_UPPER_OPTIONS)
    elif category in ("skirt", "trousers"):
        opts.update(_LOWER_OPTIONS)
        opts["hem"] = _UPPER_OPTIONS["hem"] if category == "skirt" else (NA,)
    else:
        opts.update({k: (NA,) for k in _UPPER_OPTIONS})
    return opts


def _visual_key(attrs: dict[str, str]) -> tuple[str, ...]:
    # gender is not drawn: two products equal on everything else would render as duplicates
    return tuple(attrs[a] for a in ATTRIBUTES if a != "gender")


def _distance(a: dict[str, str], b: dict[str, str]) -> int:
    return sum(x != y for x, y in zip(_visual_key(a), _visual_key(b), strict=True))


def _luminance(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


class _Planner:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.used: set[tuple[str, ...]] = set()
        self.products: list[_Product] = []

    def pick(self, seq: Any) -> Any:
        return seq[int(self.rng.integers(len(seq)))]

    def random_attrs(self, category: str) -> dict[str, str]:
        attrs = {"category": category}
        for name, values in _options(category).items():
            if name == "pocket" and len(values) > 1:
                # half the upper garments get a pocket, so left/right claims have material
                attrs[name] = str(self.rng.choice(values, p=[0.5, 0.25, 0.25]))
            else:
                attrs[name] = self.pick(values)
        gender = "women" if category in ("dress", "skirt") else self.pick(("men", "women"))
        attrs["gender"] = gender
        return {a: attrs[a] for a in ATTRIBUTES}

    def view_slots(self) -> list[_Slot]:
        n = int(self.rng.choice([2, 3, 4, 5], p=[0.07, 0.10, 0.70, 0.13]))
        return [_Slot(v, v) for v in VIEW_SETS[n]]

    def add(self, product: _Product) -> _Product:
        self.used.add(_visual_key(product.attrs))
        self.products.append(product)
        return product

    def new_bg_seed(self) -> int:
        return int(self.rng.integers(2**31))

    def unique_attrs(self, category: str, min_distance: int, against: list[_Product]) -> dict[str, str]:
        """Random attributes not drawn before, and (when possible) at least `min_distance` from `against`."""
        fallback: dict[str, str] | None = None
        for _ in range(400):
            attrs = self.random_attrs(category)
            if _visual_key(attrs) in self.used:
                continue
            fallback = fallback or attrs
            if all(_distance(attrs, p.attrs) >= min_distance for p in against):
                return attrs
        if fallback is None:
            raise RuntimeError(f"cannot draw a new {category} that differs from all earlier products")
        return fallback

    def variant(self, base: dict[str, str], changes: dict[str, str]) -> dict[str, str] | None:
        attrs = {**base, **changes}
        return None if _visual_key(attrs) in self.used else attrs


def _plan(products: int, rng: np.random.Generator) -> list[_Product]:
    planner = _Planner(rng)
    n_fault = 8  # duplicate view, 1 view, 7 views, corrupt, empty, non-image, bomb, invalid id
    n_near = 9  # three each of: colour only, mirrored pocket, other back detail
    n_relisted = 1
    fixed = n_fault + n_near + n_relisted
    n_sibling = min(round(0.4 * products), products - fixed - math.ceil(0.2 * products))
    n_base = products - fixed - n_sibling
    n_non_clothing = max(1, round(0.05 * products))

    # Bases: clothing categories in rotation (every category shows up), bags and shoes for ~5%.
    bases: list[_Product] = []
    for i in range(n_base):
        category = NON_CLOTHING[i % 2] if i < n_non_clothing else CLOTHING[(i - n_non_clothing) % len(CLOTHING)]
        attrs = planner.unique_attrs(category, 2, bases)
        bases.append(planner.add(_Product("base", attrs, planner.view_slots(), planner.new_bg_seed())))
    clothing_bases = [b for b in bases if b.attrs["category"] in CLOTHING]
    rich_bases = [b for b in clothing_bases if len(b.slots) >= 4] or clothing_bases

    _plan_near_misses(planner, clothing_bases)
    _plan_siblings(planner, clothing_bases, n_sibling)

    relisted_base = planner.pick(rich_bases)
    planner.products.append(
        _Product(
            "relisted",
            dict(relisted_base.attrs),
            [_Slot(s.label, s.render) for s in relisted_base.slots],
            relisted_base.bg_seed,
            base=relisted_base,
            planted="relisted",
        )
    )
    _plan_fault_hosts(planner)
    return planner.products


def _plan_near_misses(planner: _Planner, clothing_bases: list[_Product]) -> None:
    """Distinct products one visible attribute away from a base: dedupe must keep both."""
    # small catalogues may draw too few pockets to mirror: give some upper-garment bases one
    with_pocket = [b for b in clothing_bases if b.attrs["pocket"] in ("left", "right")]
    for base in clothing_bases:
        if len(with_pocket) >= 3:
            break
        if base.attrs["pocket"] == "none":
            attrs = planner.variant(base.attrs, {"pocket": planner.pick(("left", "right"))})
            if attrs is not None:
                planner.used.discard(_visual_key(base.attrs))
                planner.used.add(_visual_key(attrs))
                base.attrs = attrs
                with_pocket.append(base)
    for kind in ("colour", "pocket", "back_detail"):
        made = 0
        order = [clothing_bases[int(i)] for i in planner.rng.permutation(len(clothing_bases))]
        # Prefer bases with a detail view (a 2× crop shows the change large) and, for a back-detail change,
        # no pocket, so the crop is of the back: then at least one view differs a lot, not only by a few pixels.
        order.sort(key=lambda b: not _near_miss_shows_well(kind, b))
        for base in order:
            if made == 3:
                break
            changes = _near_miss_changes(kind, base.attrs)
            # shuffled, so the three near-misses of a kind do not all get the same new value
            for change in [changes[int(i)] for i in planner.rng.permutation(len(changes))]:
                attrs = planner.variant(base.attrs, change)
                if attrs is not None:
                    slots = [_Slot(s.label, s.render) for s in base.slots]
                    # same background seed as the base: the attribute is the only difference
                    planner.add(_Product("near_miss", attrs, slots, base.bg_seed, base=base, differs_in=[kind]))
                    made += 1
                    break
        if made < 3:
            raise RuntimeError(f"could not plant three {kind} near-misses; use more products")


def _near_miss_shows_well(kind: str, base: _Product) -> bool:
    has_detail = any(s.render == "detail" for s in base.slots)
    return has_detail and (kind != "back_detail" or base.attrs["pocket"] in ("none", NA))


def _near_miss_changes(kind: str, attrs: dict[str, str]) -> list[dict[str, str]]:
    if kind == "colour":
        # the colours furthest in luminance first, so even a grey-scale hash sees the change
        here = _luminance(COLOURS[attrs["colour"]])
        others = sorted((c for c in COLOURS if c != attrs["colour"]), key=lambda c: -abs(_luminance(COLOURS[c]) - here))
        return [{"colour": c} for c in others[:3]]
    if kind == "pocket":
        mirror = {"left": "right", "right": "left"}
        return [{"pocket": mirror[attrs["pocket"]]}] if attrs["pocket"] in mirror else []
    options = [v for v in _options(attrs["category"])["back_detail"] if v not in (attrs["back_detail"], "none")]
    return [{"back_detail": v} for v in options]


def _plan_siblings(planner: _Planner, clothing_bases: list[_Product], n_sibling: int) -> None:
    """Copies of a base that differ in 1 or 2 attributes: material for triplet mining."""
    made = 0
    tries = 0
    while made < n_sibling:
        tries += 1
        if tries > 50 * n_sibling + 100:
            raise RuntimeError("could not draw enough distinct siblings; use more products")
        base = planner.pick(clothing_bases)
        options = _options(base.attrs["category"])
        mutable = [a for a in ATTRIBUTES if a not in ("category", "gender") and len(options[a]) > 1]
        # a quarter are colour variants: DeepFashion stores those as NN prefixes of one item
        if planner.rng.random() < 0.25:
            names = ["colour"]
        else:
            k = 1 if planner.rng.random() < 0.6 else 2
            names = sorted(str(a) for a in planner.rng.choice(mutable, size=k, replace=False))
        changes = {a: planner.pick([v for v in options[a] if v != base.attrs[a]]) for a in names}
        if "colour" in names:
            # a clearly lighter or darker colour, so grey-scale hashes of the two products differ as well
            here = _luminance(COLOURS[base.attrs["colour"]])
            changes["colour"] = planner.pick([c for c in COLOURS if abs(_luminance(COLOURS[c]) - here) >= 40])
        attrs = planner.variant(base.attrs, changes)
        if attrs is None:
            continue
        names = [a for a in ATTRIBUTES if a in names]
        planner.add(
            _Product("sibling", attrs, planner.view_slots(), planner.new_bg_seed(), base=base, differs_in=names)
        )
        made += 1


def _plan_fault_hosts(planner: _Planner) -> None:
    clothing = list(CLOTHING)

    def host(planted: str, slots: list[_Slot], category: str | None = None) -> _Product:
        attrs = planner.unique_attrs(category or planner.pick(clothing), 1, [])
        return planner.add(_Product("fault", attrs, slots, planner.new_bg_seed(), planted=planted))

    four = ("front", "side", "back")
    host(
        "duplicate_view",
        [*(_Slot(v, v) for v in four), _Slot("full", "front", "duplicate_view"), _Slot("detail", "detail")],
    )
    host("one_view", [_Slot("front", "front")])

    # 7 views: three distinct detail crops, on a striped garment with pocket, print and ruffle so they differ
    seven = planner.unique_attrs("tee", 1, [])
    for attempt in range(len(COLOURS)):
        seven.update(pattern="stripes", pocket="left", back_detail="print", hem="ruffle", sleeve="short")
        seven["colour"] = list(COLOURS)[attempt]
        if _visual_key(seven) not in planner.used:
            break
    else:
        raise RuntimeError("could not draw a new garment for the 7-view product")
    slots7 = [_Slot(v, v) for v in ("front", "side", "back", "full")]
    slots7 += [_Slot("detail", "detail"), _Slot("detail", "detail_back"), _Slot("detail", "detail_hem")]
    planner.add(_Product("fault", seven, slots7, planner.new_bg_seed(), planted="seven_views"))

    for fault in _FILE_FAULTS:
        slots = [*(_Slot(v, v) for v in four), _Slot("full", "full", fault), _Slot("detail", "detail")]
        host(fault, slots, "tee" if fault == "decompression_bomb" else None)
    host("invalid_product_id", [_Slot("front", "front"), _Slot("back", "back")])


# ----------------------------------------------------------------------------------------------------------
# drawing


def _sc(points: list[Point]) -> list[Point]:
    return [(x * S, y * S) for x, y in points]


def _sb(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    return (box[0] * S, box[1] * S, box[2] * S, box[3] * S)


def _mirror(points: list[Point]) -> list[Point]:
    return [(W - x, y) for x, y in points]


def _shade(c: RGB) -> RGB:
    """A second tone of the garment colour (patterns, pockets): darker on light colours, lighter on dark ones."""
    if _luminance(c) > 110:
        return (int(c[0] * 0.6), int(c[1] * 0.6), int(c[2] * 0.6))
    return (int(c[0] + (255 - c[0]) * 0.45), int(c[1] + (255 - c[1]) * 0.45), int(c[2] + (255 - c[2]) * 0.45))


def _outline(c: RGB) -> RGB:
    return (110, 110, 110) if _luminance(c) < 50 else (int(c[0] * 0.35), int(c[1] * 0.35), int(c[2] * 0.35))


def _contrast(c: RGB) -> RGB:
    return (245, 245, 240) if _luminance(c) < 140 else (25, 25, 30)


_HEM_Y = {"tee": 236, "shirt": 240, "jacket": 250, "dress": 286, "skirt": 250}


def _hem(x_from: float, x_to: float, y: float, style: str) -> list[Point]:
    """The hem line from x_from to x_to (polygon order); curved = shirt tail, ruffle = scallops."""
    if style not in ("curved", "ruffle"):
        return [(x_from, y), (x_to, y)]
    waves = max(3, round(abs(x_to - x_from) / 18))
    n = waves * 8
    points = []
    for i in range(n + 1):
        t = i / n
        dy = 22 * math.sin(math.pi * t) if style == "curved" else 9 * abs(math.sin(math.pi * t * waves))
        points.append((x_from + (x_to - x_from) * t, y + dy))
    return points


def _body(attrs: dict[str, str], view: str) -> tuple[list[list[Point]], list[list[Point]]]:
    """Polygons of the garment body and of the sleeves drawn over it (side view), in 1× coordinates."""
    cat = attrs["category"]
    hem = attrs["hem"]
    if cat in UPPER:
        hem_y = _HEM_Y[cat]
        if view == "side":
            if cat == "dress":
                torso = [(118, 54), (140, 50), (150, 70), (150, 170), *_hem(170, 86, hem_y, hem), (106, 170)]
            else:
                torso = [(118, 54), (140, 50), (150, 70), *_hem(154, 102, hem_y, hem)]
            torso += [(100, 130), (104, 86), (110, 62)]
            sleeve = {
                "short": [(120, 64), (142, 64), (146, 126), (118, 126)],
                "long": [(120, 64), (142, 64), (140, 224), (120, 224)],
            }.get(attrs["sleeve"])
            return [torso], [sleeve] if sleeve else []
        shoulder = 90 if attrs["sleeve"] == "none" else 76  # sleeveless: the shoulders are cut in
        torso = [(108, 56), (148, 56), (W - shoulder, 70), (174, 118)]
        if cat == "dress":
            torso += [(164, 170), *_hem(200, 56, hem_y, hem), (92, 170)]
        elif cat == "jacket":
            torso += _hem(178, 78, hem_y, hem)
        else:
            torso += _hem(172, 84, hem_y, hem)
        torso += [(82, 118), (shoulder, 70)]
        polys = [torso]
        sleeve = {
            "short": [(78, 70), (50, 122), (72, 132), (86, 106)],
            "long": [(78, 70), (48, 220), (70, 224), (88, 112)],
        }.get(attrs["sleeve"])
        if sleeve:
            polys += [sleeve, _mirror(sleeve)]
        return polys, []
    if cat == "skirt":
        if view == "side":
            return [[(112, 110), (146, 110), *_hem(162, 98, 250, hem)]], []
        return [[(96, 110), (160, 110), *_hem(190, 66, 250, hem)]], []
    if cat == "trousers":
        if view == "side":
            return [[(108, 56), (150, 56), (154, 300), (112, 300)]], []
        return [[(88, 56), (168, 56), (178, 300), (134, 300), (128, 140), (122, 300), (78, 300)]], []
    if cat == "bag":
        if view == "side":
            return [[(108, 140), (148, 140), (152, 270), (104, 270)]], []
        return [[(64, 140), (192, 140), (200, 270), (56, 270)]], []
    # shoe: toe-on from the front, heel from the back, the profile from the side
    if view == "side":
        return [[(48, 270), (58, 226), (104, 212), (140, 176), (184, 172), (206, 214), (214, 270)]], []
    return [[(92, 200), (164, 200), (170, 280), (86, 280)]], []


def _pattern_fill(colour: RGB, pattern: str) -> Image.Image:
    fill = Image.new("RGB", (W * S, H * S), colour)
    draw = ImageDraw.Draw(fill)
    alt = _shade(colour)
    if pattern == "stripes":
        for y in range(0, H * S, 28):
            draw.rectangle((0, y, W * S, y + 11), fill=alt)
    elif pattern == "dots":
        for row, y in enumerate(range(10, H * S, 30)):
            for x in range(10 + 15 * (row % 2), W * S, 30):
                draw.ellipse((x - 7, y - 7, x + 7, y + 7), fill=alt)
    elif pattern == "check":
        for v in range(0, W * S, 40):
            draw.rectangle((v, 0, v + 13, H * S), fill=alt)
        for h in range(0, H * S, 40):
            draw.rectangle((0, h, W * S, h + 13), fill=alt)
    return fill


def _paste(canvas: Image.Image, polys: list[list[Point]], fill: Image.Image, line: RGB) -> None:
    if not polys:
        return
    mask = Image.new("L", canvas.size, 0)
    mdraw = ImageDraw.Draw(mask)
    for poly in polys:
        mdraw.polygon(_sc(poly), fill=255)
    canvas.paste(fill, (0, 0), mask)
    draw = ImageDraw.Draw(canvas)
    for poly in polys:
        draw.polygon(_sc(poly), outline=line, width=3)


def _pocket_centre(pocket: str) -> Point:
    # the wearer's left is the image's right when the garment faces the camera
    return (153, 118) if pocket == "left" else (103, 118)


def _draw(attrs: dict[str, str], view: str, bg: RGB) -> Image.Image:
    """One view of a product at S× resolution on a flat background."""
    canvas = Image.new("RGB", (W * S, H * S), bg)
    colour = COLOURS[attrs["colour"]]
    line = _outline(colour)
    fill = _pattern_fill(colour, attrs["pattern"])
    body, over = _body(attrs, view)
    _paste(canvas, body, fill, line)
    if over:
        darker = Image.eval(fill, lambda v: int(v * 0.85))  # sleeves a touch darker so they stand out in profile
        _paste(canvas, over, darker, line)
    draw = ImageDraw.Draw(canvas)
    cat = attrs["category"]
    if cat in UPPER:
        _draw_upper(draw, attrs, view, bg, colour, line)
    elif cat in ("skirt", "trousers"):
        _draw_lower(draw, attrs, view, colour, line)
    else:
        _draw_accessory(draw, attrs, view, colour, line)
    if attrs["hem"] == "ruffle":
        _draw_ruffle(draw, attrs, view, colour, line)
    return canvas


def _draw_upper(draw: ImageDraw.ImageDraw, attrs: dict[str, str], view: str, bg: RGB, colour: RGB, line: RGB) -> None:
    neck = attrs["neckline"]
    light = (240, 238, 230) if _luminance(colour) < 200 else (120, 120, 120)
    if view == "front":
        if neck == "crew":
            draw.ellipse(_sb((108, 40, 148, 72)), fill=bg)
            draw.arc(_sb((108, 40, 148, 72)), 0, 180, fill=line, width=3)
        elif neck == "v":
            draw.polygon(_sc([(106, 55), (150, 55), (128, 108)]), fill=bg)
            draw.line(_sc([(106, 56), (128, 108), (150, 56)]), fill=line, width=3)
        elif neck == "collar":
            draw.ellipse(_sb((114, 46, 142, 66)), fill=bg)
            for flap in ([(106, 56), (127, 70), (112, 92)], _mirror([(106, 56), (127, 70), (112, 92)])):
                draw.polygon(_sc(flap), fill=light, outline=line, width=3)
        if attrs["category"] == "shirt":
            draw.line(_sc([(128, 74), (128, _HEM_Y["shirt"])]), fill=line, width=3)
            for y in range(96, _HEM_Y["shirt"] - 10, 34):
                draw.ellipse(_sb((124, y - 4, 132, y + 4)), fill=light, outline=line)
        elif attrs["category"] == "jacket":
            draw.line(_sc([(128, 74), (128, _HEM_Y["jacket"])]), fill=line, width=5)
        elif attrs["category"] == "dress":
            draw.line(_sc([(92, 170), (164, 170)]), fill=line, width=3)
        if attrs["pocket"] in ("left", "right"):
            cx, cy = _pocket_centre(attrs["pocket"])
            box = (cx - 19, cy - 20, cx + 19, cy + 20)
            draw.rectangle(_sb(box), fill=_shade(colour), outline=line, width=4)
            draw.line(_sc([(box[0], cy - 11), (box[2], cy - 11)]), fill=line, width=3)
    elif view == "back":
        if neck in ("crew", "v", "collar"):
            draw.ellipse(_sb((108, 48, 148, 64)), fill=bg)
            draw.arc(_sb((108, 48, 148, 64)), 0, 180, fill=line, width=3)
        if neck == "collar":
            draw.polygon(_sc([(104, 54), (152, 54), (146, 68), (110, 68)]), fill=light, outline=line, width=3)
        _draw_back_detail(draw, attrs, bg, colour, line)
    elif view == "side":
        if neck == "crew":
            draw.ellipse(_sb((102, 44, 122, 66)), fill=bg)
        elif neck == "v":
            draw.polygon(_sc([(98, 48), (124, 48), (103, 100)]), fill=bg)
            draw.line(_sc([(124, 50), (103, 100)]), fill=line, width=3)
        elif neck == "collar":
            draw.polygon(_sc([(108, 54), (134, 50), (114, 88)]), fill=light, outline=line, width=3)
        if attrs["pocket"] == "left":  # the side view is the wearer's left profile
            draw.rectangle(_sb((100, 98, 118, 138)), fill=_shade(colour), outline=line, width=4)


def _back_box(attrs: dict[str, str]) -> tuple[float, float, float, float]:
    """Where the back detail sits (1× box). Each kind covers a different part of the back so that the kinds
    differ in coarse structure too, not only in fine lines: near-miss products must not hash alike."""
    cat, detail = attrs["category"], attrs["back_detail"]
    if cat == "skirt":
        return {"zip": (121, 112, 135, 200), "print": (100, 150, 156, 220)}.get(detail, (100, 130, 156, 200))
    if cat == "trousers":
        return {"zip": (121, 58, 135, 136), "print": (92, 74, 164, 132)}.get(detail, (92, 70, 164, 130))
    bottom = _HEM_Y[cat] - 12 if cat != "dress" else 240
    return {
        "zip": (121, 60, 135, bottom),
        "cut-out": (100, 58, 156, 170),  # an open back from the neckline down
        "straps": (96, 64, 160, 200),
        "print": (92, 132, 164, 204),  # a block print on the lower back
    }.get(detail, (96, 70, 160, 170))


def _back_centre(attrs: dict[str, str]) -> Point:
    x0, y0, x1, y1 = _back_box(attrs)
    return ((x0 + x1) / 2, (y0 + y1) / 2)


def _draw_back_detail(draw: ImageDraw.ImageDraw, attrs: dict[str, str], bg: RGB, colour: RGB, line: RGB) -> None:
    detail = attrs["back_detail"]
    x0, y0, x1, y1 = _back_box(attrs)
    cx, cy = _back_centre(attrs)
    ink = _contrast(colour)
    if detail == "zip":
        # a full-length zip tape in a contrasting colour, with teeth and a pull
        draw.rectangle(_sb((x0, y0, x1, y1)), fill=ink, outline=line, width=2)
        draw.rectangle(_sb((cx - 2, y0, cx + 2, y1)), fill=(110, 110, 118))
        for y in range(int(y0) + 4, int(y1), 6):
            draw.line(_sc([(cx - 4, y), (cx + 4, y)]), fill=(150, 150, 158), width=3)
        draw.rectangle(_sb((cx - 5, y0, cx + 5, y0 + 16)), fill=(60, 60, 66))
    elif detail == "cut-out":
        mid = (y0 + y1) / 2
        draw.ellipse(_sb((x0, y0, x1, y1)), fill=bg, outline=line, width=3)
        draw.rectangle(_sb((x0, y0 - 2, x1, mid)), fill=bg)
        draw.line(_sc([(x0, y0), (x0, mid)]), fill=line, width=3)
        draw.line(_sc([(x1, y0), (x1, mid)]), fill=line, width=3)
    elif detail == "straps":
        draw.ellipse(_sb((x0 + 8, y0, x1 - 8, y0 + 56)), fill=bg, outline=line, width=3)
        draw.line(_sc([(x0, y0), (x1, y1)]), fill=ink, width=28)
        draw.line(_sc([(x1, y0), (x0, y1)]), fill=ink, width=28)
    elif detail == "print":
        draw.rectangle(_sb((x0, y0, x1, y1)), fill=ink, outline=line, width=3)
        r = min(x1 - x0, y1 - y0) / 2 - 4
        star = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            star.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(_sc(star), fill=colour)


def _draw_lower(draw: ImageDraw.ImageDraw, attrs: dict[str, str], view: str, colour: RGB, line: RGB) -> None:
    band = _shade(colour)
    if attrs["category"] == "skirt":
        box = (112, 110, 146, 122) if view == "side" else (96, 110, 160, 122)
    else:
        box = (108, 56, 150, 70) if view == "side" else (88, 56, 168, 70)
        if view == "front":
            draw.line(_sc([(128, 70), (128, 132)]), fill=line, width=3)
        elif view == "side":
            draw.line(_sc([(124, 72), (126, 296)]), fill=line, width=2)
    draw.rectangle(_sb(box), fill=band, outline=line, width=3)
    if view == "back":
        _draw_back_detail(draw, attrs, (0, 0, 0), colour, line)


def _draw_accessory(draw: ImageDraw.ImageDraw, attrs: dict[str, str], view: str, colour: RGB, line: RGB) -> None:
    if attrs["category"] == "bag":
        handle = (112, 70, 144, 190) if view == "side" else (84, 70, 172, 190)
        draw.arc(_sb(handle), 180, 360, fill=line, width=16)
        if view == "front":
            flap = [(64, 140), (192, 140), (188, 190), (128, 206), (68, 190)]
            draw.polygon(_sc(flap), fill=_shade(colour), outline=line, width=3)
            draw.rectangle(_sb((120, 196, 136, 214)), fill=(200, 170, 60), outline=line, width=2)
        elif view == "back":
            draw.rectangle(_sb((104, 220, 152, 240)), fill=_contrast(colour), outline=line, width=2)
        return
    sole = (240, 240, 236) if _luminance(colour) < 200 else (60, 60, 60)
    if view == "side":
        draw.rectangle(_sb((40, 268, 220, 288)), fill=sole, outline=line, width=3)
        for i in range(4):
            x = 116 + i * 12
            draw.line(_sc([(x, 204 - i * 8), (x + 16, 214 - i * 8)]), fill=_contrast(colour), width=5)
    else:
        draw.rectangle(_sb((84, 278, 172, 292)), fill=sole, outline=line, width=3)
        if view == "front":
            draw.ellipse(_sb((108, 206, 148, 236)), fill=_shade(colour), outline=line, width=3)
        else:
            draw.rectangle(_sb((118, 200, 138, 240)), fill=_shade(colour), outline=line, width=3)


def _draw_ruffle(draw: ImageDraw.ImageDraw, attrs: dict[str, str], view: str, colour: RGB, line: RGB) -> None:
    """A contrasting band along the scalloped hem."""
    cat = attrs["category"]
    if cat == "skirt":
        x_from, x_to, y = (162, 98, 250) if view == "side" else (190, 66, 250)
    elif view == "side":
        x_from, x_to, y = (170, 86, _HEM_Y[cat]) if cat == "dress" else (154, 102, _HEM_Y[cat])
    else:
        x_from, x_to = {"dress": (200, 56), "jacket": (178, 78)}.get(cat, (172, 84))
        y = _HEM_Y[cat]
    scallops = _hem(x_from, x_to, y, "ruffle")
    top = [
        (x_to + 2 * (1 if x_to < x_from else -1), y - 14),
        (x_from - 2 * (1 if x_to < x_from else -1), y - 14),
    ]
    draw.polygon(_sc([*scallops, *top]), fill=_shade(colour), outline=line, width=3)


def detail_region(attrs: dict[str, str], render: str) -> str:
    """What a detail view crops: the pocket, the back detail, the hem, the neckline, or (garments without any of
    them) a plain part of the body. The ground-truth answering server describes detail views by it."""
    if render == "detail_back":
        return "back_detail"
    if render == "detail_hem":
        return "hem"
    if attrs["pocket"] in ("left", "right"):
        return "pocket"
    if attrs["back_detail"] not in ("none", NA):
        return "back_detail"
    return "neckline" if attrs["category"] in UPPER else "body"


def _detail_source(attrs: dict[str, str], render: str) -> tuple[str, Point]:
    """Which S× drawing a detail view crops, and around which point (1× coordinates)."""
    cat = attrs["category"]
    region = detail_region(attrs, render)
    if region == "back_detail":
        return "back", _back_centre(attrs)
    if region == "hem":
        return "front", (128, _HEM_Y.get(cat, 250))
    if region == "pocket":
        return "front", _pocket_centre(attrs["pocket"])
    if region == "neckline":
        return "front", (128, 84)
    if cat == "skirt":
        return "front", (128, 250)
    if cat == "trousers":
        return "front", (128, 90)
    if cat == "bag":
        return "front", (128, 200)
    return "side", (150, 200)


def _background(bg_seed: int) -> RGB:
    tint = np.random.default_rng([bg_seed, 7]).integers(-7, 8, size=3)
    return (int(244 + tint[0]), int(241 + tint[1]), int(236 + tint[2]))


def _add_noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    # smooth low-amplitude blotches: images differ a little without costing JPEG bytes
    coarse = rng.normal(0.0, 3.0, size=(H // 8, W // 8)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((W, H), Image.Resampling.BILINEAR))
    pixels = np.asarray(img, dtype=np.float32) + smooth[..., None]
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def _render(attrs: dict[str, str], slots: list[_Slot], bg_seed: int, seed: int) -> list[Image.Image | None]:
    """The 1× image of every slot (None for the slots whose bytes are planted faults other than a corrupt JPEG)."""
    bg = _background(bg_seed)
    # Per-product framing (a little smaller, a little off centre), from the background seed so a near-miss is
    # framed exactly like its base. Without it, distinct garments of one category would share a silhouette
    # and sit closer in perceptual-hash space than they look.
    frame = np.random.default_rng([bg_seed, 11])
    k = float(frame.uniform(0.78, 1.0))
    tx, ty = float(frame.uniform(-24, 24)) * S, float(frame.uniform(-12, 6)) * S
    c0x, c0y = W * S / 2, H * S / 2
    cache: dict[str, Image.Image] = {}

    def big(view: str) -> Image.Image:
        if view not in cache:
            # PIL's affine maps output to input pixels: the inverse of "scale about the centre, then shift"
            inverse = (1 / k, 0.0, c0x - (c0x + tx) / k, 0.0, 1 / k, c0y - (c0y + ty) / k)
            drawn = _draw(attrs, view, bg)
            cache[view] = drawn.transform(
                drawn.size, Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR, fillcolor=bg
            )
        return cache[view]

    out: list[Image.Image | None] = []
    for slot in slots:
        if slot.fault in ("zero_byte", "non_image", "decompression_bomb", "duplicate_view"):
            out.append(None)
            continue
        if slot.render in ("front", "back", "side"):
            img = big(slot.render).resize((W, H), Image.Resampling.BOX)
        elif slot.render == "full":
            small = big("front").resize((round(W * FULL_SCALE), round(H * FULL_SCALE)), Image.Resampling.BOX)
            img = Image.new("RGB", (W, H), bg)
            img.paste(small, ((W - small.width) // 2, (H - small.height) // 2))
        else:
            view, (cx, cy) = _detail_source(attrs, slot.render)
            px, py = k * (cx * S - c0x) + c0x + tx, k * (cy * S - c0y) + c0y + ty  # the point, framed
            left = min(max(px - W / 2, 0), W * S - W)
            top = min(max(py - H / 2, 0), H * S - H)
            img = big(view).crop((round(left), round(top), round(left) + W, round(top) + H))
        rng = np.random.default_rng([seed, bg_seed, _VIEW_CODE[slot.render]])
        out.append(_add_noise(img, rng))
    return out


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares a huge image: a guard must refuse it before decoding pixels."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * (1 + 3 * width) * 2, 9)  # two black scanlines; the rest is missing
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


_NON_IMAGE = b"This is a text file, not an image, saved with an image suffix by the sample generator.\n"


@dataclass
class _Views:
    """What one product's slots hold: bytes for the file layouts, pixel arrays for FashionGen (None = left out)."""

    files: list[bytes]
    arrays: list[np.ndarray | None]


def _to_fashiongen(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((FASHIONGEN_SIZE, FASHIONGEN_SIZE), Image.Resampling.BILINEAR))


def _product_views(p: _Product, seed: int) -> _Views:
    if p.role == "relisted":
        assert p.base is not None
        # decode the original's JPEGs, shrink them, re-encode at another quality: a re-listed product
        original = _product_views(p.base, seed)
        files, arrays = [], []
        for data in original.files:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            small = img.resize((round(W * RELISTED_SCALE), round(H * RELISTED_SCALE)), Image.Resampling.LANCZOS)
            files.append(_jpeg(small, RELISTED_QUALITY))
            arrays.append(_to_fashiongen(Image.open(io.BytesIO(files[-1]))))
        return _Views(files, arrays)
    images = _render(p.attrs, p.slots, p.bg_seed, seed)
    files = []
    arrays: list[np.ndarray | None] = []
    for slot, img in zip(p.slots, images, strict=True):
        if slot.fault == "duplicate_view":
            files.append(files[0])
            arrays.append(arrays[0])
        elif slot.fault == "zero_byte":
            files.append(b"")
            arrays.append(None)
        elif slot.fault == "non_image":
            files.append(_NON_IMAGE)
            arrays.append(None)
        elif slot.fault == "decompression_bomb":
            files.append(_bomb_png())
            arrays.append(None)
        else:
            assert img is not None
            data = _jpeg(img, JPEG_QUALITY)
            if slot.fault == "corrupt_jpeg":
                files.append(data[: int(len(data) * 0.6)])
                arrays.append(None)
            else:
                files.append(data)
                arrays.append(_to_fashiongen(img))
    return _Views(files, arrays)


# ----------------------------------------------------------------------------------------------------------
# ids, file names, splits


def _assign_ids(products: list[_Product], rng: np.random.Generator) -> None:
    by_index = sorted(products, key=lambda p: p.index)
    f200k = _unique_numbers(rng, len(products), 90_000_000, 99_999_999)
    fashiongen = _unique_numbers(rng, len(products), 100_000, 999_999)
    item = int(rng.integers(1000, 5000))
    nn_used: dict[int, int] = {}  # item folder of a base → last colour prefix used in it
    df_item: dict[int, str] = {}
    for p in by_index:
        if p.planted == "invalid_product_id":
            # only the folder tree and the manifest can spell an unsafe id
            p.ids = {k: None for k in LAYOUTS}
            p.ids["folder"] = BAD_FOLDER_ID
            p.ids["manifest"] = TRAVERSAL_ID
            continue
        p.ids = {
            "fashion200k": str(f200k[p.index]),
            "fashiongen": str(fashiongen[p.index]),
            "folder": f"p{p.index:05d}",
            "manifest": f"sku-{p.index:05d}",
        }
        if not p.colour_sibling:
            item += int(rng.integers(1, 60))
            a = p.attrs
            df_item[id(p)] = f"{a['gender'].upper()}/{DF_CATEGORY[a['category']]}/id_{item:08d}"
            nn_used[id(p)] = 1
            p.ids["deepfashion"] = f"{df_item[id(p)]}/01"
    # colour variants become further NN prefixes of their base's item folder (as DeepFashion stores them)
    for p in by_index:
        if p.colour_sibling:
            assert p.base is not None
            nn_used[id(p.base)] += 1
            p.ids["deepfashion"] = f"{df_item[id(p.base)]}/{nn_used[id(p.base)]:02d}"
    for p in products:
        p.ids = {k: p.ids.get(k) for k in LAYOUTS}


def _unique_numbers(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < n:
        v = int(rng.integers(low, high + 1))
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _assign_splits(products: list[_Product], rng: np.random.Generator) -> None:
    """About 80/20 train/val, drawn per family (a base with its siblings, near-misses and re-listed copy)."""
    split_of_root: dict[int, str] = {}
    members = [p for p in sorted(products, key=lambda q: q.index) if p.ids["fashiongen"] is not None]
    for p in members:
        root = p.base if p.base is not None else p
        if id(root) not in split_of_root:
            split_of_root[id(root)] = "train" if rng.random() < 0.8 else "val"
    # both h5 files must hold products, even in a tiny catalogue
    roots = list(split_of_root)
    for split, pos in (("val", -1), ("train", 0)):
        if split not in split_of_root.values():
            split_of_root[roots[pos]] = split
    for p in members:
        p.split = split_of_root[id(p.base if p.base is not None else p)]


def _suffix(slot: _Slot, layout: str) -> str:
    if slot.fault == "decompression_bomb":
        return ".png"
    return ".jpeg" if layout == "fashion200k" else ".jpg"


def _file_names(p: _Product, layout: str) -> list[str]:
    """File names of every slot in a file layout, in slot order (which is also their sorted order)."""
    names = []
    seven = len(p.slots) == 7
    for i, slot in enumerate(p.slots):
        ext = _suffix(slot, layout)
        if layout == "deepfashion":
            nn = str(p.ids["deepfashion"]).rsplit("/", 1)[1]
            k = i + 1 if seven else DF_VIEW_NUMBER[slot.label]
            names.append(f"{nn}_{k}_{DF_VIEW_NAME[slot.label]}{ext}")
        elif layout == "fashion200k":
            names.append(f"{p.ids['fashion200k']}_{i}{ext}")
        else:
            names.append(f"{i + 1}_{slot.label}{ext}")
    return names


def _relative_dir(p: _Product, layout: str) -> str:
    pid = str(p.ids[layout])
    if layout == "deepfashion":
        return f"deepfashion/{pid.rsplit('/', 1)[0]}"
    if layout == "fashion200k":
        gender = p.attrs["gender"]
        category, sub = F200K_CATEGORY[p.attrs["category"]]
        return f"fashion200k/{gender}/{category}/{sub}/{pid}"
    if layout == "folder":
        return f"folder/{pid}"
    return f"manifest/images/{_manifest_dir(p)}"


def _product_dir(out_dir: Path, p: _Product, layout: str) -> Path:
    return out_dir / _relative_dir(p, layout)


def _manifest_dir(p: _Product) -> str:
    # the traversal id's images live under a safe folder: the id, not the URL, is what must be rejected
    return "bad_id" if p.ids["manifest"] == TRAVERSAL_ID else str(p.ids["manifest"])


# ----------------------------------------------------------------------------------------------------------
# writing


class _FashionGenWriter:
    def __init__(self, out_dir: Path, rows: dict[str, int], cat_len: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, h5py.File] = {}
        self.next_row = {"train": 0, "val": 0}
        self.cat_dtype = f"S{cat_len}"
        for split, name in (("train", "train"), ("val", "validation")):
            h5 = h5py.File(out_dir / f"fashiongen_256_256_{name}.h5", "w", track_order=False)
            n = rows[split]
            size = FASHIONGEN_SIZE
            h5.create_dataset("input_productID", shape=(n, 1), dtype=np.int32, track_times=False)
            h5.create_dataset(
                "input_image",
                shape=(n, size, size, 3),
                dtype=np.uint8,
                chunks=(1, size, size, 3),
                compression="gzip",
                compression_opts=4,
                track_times=False,
            )
            h5.create_dataset("input_category", shape=(n, 1), dtype=self.cat_dtype, track_times=False)
            self.files[split] = h5

    def add(self, split: str, pid: int, category: str, arrays: list[np.ndarray]) -> list[int]:
        h5 = self.files[split]
        start = self.next_row[split]
        stop = start + len(arrays)
        h5["input_productID"][start:stop] = np.full((len(arrays), 1), pid, dtype=np.int32)
        h5["input_image"][start:stop] = np.stack(arrays)
        h5["input_category"][start:stop] = np.array([[category.encode()]] * len(arrays), dtype=self.cat_dtype)
        self.next_row[split] = stop
        return list(range(start, stop))

    def close(self) -> None:
        for h5 in self.files.values():
            h5.close()


def _write_catalogue(out_dir: Path, products: list[_Product], seed: int) -> None:
    by_index = sorted(products, key=lambda p: p.index)
    rows = {"train": 0, "val": 0}
    for p in by_index:
        if p.split is not None:
            rows[p.split] += sum(1 for s in p.slots if s.fault not in _FILE_FAULTS)
    writer = _FashionGenWriter(out_dir / "fashiongen", rows, max(len(c) for c in FG_CATEGORY.values()))
    manifest_lines: list[str] = []
    try:
        for p in by_index:
            views = _product_views(p, seed)
            for layout in FILE_LAYOUTS:
                if p.ids[layout] is None:
                    continue
                names = _file_names(p, layout)
                p.files[layout] = names
                folder = _product_dir(out_dir, p, layout)
                folder.mkdir(parents=True, exist_ok=True)
                for name, data, slot in zip(names, views.files, p.slots, strict=True):
                    (folder / name).write_bytes(data)
                    if layout == "manifest":
                        row = {
                            "product_id": p.ids["manifest"],
                            "url": f"images/{_manifest_dir(p)}/{name}",
                            "view": slot.label,
                            "category": p.attrs["category"],
                            "licence": MANIFEST_LICENCE,
                        }
                        manifest_lines.append(json.dumps(row))
            if p.split is not None:
                arrays = [a for a in views.arrays if a is not None]
                got = writer.add(p.split, int(str(p.ids["fashiongen"])), FG_CATEGORY[p.attrs["category"]], arrays)
                p.files["fashiongen"] = [f"{r}.jpg" for r in got]  # the crawler names a row by its index
    finally:
        writer.close()
    (out_dir / "manifest" / "manifest.jsonl").write_text("\n".join(manifest_lines) + "\n")


def _drop_stray_file(out_dir: Path, products: list[_Product]) -> str:
    """A README in one DeepFashion item folder: crawlers must skip it (not a view)."""
    first = min((p for p in products if p.role == "base"), key=lambda p: p.index)
    rel = f"deepfashion/{str(first.ids['deepfashion']).rsplit('/', 1)[0]}/README.txt"
    (out_dir / rel).write_text("Item notes from the sample generator. Not an image.\n")
    return rel


# ----------------------------------------------------------------------------------------------------------
# ground truth


def _layout_names(p: _Product, layout: str) -> list[str]:
    """The file names a crawler will list for this product in a layout (h5 rows exclude the bad slots)."""
    return p.files.get(layout, [])


def _faults(products: list[_Product]) -> list[dict[str, Any]]:
    faults: list[dict[str, Any]] = []
    for p in sorted(products, key=lambda q: q.index):
        if p.planted is None:
            continue
        layouts = p.in_layouts
        if p.planted in _FILE_FAULTS:
            slot_i = next(i for i, s in enumerate(p.slots) if s.fault == p.planted)
            where = {k: {"product_id": p.ids[k], "file_name": p.files[k][slot_i]} for k in layouts if k in FILE_LAYOUTS}
            faults.append(_fault(p.planted, "ingest", _FILE_FAULTS[p.planted], "view", where, p))
        elif p.planted == "invalid_product_id":
            where = {k: {"product_id": p.ids[k]} for k in layouts}
            faults.append(_fault(p.planted, "ingest", RejectReason.INVALID_PRODUCT_ID, "product", where, p))
        elif p.planted == "duplicate_view":
            dup_i = next(i for i, s in enumerate(p.slots) if s.fault == "duplicate_view")
            where = {}
            for k in layouts:
                # of two identical files the later in sorted order is the one to drop
                pair = sorted([_layout_names(p, k)[0], _layout_names(p, k)[dup_i]])
                where[k] = {"product_id": p.ids[k], "file_name": pair[1], "duplicate_of": pair[0]}
            faults.append(_fault(p.planted, "dedupe", RejectReason.DUPLICATE_VIEW, "view", where, p))
        elif p.planted == "relisted":
            assert p.base is not None
            where = {k: {"product_id": p.ids[k], "duplicate_of": p.base.ids[k]} for k in layouts}
            faults.append(_fault(p.planted, "dedupe", RejectReason.DUPLICATE_PRODUCT, "product", where, p))
        elif p.planted == "one_view":
            where = {k: {"product_id": p.ids[k]} for k in layouts}
            faults.append(_fault(p.planted, "dedupe", RejectReason.TOO_FEW_VIEWS, "product", where, p))
        elif p.planted == "seven_views":
            for rank in (5, 6):  # the 6th and 7th file in plain string order
                where = {k: {"product_id": p.ids[k], "file_name": sorted(_layout_names(p, k))[rank]} for k in layouts}
                faults.append(_fault(p.planted, "dedupe", RejectReason.VIEW_BEYOND_LIMIT, "view", where, p))
    return faults


def _fault(name: str, stage: str, reason: RejectReason, level: str, where: dict, p: _Product) -> dict[str, Any]:
    return {
        "fault": name,
        "stage": stage,
        "reason": reason.value,
        "level": level,
        "product_index": p.index,
        "where": where,
    }


def _expected_ingest(products: list[_Product]) -> dict[str, Any]:
    def empty() -> dict[str, Any]:
        return {"products_in": 0, "products_out": 0, "views_in": 0, "views_out": 0, "rejects": {}}

    def count(acc: dict[str, Any], p: _Product, layout: str) -> None:
        names = _layout_names(p, layout)
        acc["products_in"] += 1
        acc["views_in"] += len(names)  # every planted file carries an image suffix
        rejects = acc["rejects"]
        if p.planted == "invalid_product_id":
            rejects[RejectReason.INVALID_PRODUCT_ID.value] = rejects.get(RejectReason.INVALID_PRODUCT_ID.value, 0) + 1
            return
        acc["products_out"] += 1
        bad = [s.fault for s in p.slots if s.fault in _FILE_FAULTS] if layout != "fashiongen" else []
        for fault in bad:
            reason = _FILE_FAULTS[str(fault)].value
            rejects[reason] = rejects.get(reason, 0) + 1
        acc["views_out"] += len(names) - len(bad)

    result: dict[str, Any] = {}
    for layout in LAYOUTS:
        acc = empty()
        by_split = {"train": empty(), "val": empty()}
        for p in sorted(products, key=lambda q: q.index):
            if p.ids[layout] is None:
                continue
            count(acc, p, layout)
            if layout == "fashiongen":
                assert p.split is not None
                count(by_split[p.split], p, layout)
        if layout == "fashiongen":
            acc["by_split"] = by_split
        acc["rejects"] = dict(sorted(acc["rejects"].items()))
        if layout == "fashiongen":
            for part in by_split.values():
                part["rejects"] = dict(sorted(part["rejects"].items()))
        result[layout] = acc
    return result


def _product_record(p: _Product) -> dict[str, Any]:
    record: dict[str, Any] = {
        "index": p.index,
        "role": p.role,
        "ids": dict(p.ids),
        "fashiongen_split": p.split,
        "is_clothing": p.attrs["category"] in CLOTHING,
    }
    record.update(p.attrs)
    record.update(
        {
            "views": [s.label for s in p.slots],
            "renders": [s.render for s in p.slots],  # what each view shows (a detail view: which crop)
            # FashionGen rows hold only the slots without a file fault
            "fashiongen_renders": [s.render for s in p.slots if s.fault not in _FILE_FAULTS] if p.split else [],
            "sibling_of": p.base.index if p.base is not None and p.role == "sibling" else None,
            "near_miss_of": p.base.index if p.base is not None and p.role == "near_miss" else None,
            "relisted_of": p.base.index if p.base is not None and p.role == "relisted" else None,
            "differs_in": list(p.differs_in),
            "planted": p.planted,
            "files": {k: list(p.files[k]) for k in LAYOUTS if k in p.files},
            # per file layout, each slot's file relative to the catalogue folder
            "paths": {
                k: [str(Path(_relative_dir(p, k)) / name) for name in p.files[k]] for k in FILE_LAYOUTS if k in p.files
            },
        }
    )
    return record


# ----------------------------------------------------------------------------------------------------------


def generate_sample(out_dir: Path, products: int = 200, seed: int = 0) -> dict:
    """Writes the catalogue in five layouts plus out_dir/ground_truth.json; returns the ground truth dict."""
    if products < MIN_PRODUCTS:
        raise ValueError(f"products={products}: the sample needs at least {MIN_PRODUCTS} products")
    out_dir = Path(out_dir)
    rng = np.random.default_rng([seed, products])
    plan = _plan(products, rng)
    # shuffle the roles over the indices so no layout lists bases first and faults last
    for position, index in enumerate(rng.permutation(len(plan))):
        plan[position].index = int(index)
    _assign_ids(plan, rng)
    _assign_splits(plan, rng)

    # a rerun replaces the catalogue: stale files of a bigger earlier run must not linger
    for name in (*LAYOUTS, "ground_truth.json"):
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_catalogue(out_dir, plan, seed)
    stray = _drop_stray_file(out_dir, plan)

    truth: dict[str, Any] = {
        "seed": seed,
        "products_requested": products,
        "attributes": list(ATTRIBUTES),
        "layouts": list(LAYOUTS),
        "stray_files": [stray],
        "products": [_product_record(p) for p in sorted(plan, key=lambda q: q.index)],
        "faults": _faults(plan),
        "expected_ingest": _expected_ingest(plan),
    }
    (out_dir / "ground_truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return truth
