"""A ground-truth answering server: a DEVELOPMENT TOOL for semantic tests, never a way to build a real dataset.

No real vision-language model runs on the development machines, and a random-weight one answers noise, which
proves structure but not meaning. This server stands in for the model's intelligence only: it speaks the same
OpenAI-compatible chat API as vLLM (`/v1/models`, `/v1/chat/completions`), so a build goes through the real client,
schemas, answer store, resume and breakers, but its answers come from the sample catalogue's `ground_truth.json`.

It recognises a product only from the image bytes it is sent: at start it prepares every catalogue image the way
the client does (`prepare_views`: `fit_to_pixels` at each pixel budget) and indexes the sha256 of the result; ids in
the prompt are never read. From the truth it answers
- Stage 1 (schema `caption`): per view, the view type, on which side of the image the wearer's left is, and a
  caption of the attributes that view shows, as `attr=value` words after colour, pattern and category; a seeded
  share of products (`wrong_share`) gets a planted wrong left/right claim (front views' wearer-left side, and the
  pocket's side where there is one);
- Stage 2 (`verify`): `remove` exactly when a claim contradicts the truth of the image it is about, listing them;
- Stage 3 (`select`): the shown candidates that are true siblings of the source (same base garment) and differ in
  views enough of which both products show, with texts naming the differences and the views they show in (as many
  distinct short texts as the schema asks for, each naming every difference after its own lead words);
- the discriminability check (`discriminate`): the source's truth with the text's `attr=value` claims applied is the
  product described; the answer is the first shown candidate that agrees with it on the most attributes (candidates
  as images: their truth; as captions: what their short captions state).

Token counts in `usage` are estimates (words and a fixed cost per image). `/metrics` counts requests per stage and
images it could not recognise, so a test can prove every image was one of the catalogue's.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import h5py
import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import PlainTextResponse
from PIL import Image

from fashionmv_builder.core.config import LmmConfig, TripletsConfig
from fashionmv_builder.devtools.local_server import serve_app
from fashionmv_builder.devtools.sample_catalogue import FILE_LAYOUTS, NA, detail_region
from fashionmv_builder.lmm.media import prepare_views
from fashionmv_builder.stages.ingest.images import encode_jpeg

MODEL_NAME = "ground-truth"
# The pixel budgets of a default run: the source's views and Stage 3's smaller candidate views.
DEFAULT_BUDGETS = (LmmConfig.model_fields["image_max_pixels"].default, TripletsConfig().candidate_max_pixels)
# Word bounds that hold the truth's words (colour, pattern, category, then attr=value words): for configs of
# ground-truth builds (configs/ground-truth.yaml has the same).
TRUTH_WORDS = {
    "view_caption": (3, 10),
    "long_caption": (10, 24),
    "short_caption": (4, 10),
    "verifier_reason": (1, 6),
    "wrong_claim": (1, 4),
    "modification_short": (4, 12),
    "modification_long": (8, 30),
}
# Attributes beyond colour, pattern and category, most telling first (a short caption keeps the first ones).
DETAILS = ("pocket", "back_detail", "neckline", "sleeve", "hem")
EVERY_VIEW = ("colour", "pattern", "category")
VIEW_OF_RENDER = {r: ("detail" if r.startswith("detail") else r) for r in ("front", "side", "back", "full")}
VIEW_OF_RENDER.update({"detail": "detail", "detail_back": "detail", "detail_hem": "detail"})
# The drawing's convention (sample_catalogue): the front faces the camera, the side view is the wearer's left profile.
WEARER_LEFT = {"front": "image_right", "full": "image_right", "back": "image_left"}
FILLER = ("as", "shown", "in", "the", "photos")
# Lead words of the k-th short text: paraphrases of one change, distinct from their first words on.
PARAPHRASE_LEADS = (
    ("same", "{category}", "but"),
    ("this", "{category}", "with"),
    ("make", "it"),
    ("change", "to"),
    ("want", "instead"),
    ("prefer",),
    ("swap", "for"),
    ("like", "source", "except"),
)
IMAGE_TOKENS = 256  # the estimate of one image's prompt tokens in `usage`
MAX_SAMPLE_PIXELS = 4096 * 4096  # the sample's images are a few hundred pixels a side
FASHIONGEN_FILES = {"train": "fashiongen_256_256_train.h5", "val": "fashiongen_256_256_validation.h5"}


# -- the truth, as views show it ---------------------------------------------------------------------------------


def appearance(attrs: dict[str, str], render: str, attr: str) -> str | None:
    """What a view shows of an attribute; None where nothing of it shows. Two products differ in a view exactly
    where these differ."""
    value = attrs[attr]
    if attr in EVERY_VIEW:
        return value
    if render.startswith("detail"):
        return value if detail_region(attrs, render) == attr else None
    if attr == "pocket":
        if render == "side":  # the wearer's left profile shows only a left pocket
            return value if value == "left" else None
        return value if render in ("front", "full") else None
    if attr == "back_detail":
        return value if render == "back" else None
    if attr == "neckline":
        return value if render in ("front", "full") else None
    if attr in ("sleeve", "hem"):
        return value
    return None  # gender is not drawn


def wearer_left(render: str) -> str:
    return WEARER_LEFT.get(render, "not_visible")


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return [attr for attr in (*EVERY_VIEW, *DETAILS) if a[attr] != b[attr]]


def difference_views(a: dict[str, str], a_renders: list[str], b: dict[str, str], b_renders: list[str]) -> list[str]:
    """The views (by type) both products show in which they differ."""
    changed = differences(a, b)
    first_a = {VIEW_OF_RENDER[r]: r for r in reversed(a_renders)}
    first_b = {VIEW_OF_RENDER[r]: r for r in reversed(b_renders)}
    views = []
    for view in ("front", "back", "side", "detail", "full"):
        shown = view in first_a and view in first_b
        if shown and any(appearance(a, first_a[view], x) != appearance(b, first_b[view], x) for x in changed):
            views.append(view)
    return views


def planted_wrong(index: int, seed: int, share: float) -> bool:
    """Whether the captioner gives this product a wrong left/right claim (seeded per product)."""
    return bool(np.random.default_rng([seed, index, 7]).random() < share)


def caption_words(attrs: dict[str, str], render: str | None, mirror: bool = False) -> list[str]:
    if render is None:
        return ["unknown", "image"]
    words = [appearance(attrs, render, a) or NA for a in EVERY_VIEW]
    for attr in DETAILS:
        shown = appearance(attrs, render, attr)
        if shown is not None and shown != NA:
            if mirror and attr == "pocket":
                shown = {"left": "right", "right": "left"}.get(shown, shown)
            words.append(f"{attr}={shown}")
    return words


def product_words(attrs: dict[str, str], mirror: bool = False) -> list[str]:
    words = [attrs[a] for a in EVERY_VIEW]
    for attr in DETAILS:
        value = attrs[attr]
        if value != NA:
            if mirror and attr == "pocket":
                value = {"left": "right", "right": "left"}.get(value, value)
            words.append(f"{attr}={value}")
    return [*words, f"gender={attrs['gender']}"]


def caption_attributes(words: list[str]) -> dict[str, str]:
    """What a ground-truth caption states: colour, pattern and category by position, then `attr=value` words."""
    attrs = dict.fromkeys(DETAILS, NA)
    for position, word in enumerate(words):
        attr, _, value = word.partition("=")
        if value:
            attrs[attr] = value
        elif position < len(EVERY_VIEW):
            attrs[EVERY_VIEW[position]] = word
    return attrs


def _same(attr: str, a: str | None, b: str | None) -> bool:
    """Two values of an attribute agree as the schema's 20-character words can show them."""
    return a is not None and b is not None and f"{attr}={a}"[:20] == f"{attr}={b}"[:20]


