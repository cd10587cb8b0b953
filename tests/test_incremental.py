"""Incremental builds: a catalogue that changes costs only its change (README "Updating a build").

One sample catalogue in the folder layout, built with the ground-truth answering server as the LMM (so triplets are
real selections), then changed the way a shop's catalogue changes:

    first build      without 20 products whose ids fall between the others'
    + 10%            the 20 come back: only their shards are written, only they are asked about
    − 5%             10 products that are targets of others disappear: nothing is asked, nothing refers to them
    refresh 10%      one seeded slice of the existing sources is mined again; the same refresh again asks nothing
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fashionmv_builder.core.build import (
    CANDIDATES,
    CAPTIONS,
    DEDUPE_PRODUCTS,
    HARD_NEGATIVES,
    INGEST_PRODUCTS,
    TRIPLETS,
    VERDICTS,
    Build,
    TableRef,
)
from fashionmv_builder.core.config import RefreshSlice, RunConfig, validate_config
from fashionmv_builder.devtools.ground_truth_server import MODEL_NAME, TRUTH_WORDS, serve_ground_truth
from fashionmv_builder.devtools.sample_catalogue import generate_sample
from fashionmv_builder.outputs.publish import REPO_DIR, PublishOptions, publish
from fashionmv_builder.pipeline import run_local

pytestmark = pytest.mark.slow

DATASET = "folder"
LMM_STAGES = ("caption", "verify", "select", "discriminate")


def _config(root: Path, out: Path, url: str, refresh: RefreshSlice | None = None) -> RunConfig:
    return validate_config(
        {
            "name": "incremental",
            "output_dir": str(out),
            "shard_size": 25,
            "workers": 2,
            "sources": [{"kind": "folder", "dataset": DATASET, "root": str(root)}],
            "lmm": {"endpoints": [url], "model": MODEL_NAME, "words": TRUTH_WORDS, "breaker_min_products": 50},
            "triplets": {
                "val_ratio": 0.3,
                "top_k": 4,
                "refresh": refresh.model_dump() if refresh else None,
            },
        }
    )


def _files(out: Path) -> dict[str, str]:
    """sha256 of every Parquet file of the build."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.parquet")}


def _rows(build: Build, ref: TableRef, key: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in build.rows(ref, DATASET):
        found.setdefault(row[key], []).append(row)
    return found


def _publish(config: RunConfig, root: Path) -> dict[str, str]:
    """The Hub repo folder a publish with images would upload (a dry run): sha256 of each data file."""
    publish(config, PublishOptions(repo_id="org/incremental", with_images=True), dry_run=True, root=root)
    folder = root / REPO_DIR / "data"
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.parquet")}


class Snapshot:
    """A build after one run: its run report, files and the rows later runs must keep."""

    def __init__(self, out: Path, reports: dict) -> None:
        build = Build(str(out))
        self.run = {stage: rs[0].run for stage, rs in reports.items()}
        self.stats = {stage: rs[0].stats for stage, rs in reports.items()}
        self.files = _files(out)
        self.captions = _rows(build, CAPTIONS, "product_id")
        self.triplets = _rows(build, TRIPLETS, "source_id")
        self.negatives = _rows(build, HARD_NEGATIVES, "source_id")
        self.candidates = _rows(build, CANDIDATES, "product_id")
        self.ingest_shards = build.shard_members(INGEST_PRODUCTS, DATASET)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("incremental")
    catalogue = base / "catalogue"
    generate_sample(catalogue, products=200, seed=0)
    root, aside = catalogue / "folder", base / "aside"
    aside.mkdir()
    products = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("p"))
    added = products[5::10]  # ids interleaved with the others
    for name in added:
        shutil.move(root / name, aside / name)
    out = base / "out"
    snaps: dict = {"added": set(added)}
    with serve_ground_truth(catalogue, media_root=base, wrong_share=0.1) as (url, _answerer):
        snaps["first"] = Snapshot(out, run_local(_config(root, out, url)))
        snaps["published_first"] = _publish(_config(root, out, url), base / "publish-first")
        for name in added:
            shutil.move(aside / name, root / name)
        snaps["grown"] = Snapshot(out, run_local(_config(root, out, url)))
        snaps["published_grown"] = _publish(_config(root, out, url), base / "publish-grown")

        build = Build(str(out))
        single = {r["product_id"] for r in build.rows(DEDUPE_PRODUCTS, DATASET) if r["cluster_size"] == 1}
        targets = sorted({t["target_id"] for t in build.rows(TRIPLETS, DATASET)} & single)
        withdrawn = targets[:10]
        assert len(withdrawn) == 10, "the sample should have enough triplet targets"
        for name in withdrawn:
            shutil.move(root / name, aside / name)
        snaps["withdrawn"] = set(withdrawn)
        snaps["shrunk"] = Snapshot(out, run_local(_config(root, out, url)))

        refresh = RefreshSlice(share=0.1, slice=1)
        snaps["refresh"] = refresh
        snaps["refreshed"] = Snapshot(out, run_local(_config(root, out, url, refresh)))
        snaps["refreshed_again"] = Snapshot(out, run_local(_config(root, out, url, refresh)))
        snaps["out"] = out
    yield snaps


