"""The build reader's DataFrame view: a table of every dataset at once, image bytes only when asked for."""

from pathlib import Path

from conftest import jpeg_bytes, write

from fashionmv_builder.core.build import INGEST_IMAGES, INGEST_PRODUCTS, TRIPLETS, Build, rejects
from fashionmv_builder.core.config import load_config
from fashionmv_builder.pipeline import run_local


def _ingested(tmp_path: Path) -> Build:
    """Two folder sources: shop (3 products) and outlet (2 products, one empty file rejected), 2 views each."""
    for dataset, products in (("shop", 3), ("outlet", 2)):
        for p in range(products):
            for v in range(2):
                write(tmp_path / dataset / f"p{p}" / f"{v}.jpg", jpeg_bytes(10 * p + v))
    write(tmp_path / "outlet" / "p0" / "2.jpg", b"")
    sources = "".join(f"  - {{kind: folder, dataset: {d}, root: {d}}}\n" for d in ("shop", "outlet"))
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: out\nshard_size: 2\nworkers: 1\nsources:\n{sources}")
    run_local(load_config(config), ["ingest"])
    return Build(str(tmp_path / "out"))


def test_frame_reads_every_dataset_and_leaves_image_bytes_out(tmp_path):
    build = _ingested(tmp_path)
    assert build.datasets(INGEST_IMAGES) == ["outlet", "shop"]

    images = build.frame(INGEST_IMAGES)
    assert len(images) == 10 and "image" not in images.columns
    assert images.groupby("dataset")["product_id"].nunique().to_dict() == {"outlet": 2, "shop": 3}
    assert str(images["phash"].dtype) == "uint64" and str(images["width"].dtype) == "int32"

    shop = build.frame(INGEST_IMAGES, "shop", with_images=True)
    assert len(shop) == 6 and set(shop["dataset"]) == {"shop"}
    row = shop.iloc[0]
    assert row["image"]["bytes"] == (tmp_path / "shop" / row["product_id"] / row["file_name"]).read_bytes()

    products = build.frame(INGEST_PRODUCTS, columns=["dataset", "n_views"])
    assert list(products.columns) == ["dataset", "n_views"]
    assert products.groupby("dataset")["n_views"].sum().to_dict() == {"outlet": 4, "shop": 6}
    assert build.frame(rejects("ingest"))[["dataset", "reason"]].values.tolist() == [["outlet", "empty_file"]]

    assert build.frame(TRIPLETS).empty and build.datasets(TRIPLETS) == []  # a stage that has not run