def claim_errors(attrs: dict[str, str], render: str | None, words: list[str]) -> list[str]:
    """The words of a caption that contradict what the view (None: the whole product) shows."""
    wrong = []
    for position, attr in enumerate(EVERY_VIEW):
        if position < len(words) and "=" not in words[position] and words[position] != attrs[attr]:
            wrong.append(words[position])
    for word in words:
        attr, _, value = word.partition("=")
        if value and attr in attrs:
            truth = attrs[attr] if render is None else appearance(attrs, render, attr)
            if value != truth:
                wrong.append(word)
    return wrong


# -- fitting answers to the schema's word bounds --------------------------------------------------------------


def word_bounds(prop: dict) -> tuple[int, int]:
    """(low, high) words of a `words(low, high)` string in a JSON schema (data_schema/lmm_answers.py)."""
    found = re.search(r"\{(\d+),(\d+)\}\$$", prop.get("pattern", ""))
    if not found:
        raise ValueError(f"not a word-bounded string: {prop}")
    return int(found.group(1)) + 1, int(found.group(2)) + 1


def fit(words: list[str], bounds: tuple[int, int]) -> str:
    low, high = bounds
    words = [w[:20] for w in words if w][:high]
    while len(words) < low:
        words.append(FILLER[len(words) % len(FILLER)])
    return " ".join(words)


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref") or (node.get("items") or {}).get("$ref")
    return schema["$defs"][ref.rsplit("/", 1)[1]] if ref else node


