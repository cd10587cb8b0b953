"""The audit page: a small FastAPI app over one labels file.

The page (static/) asks for one item at a time and sends each answer at once; the server rewrites the labels file
after every answer, so closing the tab or killing the server loses nothing. LMM text is untrusted: the page only
ever puts it in the DOM as text, and the Content-Security-Policy forbids any script but the page's own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from fashionmv_builder.core.config import RunConfig
from fashionmv_builder.outputs.audit import data
from fashionmv_builder.outputs.audit.labels import (
    LABELS,
    check_settings,
    draw_sample,
    first_unlabelled,
    label_of,
    load_labels,
    new_labels,
    save_labels,
    set_label,
)

STATIC = Path(__file__).with_name("static")
SHORTCUTS = dict(zip(LABELS, "1234", strict=True))
CSP = "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


class AuditSession:
    """The sample, its labels file and what the page shows of each item (read once at start)."""

    def __init__(
        self,
        labels_path: Path,
        doc: dict[str, Any],
        details: dict[data.Key, dict[str, Any]],
        images: dict[tuple[str, str, int], tuple[Path, str]],
    ) -> None:
        self.labels_path = labels_path
        self.doc = doc
        self.details = details
        self.images = images
        self.lock = threading.Lock()  # answers arrive on the server's worker threads

    def state(self) -> dict[str, Any]:
        labels = [label_of(self.doc, i) for i in range(len(self.doc["items"]))]
        return {
            "total": len(labels),
            "labelled": sum(1 for lab in labels if lab is not None),
            "first_unlabelled": first_unlabelled(self.doc),
            "labels": labels,
            "choices": [{"key": k, "name": v, "shortcut": SHORTCUTS[k]} for k, v in LABELS.items()],
            "seed": self.doc["seed"],
        }

    def item(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.doc["items"]):
            raise HTTPException(404, f"no item {index}: the sample has {len(self.doc['items'])}")
        entry = self.doc["items"][index]
        dataset, pid = entry["dataset"], entry["product_id"]
        detail = self.details.get((dataset, pid)) or {"captions": None, "kept": []}
        captions = detail["captions"] or {}
        views = data.view_list(detail)
        for view in views:
            url = f"/image/{quote(dataset, safe='')}/{quote(pid, safe='')}/{view['view_index']}"
            view["image"] = url if (dataset, pid, view["view_index"]) in self.images else None
        return {
            "index": index,
            "total": len(self.doc["items"]),
            "dataset": dataset,
            "product_id": pid,
            "label": label_of(self.doc, index),
            "category": captions.get("category"),
            "short_caption": captions.get("short_caption"),
            "long_caption": captions.get("long_caption"),
            "views": views,
        }

    def answer(self, index: int, label: str) -> dict[str, Any]:
        if label not in LABELS:
            raise HTTPException(400, f"unknown label {label!r}: one of {', '.join(LABELS)}")
        if not 0 <= index < len(self.doc["items"]):
            raise HTTPException(404, f"no item {index}: the sample has {len(self.doc['items'])}")
        with self.lock:
            doc = set_label(self.doc, index, label)
            save_labels(self.labels_path, doc)  # saved before the page hears it was
            self.doc = doc
            return self.state()


def open_session(
    config: RunConfig,
    labels_path: Path,
    *,
    sample: int,
    seed: int,
    datasets: list[str] | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> AuditSession:
    """Resume the audit in `labels_path`, or draw a new sample and create the file. Raises LabelsError when the
    file was drawn with other settings, ValueError for an unknown dataset."""
    tags = data.audit_datasets(config, datasets)
    doc = load_labels(labels_path)
    if doc is not None:
        check_settings(doc, seed=seed, sample=sample, datasets=tags)
    else:
        items = draw_sample(data.captioned_keys(config, tags), sample, seed)
        doc = new_labels(items, seed=seed, sample=sample, datasets=tags, output_dir=config.output_dir)
        save_labels(labels_path, doc)
    keys = [(i["dataset"], i["product_id"]) for i in doc["items"]]
    details = data.load_details(config, keys)
    views = {k: [v["view_index"] for v in data.view_list(d)] for k, d in details.items()}
    images = data.cache_images(config, views, cache_dir or data.default_cache_dir(config), progress)
    return AuditSession(labels_path, doc, details, images)


class Answer(BaseModel):
    label: str


def create_app(session: AuditSession) -> FastAPI:
    app = FastAPI(title="FashionMV audit", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request, call_next):  # Starlette's middleware signature
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)  # none, and no 404 in the browser's console

    @app.get("/api/state")
    def state() -> dict[str, Any]:
        return session.state()

    @app.get("/api/items/{index}")
    def item(index: int) -> dict[str, Any]:
        return session.item(index)

    @app.put("/api/labels/{index}")
    def answer(index: int, body: Answer) -> dict[str, Any]:
        return session.answer(index, body.label)

    @app.get("/image/{dataset}/{product_id:path}/{view_index}")
    def image(dataset: str, product_id: str, view_index: int) -> FileResponse:
        found = session.images.get((dataset, product_id, view_index))
        if found is None or not found[0].exists():
            raise HTTPException(404, "no such image in the audit sample")
        return FileResponse(found[0], media_type=found[1])

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
