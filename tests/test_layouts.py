"""Hand-written fixtures of each source's real layout, independent of the sample generator."""

import h5py
import numpy as np
from conftest import jpeg_bytes, write

from fashionmv_builder.core.config import (
    DeepFashionSource,
    Fashion200kSource,
    FashionGenSource,
    FolderSource,
    validate_config,
)
from fashionmv_builder.core.shards import ShardStore
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.pipeline import run_local
from fashionmv_builder.stages.ingest.sources.deepfashion import DeepFashionCrawler
from fashionmv_builder.stages.ingest.sources.fashion200k import Fashion200kCrawler
from fashionmv_builder.stages.ingest.sources.fashiongen import FashionGenCrawler
from fashionmv_builder.stages.ingest.sources.folder import FolderCrawler


def _listing(crawler) -> dict[str, list[str]]:
    return {p.product_id: [v.file_name for v in p.views] for p in crawler.list_products()}


def test_deepfashion_regroups_by_colour_prefix(tmp_path):
    item = tmp_path / "img" / "WOMEN" / "Dresses" / "id_00004544"
    names = ["02_1_front.jpg", "02_2_side.jpg", "02_3_back.jpg", "02_4_full.jpg", "02_7_additional.jpg"]
    for i, name in enumerate([*names, "01_1_front.jpg", "01_3_back.jpg"]):
        write(item / name, jpeg_bytes(i))
    write(item / "README.txt", b"not a view")
    tee = tmp_path / "img" / "MEN" / "Tees_Tanks" / "id_00000080"
    for i, name in enumerate(["01_1_front.jpg", "01_2_side.jpg", "01_3_back.jpg"]):
        write(tee / name, jpeg_bytes(10 + i))
    crawler = DeepFashionCrawler(
        DeepFashionSource(kind="deepfashion", dataset="deepfashion", root=tmp_path / "img"), 10**7
    )
    products = {p.product_id: p for p in crawler.list_products()}
    assert list(products) == [
        "MEN/Tees_Tanks/id_00000080/01",
        "WOMEN/Dresses/id_00004544/01",
        "WOMEN/Dresses/id_00004544/02",
    ]
    dress = products["WOMEN/Dresses/id_00004544/02"]
    assert [v.file_name for v in dress.views] == [
        "02_1_front.jpg",
        "02_2_side.jpg",
        "02_3_back.jpg",
        "02_4_full.jpg",
        "02_7_additional.jpg",
    ]
    assert [v.view for v in dress.views] == ["front", "side", "back", "full", "additional"]
    # colour variants of one item share a group key so a split keeps them together
    assert dress.group_key == products["WOMEN/Dresses/id_00004544/01"].group_key == "WOMEN/Dresses/id_00004544"
    assert dress.category == "Dresses"
    assert crawler.listing_counts["files_skipped_suffix"] == 1


def test_fashion200k_groups_by_product_id_with_plain_string_sort(tmp_path):
    folder = tmp_path / "women" / "dresses" / "casual_and_day_dresses" / "51727804"
    for k in (0, 1, 2, 10):
        write(folder / f"51727804_{k}.jpeg", jpeg_bytes(k))
    write(tmp_path / "women" / "tops" / "blouses" / "90456812" / "90456812_0.jpeg", jpeg_bytes(20))
    write(tmp_path / "women" / "tops" / "blouses" / "90456812" / "90456812_1.jpeg", jpeg_bytes(21))
    crawler = Fashion200kCrawler(Fashion200kSource(kind="fashion200k", dataset="f200k", root=tmp_path), 10**7)
    assert _listing(crawler) == {
        "51727804": ["51727804_0.jpeg", "51727804_1.jpeg", "51727804_10.jpeg", "51727804_2.jpeg"],
        "90456812": ["90456812_0.jpeg", "90456812_1.jpeg"],
    }
    assert next(iter(crawler.list_products())).category == "dresses/casual_and_day_dresses"


def test_fashiongen_rows_become_views_named_by_global_row_index(tmp_path):
    n = 1002
    pids = np.zeros((n, 1), dtype=np.int32)
    pids[0:3] = 12
    pids[3:998] = 555
    pids[998:1002] = 95636
    images = np.zeros((n, 16, 16, 3), dtype=np.uint8)
    images[:, :, :, 0] = (np.arange(n) % 256)[:, None, None]
    path = tmp_path / "fashiongen_256_256_validation.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("input_productID", data=pids)
        h5.create_dataset("input_image", data=images)
        h5.create_dataset("input_category", data=np.array([[b"SWEATERS"]] * n, dtype="S16"))
    crawler = FashionGenCrawler(
        FashionGenSource(kind="fashiongen", dataset="fashiongen_val", path=path, split="val"), 1
    )
    products = {p.product_id: p for p in crawler.list_products()}
    assert list(products) == ["12", "555", "95636"]
    assert [v.file_name for v in products["95636"].views] == ["1000.jpg", "1001.jpg", "998.jpg", "999.jpg"]
    assert [v.file_name for v in products["12"].views] == ["0.jpg", "1.jpg", "2.jpg"]
    assert products["95636"].split == "val" and products["95636"].category == "SWEATERS"
    got = dict(crawler.read_views(products["95636"].views))
    assert all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in got.values())