# -- the catalogue ------------------------------------------------------------------------------------------------


def _sendable(data: bytes) -> bool:
    """False for the sample's planted broken files (ingest rejects them, so they are never sent)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_SAMPLE_PIXELS:  # the decompression bomb: do not decode it
                return False
            img.load()
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Seen:
    """One image of a request, recognised (or not) by its content."""

    products: frozenset[int]
    renders: dict[int, str]  # product index → what that product's image with these bytes shows


class GroundTruth:
    def __init__(self, catalogue: Path, budgets: tuple[int, ...] = DEFAULT_BUDGETS) -> None:
        truth = json.loads((catalogue / "ground_truth.json").read_text())
        self.products: dict[int, dict] = {p["index"]: p for p in truth["products"]}
        self.index: dict[str, dict[int, str]] = {}  # sha256 of the bytes sent → product index → render
        prepared: dict[str, list[str]] = {}  # sha256 of an original → sha256 of it at each budget
        for product, render, data in self._images(catalogue):
            original = hashlib.sha256(data).hexdigest()
            if original not in prepared:
                sent = prepare_views(data, budgets).values() if _sendable(data) else []
                prepared[original] = [hashlib.sha256(x).hexdigest() for x in sent]
            for sent in prepared[original]:
                self.index.setdefault(sent, {}).setdefault(product, render)

    def _images(self, catalogue: Path) -> Iterator[tuple[int, str, bytes]]:
        for p in self.products.values():
            for layout in FILE_LAYOUTS:
                for render, path in zip(p["renders"], p["paths"].get(layout, []), strict=False):
                    with contextlib.suppress(OSError):
                        yield p["index"], render, (catalogue / path).read_bytes()
        for split, name in FASHIONGEN_FILES.items():
            with h5py.File(catalogue / "fashiongen" / name, "r") as h5:
                images = h5["input_image"]
                for p in self.products.values():
                    if p["fashiongen_split"] != split:
                        continue
                    rows = p["files"].get("fashiongen", [])
                    for render, file in zip(p["fashiongen_renders"], rows, strict=True):
                        yield p["index"], render, encode_jpeg(np.asarray(images[int(file.split(".")[0])]))

    def see(self, sha256: str) -> Seen:
        found = self.index.get(sha256, {})
        return Seen(frozenset(found), found)

    def family(self, index: int) -> int | None:
        p = self.products[index]
        return p["sibling_of"] if p["role"] == "sibling" else index if p["role"] == "base" else None


def recognise(truth: GroundTruth, seen: list[Seen]) -> tuple[int | None, list[str | None]]:
    """The product most of the images belong to, and what each image shows of it (None: not one of its images)."""
    votes = Counter(i for s in seen for i in s.products)
    if not votes:
        return None, [None] * len(seen)
    product = votes.most_common(1)[0][0]
    return product, [s.renders.get(product) for s in seen]


# -- the answers ----------------------------------------------------------------------------------------------


class Answerer:
    def __init__(self, truth: GroundTruth, wrong_share: float, seed: int) -> None:
        self.truth = truth
        self.wrong_share = wrong_share
        self.seed = seed
        self.requests: Counter[str] = Counter()
        self.unrecognised = 0  # images not among the catalogue's (at the configured budgets)
        self.foreign = 0  # recognised images of another product than the rest of their group
        self.lock = threading.Lock()

    def _group(self, seen: list[Seen]) -> tuple[int | None, list[str | None]]:
        product, renders = recognise(self.truth, seen)
        with self.lock:
            self.unrecognised += sum(not s.products for s in seen)
            self.foreign += sum(bool(s.products) and r is None for s, r in zip(seen, renders, strict=True))
        return product, renders

    def caption(self, schema: dict, seen: list[Seen]) -> dict:
        product, renders = self._group(seen)
        view_schema = _resolve(schema, schema["properties"]["views"])["properties"]
        bounds = {k: word_bounds(schema["properties"][k]) for k in ("long_caption", "short_caption")}
        if product is None:  # answer, but so that every check fails: the test reads the metrics too
            unknown = fit(["unknown", "image"], word_bounds(view_schema["caption"]))
            return {
                "views": [{"view_type": "other", "wearer_left_on": "not_visible", "caption": unknown} for _ in seen],
                "long_caption": fit(["unknown"], bounds["long_caption"]),
                "short_caption": fit(["unknown"], bounds["short_caption"]),
                "category": "unknown",
                "gender": "unknown",
                "is_clothing": False,
            }
        p = self.truth.products[product]
        wrong = planted_wrong(product, self.seed, self.wrong_share)
        views = []
        for render in renders:
            side = wearer_left(render) if render else "not_visible"
            if wrong and side == "image_right":
                side = "image_left"
            views.append(
                {
                    "view_type": VIEW_OF_RENDER[render] if render else "other",
                    "wearer_left_on": side,
                    "caption": fit(caption_words(p, render, mirror=wrong), word_bounds(view_schema["caption"])),
                }
            )
        words = product_words(p, mirror=wrong)
        return {
            "views": views,
            "long_caption": fit(words, bounds["long_caption"]),
            "short_caption": fit(words, bounds["short_caption"]),
            "category": p["category"],
            "gender": p["gender"] if p["gender"] in ("men", "women") else "unknown",
            "is_clothing": bool(p["is_clothing"]),
        }

    def verify(self, schema: dict, seen: list[Seen], claims: dict) -> dict:
        product, renders = self._group(seen)
        props = schema["properties"]
        claim_bounds = word_bounds(_resolve(schema, props["wrong_claims"]["items"]))
        wrong: list[list[str]] = []
        if product is None:
            wrong.append(["unknown", "product"])
        else:
            p = self.truth.products[product]
            views = claims.get("views", [])
            if len(views) != len(renders):
                wrong.append(["views", str(len(views)), "for", str(len(renders))])
            for k, (view, render) in enumerate(zip(views, renders, strict=False), start=1):
                where = f"image-{k}"
                if render is None:
                    wrong.append([where, "unknown"])
                    continue
                if view.get("view_type") != VIEW_OF_RENDER[render]:
                    wrong.append([where, f"view_type={view.get('view_type')}"])
                if view.get("wearer_left_on") != wearer_left(render):
                    wrong.append([where, f"left_on={view.get('wearer_left_on')}"])
                wrong += [[where, w] for w in claim_errors(p, render, str(view.get("caption", "")).split())]
            for field in ("long_caption", "short_caption"):
                wrong += [[field, w] for w in claim_errors(p, None, str(claims.get(field, "")).split())]
        limit = props["wrong_claims"].get("maxItems", 3)
        return {
            "verdict": "remove" if wrong else "pass",
            "reason": fit(
                [str(len(wrong)), "claims", "contradict"] if wrong else ["claims", "match"],
                word_bounds(props["reason"]),
            ),
            "wrong_claims": [fit(w, claim_bounds) for w in wrong[:limit]],
        }

    def select(self, schema: dict, source: list[Seen], candidates: list[list[Seen]]) -> dict:
        src, src_renders = self._group(source)
        choice = _resolve(schema, schema["properties"]["choices"])
        props = choice["properties"]
        min_views = props["views_involved"].get("minItems", 1)
        most = schema["properties"]["choices"].get("maxItems", 2)
        picked = []
        for c, group in enumerate(candidates, start=1):
            cand, cand_renders = self._group(group)
            if src is None or cand is None or cand == src or len(picked) == most:
                continue
            family = self.truth.family(src)
            if family is None or self.truth.family(cand) != family:
                continue
            a, b = self.truth.products[src], self.truth.products[cand]
            views = difference_views(a, [r for r in src_renders if r], b, [r for r in cand_renders if r])
            changed = differences(a, b)
            if not changed or len(views) < min_views:
                continue
            shorts = _resolve(schema, props["modifications_short"]["items"])
            count = props["modifications_short"].get("minItems", 1)
            changes = [f"{x}={b[x]}" for x in changed]
            lead = [[w.format(category=a["category"]) for w in words] for words in PARAPHRASE_LEADS[:count]]
            long = ["same", a["category"], "but"]
            for x in changed:
                long += [x, "from", a[x], "to", b[x]]
            long += ["seen", "in", *views]
            picked.append(
                {
                    "candidate": c,
                    "views_involved": views,
                    "modifications_short": [fit([*w, *changes], word_bounds(shorts)) for w in lead],
                    "modification_long": fit(long, word_bounds(props["modification_long"])),
                }
            )
        return {"choices": picked}

    def discriminate(self, schema: dict, source: list[Seen], candidates: list[list[Seen]], texts: list[str]) -> dict:
        """The candidate the text describes: the source's truth with the text's `attr=value` claims applied."""
        src, _ = self._group(source)
        lines = [t for t in texts if t.startswith("Candidate ")]
        text = next(t for t in reversed(texts) if t.startswith("Modification text: "))
        described = dict(self.truth.products[src]) if src is not None else {}
        for word in text.split(": ", 1)[1].split():
            attr, _, value = word.partition("=")
            if value and attr in (*EVERY_VIEW, *DETAILS):
                described[attr] = value
        scores = []
        for c, line in enumerate(lines):
            if candidates:  # shown as images: what they are
                product, _ = self._group(candidates[c]) if c < len(candidates) else (None, [])
                attrs = self.truth.products[product] if product is not None else {}
            else:  # shown as captions: what the caption states (a detail it does not name is not there)
                attrs = caption_attributes(line.split(": ", 1)[1].split())
            scores.append(sum(_same(attr, attrs.get(attr), described.get(attr)) for attr in (*EVERY_VIEW, *DETAILS)))
        best = max(range(len(scores)), key=lambda c: (scores[c], -c)) if scores else 0
        return {"candidate": best + 1}


# -- the HTTP server ------------------------------------------------------------------------------------------


def _image_bytes(url: str, media_root: Path | None) -> bytes:
    if url.startswith("data:"):
        return base64.b64decode(url.split(",", 1)[1])
    path = Path(unquote(urlparse(url).path)).resolve()
    if url.startswith("file://") and media_root is not None and path.is_relative_to(media_root):
        return path.read_bytes()
    raise HTTPException(400, f"cannot read image {url[:80]} (only data URLs and files under the media root)")


def _groups(content: list[dict], media_root: Path | None, truth: GroundTruth) -> tuple[list[list[Seen]], list[str]]:
    """The request's images grouped under the text line before them (Stage 3: the source, then each candidate)."""
    groups: list[list[Seen]] = []
    texts: list[str] = []
    opened = False
    for part in content:
        if part.get("type") == "text":
            text = part["text"]
            texts.append(text)
            if not text.startswith("["):  # "[Image k]" labels do not start a group; every other line does
                opened = False
        elif part.get("type") == "image_url":
            if not opened:
                groups.append([])
                opened = True
            sha = hashlib.sha256(_image_bytes(part["image_url"]["url"], media_root)).hexdigest()
            groups[-1].append(truth.see(sha))
    return groups, texts


