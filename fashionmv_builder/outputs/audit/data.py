"""Reading what the audit needs from a build: the captioned products, their captions and kept views, the image
bytes of the sampled views (copied once to a local cache, one ingest shard at a time), and the verdicts."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fashionmv_builder.core.build import CAPTIONS, DEDUPE_VIEWS, INGEST_IMAGES, VERDICTS, Build
from fashionmv_builder.core.config import RunConfig
from fashionmv_builder.core.files import atomic_write

Key = tuple[str, str]  # (dataset, product_id)

MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}


def audit_datasets(config: RunConfig, wanted: list[str] | None) -> list[str]:
    """The configured dataset tags, or those of them asked for; an unknown tag is an error, not an empty audit."""
    tags = [s.dataset for s in config.sources]
    unknown = sorted(set(wanted or []) - set(tags))
    if unknown:
        raise ValueError(f"unknown dataset {', '.join(unknown)}: the config has {', '.join(tags)}")
    return sorted(set(wanted)) if wanted else sorted(set(tags))


def captioned_keys(config: RunConfig, datasets: list[str]) -> list[Key]:
    """Every product with a Stage-1 caption: the audit's population (the verifier's removals are still in it)."""
    build = Build(config.output_dir)
    keys = []
    for dataset in datasets:
        table = build.read(CAPTIONS, dataset, columns=["product_id"])
        if table.num_rows:
            keys += [(dataset, pid) for pid in table.column("product_id").to_pylist()]
    return keys


def load_details(config: RunConfig, items: list[Key]) -> dict[Key, dict[str, Any]]:
    """Captions and view list of each item. No verdict is read here: the page must not be able to show one."""
    build = Build(config.output_dir)
    details: dict[Key, dict[str, Any]] = {k: {"captions": None, "kept": []} for k in items}
    for dataset in sorted({d for d, _ in items}):
        wanted = {p for d, p in items if d == dataset}
        columns = ["product_id", "short_caption", "long_caption", "category", "view_captions"]
        for row in build.rows(CAPTIONS, dataset, columns):
            if row["product_id"] in wanted:
                details[(dataset, row["product_id"])]["captions"] = row
        for row in build.rows(DEDUPE_VIEWS, dataset, ["product_id", "view_index", "file_name", "view"]):
            if row["product_id"] in wanted:
                details[(dataset, row["product_id"])]["kept"].append(row)
    return details


def view_list(detail: dict[str, Any]) -> list[dict[str, Any]]:
    """The kept views with their per-view captions, in view order; a captioned view that was not kept (should not
    happen) is still listed, so no caption text is hidden from the auditor."""
    captions = detail["captions"] or {}
    per_view = {v["view_index"]: v for v in captions.get("view_captions") or [] if v}
    kept = {v["view_index"]: v for v in detail["kept"]}
    out = []
    for index in sorted(set(kept) | set(per_view)):
        k, c = kept.get(index, {}), per_view.get(index, {})
        out.append(
            {
                "view_index": index,
                "kept": index in kept,
                "file_name": k.get("file_name"),
                "view": k.get("view"),
                "view_type": c.get("view_type"),
                "wearer_left_on_image": c.get("wearer_left_on_image"),
                "caption": c.get("caption"),
            }
        )
    return out


def default_cache_dir(config: RunConfig) -> Path:
    """One image cache per build under the temp folder, so a restarted audit starts at once."""
    tag = hashlib.sha256(config.output_dir.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "fashionmv-audit" / tag


def cache_images(
    config: RunConfig,
    views: dict[Key, list[int]],
    cache_dir: Path,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[tuple[str, str, int], tuple[Path, str]]:
    """Copy the bytes of the wanted views to `cache_dir` (named by their sha256) and map each view to its file and
    media type. An ingest shard's image column is read only when one of its wanted views is not cached yet."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    build = Build(config.output_dir)
    found: dict[tuple[str, str, int], tuple[Path, str]] = {}
    for dataset in sorted({d for d, _ in views}):
        wanted = {(p, i) for (d, p), indices in views.items() if d == dataset for i in indices}
        for marker in build.markers(INGEST_IMAGES, dataset):
            columns = ["product_id", "view_index", "sha256", "format"]
            targets = {}
            for row in build.read_shard(INGEST_IMAGES, dataset, marker.shard, columns).to_pylist():
                if (row["product_id"], row["view_index"]) in wanted:
                    media = MEDIA_TYPES.get((row["format"] or "").upper(), "application/octet-stream")
                    path = cache_dir / f"{row['sha256']}.{(row['format'] or 'bin').lower()}"
                    targets[(row["product_id"], row["view_index"])] = (path, media)
            missing = {k for k, (path, _) in targets.items() if not path.exists()}
            if missing:
                progress(f"caching {len(missing)} images from {dataset} shard {marker.shard}")
                part = build.read_shard(INGEST_IMAGES, dataset, marker.shard, ["product_id", "view_index", "image"])
                for row in part.to_pylist():
                    key = (row["product_id"], row["view_index"])
                    if key in missing and row["image"] and row["image"]["bytes"]:
                        atomic_write(targets[key][0], row["image"]["bytes"])
            for (pid, index), (path, media) in targets.items():
                if path.exists():
                    found[(dataset, pid, index)] = (path, media)
    return found


def read_verdicts(config: RunConfig, datasets: list[str]) -> dict[Key, str]:
    build = Build(config.output_dir)
    verdicts = {}
    for dataset in datasets:
        for row in build.rows(VERDICTS, dataset, ["product_id", "verdict"]):
            verdicts[(dataset, row["product_id"])] = row["verdict"]
    return verdicts