def test_folder_tree_nested_ids_unsafe_names_and_symlinks(tmp_path):
    root = tmp_path / "shop"
    write(root / "p1" / "front.jpg", jpeg_bytes(1))
    write(root / "p1" / "back.jpg", jpeg_bytes(2))
    write(root / "brand" / "p2" / "1.jpg", jpeg_bytes(3))
    write(root / "brand" / "p2" / "2.png", jpeg_bytes(4))
    write(root / "bad id!" / "a.jpg", jpeg_bytes(5))
    outside = write(tmp_path / "secret" / "x.jpg", jpeg_bytes(6))
    write(root / "p3" / "a.jpg", jpeg_bytes(7))
    (root / "p3" / "b.jpg").symlink_to(outside)
    (root / "p4").symlink_to(tmp_path / "secret", target_is_directory=True)
    crawler = FolderCrawler(FolderSource(kind="folder", dataset="shop", root=root), 10**7)
    products = {p.product_id: p for p in crawler.list_products()}
    assert sorted(products) == ["bad id!", "brand/p2", "p1", "p3", "p4"]
    assert [v.view for v in products["p1"].views] == ["back", "front"]
    assert products["bad id!"].problem.reason == RejectReason.INVALID_PRODUCT_ID
    assert products["p3"].views[1].problem.reason == RejectReason.UNSAFE_PATH
    assert products["p3"].views[0].problem is None
    assert products["p4"].problem.reason == RejectReason.UNSAFE_PATH and products["p4"].views == ()


def test_missing_root_is_a_clear_error(tmp_path):
    crawler = FolderCrawler(FolderSource(kind="folder", dataset="shop", root=tmp_path / "nope"), 10)
    try:
        list(crawler.list_products())
    except FileNotFoundError as err:
        assert "nope" in str(err)
    else:
        raise AssertionError("a missing root must raise")


def test_view_sort_is_plain_string_sort(tmp_path):
    for name in ("x_10.jpeg", "x_2.jpeg", "x_1.jpeg"):
        write(tmp_path / "p" / name, jpeg_bytes(1))
    crawler = FolderCrawler(FolderSource(kind="folder", dataset="d", root=tmp_path), 10**7)
    assert _listing(crawler) == {"p": ["x_1.jpeg", "x_10.jpeg", "x_2.jpeg"]}


def test_folder_with_a_unicode_name_ingests_and_unsafe_names_still_fail(tmp_path):
    root = tmp_path / "shop"
    write(root / "robe d'été 夏" / "front.jpg", jpeg_bytes(1))
    write(root / "robe d'été 夏" / "back.jpg", jpeg_bytes(2))
    write(root / "bad\x1bname" / "a.jpg", jpeg_bytes(3))
    write(root / "two\nlines" / "a.jpg", jpeg_bytes(4))
    write(root / "‥" / "a.jpg", jpeg_bytes(5))  # two-dot leader: `..` once NFKC-normalised
    crawler = FolderCrawler(FolderSource(kind="folder", dataset="shop", root=root), 10**7)
    products = {p.product_id: p for p in crawler.list_products()}
    dress = products["robe d'été 夏"]
    assert dress.problem is None
    assert [v.file_name for v in dress.views] == ["back.jpg", "front.jpg"]
    got = dict(crawler.read_views(dress.views))
    assert all(isinstance(b, bytes) for b in got.values())
    for bad in ("bad\x1bname", "two\nlines", "‥"):
        assert products[bad].problem.reason == RejectReason.INVALID_PRODUCT_ID, bad

    # Through the ingest stage: the dress is kept under its own name, the others are rejected with their reason.
    config = validate_config(
        {
            "output_dir": str(tmp_path / "out"),
            "workers": 1,
            "sources": [{"kind": "folder", "dataset": "shop", "root": str(root)}],
        }
    )
    [report] = run_local(config, ["ingest"])["ingest"]
    assert report.error is None
    store = ShardStore(config.output_dir, "ingest", "shop")
    assert [p["product_id"] for p in store.read_table("products").to_pylist()] == ["robe d'été 夏"]
    rejects = {r["product_id"]: r["reason"] for r in store.read_table("rejects").to_pylist()}
    assert rejects == dict.fromkeys(("bad\x1bname", "two\nlines", "‥"), "invalid_product_id")