def test_adding_products_redoes_only_their_shards_and_asks_only_about_them(runs):
    first, grown, added = runs["first"], runs["grown"], runs["added"]
    assert grown.stats["ingest"]["change"] == {"added": 20, "kept": 180, "withdrawn": 0}
    # Every product keeps its shard; the new ones top up the last shard and fill new ones.
    for shard, members in first.ingest_shards.items():
        assert members <= grown.ingest_shards[shard]
    holding_new = {s for s, members in grown.ingest_shards.items() if members & added}
    assert grown.run["ingest"]["shards_redone"] == len(holding_new) < len(grown.ingest_shards)
    # The old products of a topped-up shard are not read and decoded again.
    assert grown.run["ingest"]["counts"]["views_not_read_again"] > 0
    assert grown.run["dedupe"]["shards_rewritten"] <= len(holding_new)
    # Captions and verdicts: requests only for new products (old ones in a topped-up shard are replayed).
    new_captioned = added & set(grown.captions)
    assert 0 < grown.run["caption"]["counts"]["requests_sent"] <= len(new_captioned) * 3  # with its re-asks
    for stage in ("caption", "verify"):
        assert grown.run[stage]["shards_redone"] == len(holding_new)
    # Stage 3: one request (plus re-asks) per new source, none for an existing one.
    select = grown.run["select"]["counts"]
    old_sources = set(first.candidates)
    new_sources = set(grown.candidates) - old_sources
    assert new_sources and new_sources <= added
    assert select["answers_carried_over"] == len(old_sources)
    assert select["requests_sent"] + select["answers_replayed"] <= len(new_sources) * 3
    assert grown.stats["candidates"]["sources"] == {"carried_over": len(old_sources), "mined": len(new_sources)}


def test_existing_captions_triplets_and_hard_negatives_are_byte_identical(runs):
    first, grown, added = runs["first"], runs["grown"], runs["added"]
    for pid, rows in first.captions.items():
        assert grown.captions[pid] == rows
    for pid, rows in first.triplets.items():
        assert grown.triplets[pid] == rows, f"{pid}'s triplets changed"
    for pid, rows in first.negatives.items():
        assert grown.negatives[pid] == rows
    # No new product became a target of an existing source (only a refresh does that).
    for pid in first.candidates:
        assert not {t["target_id"] for t in grown.triplets.get(pid, [])} & added
    # Shards of untouched products kept their files, for every stage up to Stage 1.
    untouched = [s for s, members in grown.ingest_shards.items() if not members & added]
    for shard in untouched:
        for path, sha in first.files.items():
            if path.endswith(f"part-{shard:05d}.parquet") and path.split("/")[0] in ("ingest", "dedupe", "caption"):
                assert grown.files[path] == sha, path


def test_withdrawing_products_asks_nothing_and_leaves_no_reference(runs):
    shrunk, withdrawn = runs["shrunk"], runs["withdrawn"]
    assert shrunk.stats["ingest"]["change"]["withdrawn"] == len(withdrawn)
    for stage in LMM_STAGES:
        assert shrunk.run[stage]["counts"].get("requests_sent", 0) == 0, stage
    build = Build(str(runs["out"]))
    columns = ("product_id", "source_id", "target_id", "negative_id", "related_id")
    lists = ("candidate_ids", "union_ids")
    for stage in ("ingest", "dedupe", "caption", "verify", "embed", "candidates", "select"):
        for table in [*build.markers(stage, DATASET)[0].files]:
            for row in build.rows(TableRef(stage, table), DATASET):
                for column in columns:
                    assert row.get(column) not in withdrawn, (stage, table, row)
                for column in lists:
                    assert not set(row.get(column) or []) & withdrawn, (stage, table, column)
    # Sources that lost every target are rejected with their own reason; the others keep the rest.
    rejected = build.rows(TableRef("select", "rejects"), DATASET)
    assert all(r["product_id"] not in withdrawn for r in rejected)
    for pid, rows in shrunk.triplets.items():
        earlier = {t["triplet_id"] for t in runs["grown"].triplets[pid]}
        assert {t["triplet_id"] for t in rows} <= earlier
    assert build.rows(VERDICTS, DATASET)


def test_a_refresh_mines_exactly_its_slice_and_the_same_refresh_again_asks_nothing(runs):
    refresh, refreshed, again = runs["refresh"], runs["refreshed"], runs["refreshed_again"]
    sources = set(refreshed.candidates)
    slice_ = {pid for pid in sources if refresh.covers(pid, 0)}
    assert 0 < len(slice_) < len(sources) / 4
    assert refreshed.stats["candidates"]["sources"] == {
        "carried_over": len(sources) - len(slice_),
        "mined": len(slice_),
    }
    assert not any(r[0]["carried_over"] for pid, r in refreshed.candidates.items() if pid in slice_)
    assert refreshed.run["select"]["counts"]["answers_carried_over"] <= len(sources) - len(slice_)
    for stage in LMM_STAGES:
        assert again.run[stage]["counts"].get("requests_sent", 0) == 0, stage
    assert again.triplets == refreshed.triplets


def test_the_build_keeps_a_history_of_its_runs(runs):
    history = Build(str(runs["out"])).runs()
    assert len(history) == 5
    assert [h["stages"]["ingest"][DATASET].get("change", {}).get("added") for h in history] == [180, 20, 0, None, None]
    assert history[2]["stages"]["ingest"][DATASET]["change"]["withdrawn"] == 10
    assert history[1]["stages"]["select"][DATASET]["answers_carried_over"] > 0


def test_publishing_an_increment_uploads_unchanged_image_shards_as_the_same_bytes(runs):
    """The Hub stores files by content: an image shard with the same bytes is not sent again, whatever its name."""
    first, grown = runs["published_first"], runs["published_grown"]
    images_first = {sha for path, sha in first.items() if path.startswith("products/")}
    images_grown = {sha for path, sha in grown.items() if path.startswith("products/")}
    shards_with_new = {s for s, members in runs["grown"].ingest_shards.items() if members & runs["added"]}
    splits = 2
    assert len(images_grown - images_first) <= len(shards_with_new) * splits
    assert len(images_first & images_grown) >= len(images_first) - len(shards_with_new) * splits > 0
