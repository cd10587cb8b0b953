"""Crawlers: one per source layout, all producing `RawProduct`s (see base.py)."""

from __future__ import annotations

from fashionmv_builder.core.config import RunConfig, SourceConfig
from fashionmv_builder.stages.ingest.sources.base import Source


def make_source(source: SourceConfig, config: RunConfig) -> Source:
    # Imported here so that a run touching one layout does not import every crawler's dependencies.
    limit = config.ingest.max_file_bytes
    match source.kind:
        case "deepfashion":
            from fashionmv_builder.stages.ingest.sources.deepfashion import DeepFashionCrawler

            return DeepFashionCrawler(source, limit)
        case "fashion200k":
            from fashionmv_builder.stages.ingest.sources.fashion200k import Fashion200kCrawler

            return Fashion200kCrawler(source, limit)
        case "fashiongen":
            from fashionmv_builder.stages.ingest.sources.fashiongen import FashionGenCrawler

            return FashionGenCrawler(source, limit)
        case "folder":
            from fashionmv_builder.stages.ingest.sources.folder import FolderCrawler

            return FolderCrawler(source, limit)
        case "manifest":
            from fashionmv_builder.stages.ingest.sources.manifest import ManifestCrawler

            return ManifestCrawler(source, config.http, limit)
    raise ValueError(f"unknown source kind {source.kind!r}")