def create_app(answerer: Answerer, media_root: Path | None, model: str = MODEL_NAME) -> FastAPI:
    app = FastAPI(title="ground-truth answering server (development tool)")
    truth = answerer.truth

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "fashionmv-devtools"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        lines = [f'ground_truth:requests_total{{stage="{k}"}} {v}' for k, v in sorted(answerer.requests.items())]
        lines += [f"ground_truth:unrecognised_images_total {answerer.unrecognised}"]
        lines += [f"ground_truth:foreign_images_total {answerer.foreign}"]
        return "\n".join(lines) + "\n"

    @app.post("/v1/chat/completions")
    def complete(body: dict[str, Any]) -> dict:
        if body.get("model") != model:
            raise HTTPException(404, f"model {body.get('model')!r} not served; this server serves {model!r}")
        spec = body.get("response_format", {}).get("json_schema", {})
        stage, schema = spec.get("name"), spec.get("schema", {})
        user = next(m for m in body["messages"] if m["role"] == "user")["content"]
        if isinstance(user, str):
            user = [{"type": "text", "text": user}]
        groups, texts = _groups(user, media_root, truth)
        if stage == "caption":
            answer = answerer.caption(schema, groups[0] if groups else [])
        elif stage == "verify":
            claims = json.loads(texts[-1].split("\n", 1)[1])
            answer = answerer.verify(schema, groups[0] if groups else [], claims)
        elif stage == "canary":  # the check that a server enforces schemas: this one does, by construction
            answer = {"canary": schema["properties"]["canary"]["enum"][0]}
        elif stage == "select":
            answer = answerer.select(schema, groups[0] if groups else [], groups[1:])
        elif stage == "discriminate":
            answer = answerer.discriminate(schema, groups[0] if groups else [], groups[1:], texts)
        else:
            raise HTTPException(400, f"no ground truth for requests with schema {stage!r}")
        with answerer.lock:
            answerer.requests[stage] += 1
        text = json.dumps(answer)
        images = sum(len(g) for g in groups)
        prompt_tokens = sum(len(t.split()) for t in texts) + IMAGE_TOKENS * images
        return {
            "id": f"gt-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(text) // 4,
                "total_tokens": prompt_tokens + len(text) // 4,
            },
        }

    return app


@contextlib.contextmanager
def serve_ground_truth(
    catalogue: Path,
    *,
    media_root: Path | None = None,
    budgets: tuple[int, ...] = DEFAULT_BUDGETS,
    wrong_share: float = 0.1,
    seed: int = 0,
    port: int = 0,
) -> Iterator[tuple[str, Answerer]]:
    """Run the server on 127.0.0.1 in a thread of this process; yields its base URL and the answerer."""
    answerer = Answerer(GroundTruth(catalogue, budgets), wrong_share, seed)
    root = media_root.resolve() if media_root else None
    with serve_app(create_app(answerer, root), port, "ground-truth-server") as url:
        yield url, answerer
