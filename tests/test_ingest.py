"""Ingest on a small hand-made catalogue: rejects with reasons, conservation, and the resume rules."""

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
from conftest import jpeg_bytes, write
from test_images import png_header_bomb

from fashionmv_builder.core.config import RefreshSlice, load_config
from fashionmv_builder.core.shards import ShardStore
from fashionmv_builder.pipeline import run_local
from fashionmv_builder.stages.ingest.sources.base import RawProduct
from fashionmv_builder.stages.ingest.stage import assign_shards


def _catalogue(root: Path) -> None:
    for p in range(6):
        for v in range(3):
            write(root / f"p{p}" / f"{v}_view.jpg", jpeg_bytes(p * 10 + v, (96, 120)))
    write(root / "p1" / "3_view.jpg", b"")  # zero bytes
    write(root / "p2" / "3_view.jpg", jpeg_bytes(99)[:200])  # truncated
    write(root / "p3" / "3_view.png", png_header_bomb(30000, 30000))
    write(root / "p4" / "3_view.jpg", b"hello, I am text")
    write(root / "allbad" / "a.jpg", b"")
    write(root / "allbad" / "b.jpg", b"nope")
    write(root / "bad id!" / "a.jpg", jpeg_bytes(7))
    write(root / "notes" / "readme.txt", b"skipped: no image suffix")


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        "output_dir: out\nshard_size: 3\nworkers: 1\nsources:\n  - {kind: folder, dataset: shop, root: shop}\n" + extra
    )
    return path


def _files(out: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}


def test_ingest_rejects_conserves_and_resumes(tmp_path):
    _catalogue(tmp_path / "shop")
    cfg = load_config(_config(tmp_path))
    [report] = run_local(cfg, ["ingest"])["ingest"]
    counts = report.stats["counts"]
    assert report.shards == 3 and report.skipped == 0
    assert counts["products_in"] == 8
    assert counts["products_out"] == 6
    assert counts["products_in"] == counts["products_out"] + counts["products_rejected"]
    assert counts["views_in"] == 6 * 3 + 4 + 2 + 1
    assert counts["views_out"] == 18
    assert counts["views_in"] == counts["views_out"] + counts["views_rejected"] + counts["views_dropped_with_product"]
    assert report.stats["listing"]["files_skipped_suffix"] == 1

    store = ShardStore(cfg.output_dir, "ingest", "shop")
    rejects = store.read_table("rejects").to_pylist()
    by_key = {(r["product_id"], r["file_name"]): r["reason"] for r in rejects}
    assert by_key == {
        ("p1", "3_view.jpg"): "empty_file",
        ("p2", "3_view.jpg"): "corrupt_image",
        ("p3", "3_view.png"): "decompression_bomb",
        ("p4", "3_view.jpg"): "not_an_image",
        ("allbad", "a.jpg"): "empty_file",
        ("allbad", "b.jpg"): "not_an_image",
        ("allbad", None): "no_readable_views",
        ("bad id!", None): "invalid_product_id",
    }
    images = store.read_table("images")
    assert images.num_rows == 18
    assert images.schema.metadata[b"fashionmv.schema_version"] == b"1"
    assert b"huggingface" in images.schema.metadata
    first = images.slice(0, 1).to_pylist()[0]
    assert first["image"]["bytes"] == (tmp_path / "shop" / first["product_id"] / first["file_name"]).read_bytes()
    products = store.read_table("products").to_pylist()
    assert {p["product_id"]: p["n_views"] for p in products}["p1"] == 3

    # A rerun on finished output does no work and changes no file.
    before = _files(tmp_path / "out")
    [again] = run_local(load_config(_config(tmp_path)), ["ingest"])["ingest"]
    assert again.skipped == again.shards == 3
    assert _files(tmp_path / "out") == before

    # Touching one input redoes only the shard holding it.
    target = tmp_path / "shop" / "p5" / "0_view.jpg"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 1_000_000))
    [touched] = run_local(load_config(_config(tmp_path)), ["ingest"])["ingest"]
    assert touched.skipped == 2

    # A config change that affects ingest's output redoes the shards, and the new limit applies.
    [changed] = run_local(load_config(_config(tmp_path, "ingest:\n  max_image_pixels: 5000\n")), ["ingest"])["ingest"]
    assert changed.skipped == 0
    assert changed.stats["counts"]["rejected.decompression_bomb"] == 1 + 18
    marker = json.loads((tmp_path / "out" / "ingest" / "shop" / "_markers" / "part-00000.json").read_text())
    images = marker["files"]["images"]
    assert images["path"] == "images/part-00000.parquet"  # relative to the stage's dataset folder: relocatable
    assert pq.read_metadata(tmp_path / "out" / "ingest" / "shop" / images["path"]).num_rows == images["rows"]


def _listed(*ids: str) -> list[RawProduct]:
    return [RawProduct("d", pid, ()) for pid in ids]


def test_products_keep_their_shard_and_new_ones_top_up_the_last_then_fill_new_shards():
    first = assign_shards(_listed("a", "c", "e", "g", "i"), {}, 2)
    assert {s: [p.product_id for p in ps] for s, ps in first.items()} == {0: ["a", "c"], 1: ["e", "g"], 2: ["i"]}
    previous = {s: {p.product_id for p in ps} for s, ps in first.items()}
    grown = assign_shards(_listed("a", "b", "c", "d", "e", "f", "g", "i"), previous, 2)
    assert {s: [p.product_id for p in ps] for s, ps in grown.items()} == {
        0: ["a", "c"],
        1: ["e", "g"],
        2: ["b", "i"],  # the last shard topped up; listing order inside it
        3: ["d", "f"],
    }
    # A withdrawn product leaves a smaller shard; a shard with no product left is gone.
    shrunk = assign_shards(_listed("a", "e", "g"), {s: {p.product_id for p in ps} for s, ps in grown.items()}, 2)
    assert {s: [p.product_id for p in ps] for s, ps in shrunk.items()} == {0: ["a"], 1: ["e", "g"]}


def test_a_refresh_slice_is_seeded_stable_and_the_slices_cover_every_source_once():
    ids = [f"p{i:05d}" for i in range(2000)]
    slices = [RefreshSlice(share="10%", slice=n) for n in range(10)]
    covering = [[s for s in slices if s.covers(pid, seed=0)] for pid in ids]
    assert all(len(c) == 1 for c in covering)
    sizes = [sum(s.covers(pid, 0) for pid in ids) for s in slices]
    assert min(sizes) > 150 and max(sizes) < 250
    assert RefreshSlice(share="all").covers("x", 0) and RefreshSlice(share=0.1, slice=13).slice == 13
    assert [pid for pid in ids if slices[3].covers(pid, 1)] != [pid for pid in ids if slices[3].covers(pid, 0)]
