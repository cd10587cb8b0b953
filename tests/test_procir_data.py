"""FashionMV's JSONL records and image folders, read the way the reference evaluator reads them."""

import json
import random
from pathlib import Path

from PIL import Image

from fashionmv_builder.procir.data import Triplet, list_views, load_eval_data, load_views, read_captions, read_triplets


def _jsonl(path: Path, records: list[dict | None]) -> Path:
    """One JSON object per line; None writes a blank line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(("" if r is None else json.dumps(r)) + "\n" for r in records))
    return path


def _image(path: Path, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (40, 30), 128).save(path)
    return path


def test_triplets_ids_become_strings_and_optional_fields_are_optional(tmp_path):
    path = _jsonl(
        tmp_path / "val_triplets.jsonl",
        [
            {"source_id": 90456812, "target_id": "90456813", "dataset": "f200k", "modification_text_short": "red"},
            {
                "dataset": "deepfashion",
                "source_id": "WOMEN/Dresses/id_00004544/02",
                "target_id": "WOMEN/Dresses/id_00001234/01",
                "modification_text_short": "shorter",
                "modification_text_long": "make it much shorter",
                "views_involved": ["back", "front"],
                "some_future_key": {"x": 1},
            },
            None,
            {"source_id": 1, "target_id": 2, "dataset": "fashiongen_val", "modification_text_short": "blue"},
        ],
    )
    first, second, third = read_triplets(path)
    assert (first.index, first.source_id, first.target_id) == (0, "90456812", "90456813")
    assert first.modification_text_long is None and first.views_involved is None
    assert second.modification_text_long == "make it much shorter"
    assert second.views_involved == ("back", "front")
    assert third.index == 2  # a blank line is not a record
    # The index counts every record of the file, so it survives a dataset filter.
    assert [t.index for t in read_triplets(path, datasets=["fashiongen_val"])] == [2]


def test_captions_keyed_by_dataset_and_string_id(tmp_path):
    path = _jsonl(
        tmp_path / "val_captions.jsonl",
        [
            {"product_id": 95636, "dataset": "fashiongen_val", "short_caption": "a coat"},
            {"product_id": "7", "dataset": "f200k", "short_caption": "a top", "long_caption": "", "extra": 1},
        ],
    )
    captions = read_captions(path)
    assert captions[("fashiongen_val", "95636")].short_caption == "a coat"
    assert captions[("f200k", "7")].long_caption is None


def test_views_are_the_first_five_by_plain_string_sort(tmp_path):
    folder = tmp_path / "fashiongen_val" / "95636"
    for name in ("999.jpg", "1000.jpg", "x_2.jpeg", "x_10.JPEG", "b.png", "a.webp"):
        _image(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.jpg").mkdir()  # a folder with an image suffix is not a view
    views = list_views(tmp_path, "fashiongen_val", "95636")
    # Plain string order: "1000.jpg" < "999.jpg" and "x_10" < "x_2"; the sixth view ("x_2.jpeg") is left out.
    assert [p.name for p in views] == ["1000.jpg", "999.jpg", "a.webp", "b.png", "x_10.JPEG"]


def test_missing_or_empty_folders_have_no_views(tmp_path):
    (tmp_path / "f200k" / "empty").mkdir(parents=True)
    assert list_views(tmp_path, "f200k", "empty") == []
    assert list_views(tmp_path, "f200k", "absent") == []


def test_deepfashion_ids_are_nested_paths(tmp_path):
    _image(tmp_path / "deepfashion" / "WOMEN" / "Dresses" / "id_00004544" / "02" / "02_1_front.jpg")
    assert [p.name for p in list_views(tmp_path, "deepfashion", "WOMEN/Dresses/id_00004544/02")] == ["02_1_front.jpg"]


def test_views_load_as_rgb(tmp_path):
    paths = [_image(tmp_path / "a.png", "RGBA"), _image(tmp_path / "b.png", "L")]
    assert [img.mode for img in load_views(paths)] == ["RGB", "RGB"]


def test_gallery_keeps_products_whose_partner_has_no_images(tmp_path):
    for pid in ("1", "2", "3"):
        _image(tmp_path / "images" / "f200k" / pid / f"{pid}_0.jpeg")
    _jsonl(
        tmp_path / "data" / "val_triplets.jsonl",
        [
            {"source_id": 1, "target_id": 2, "dataset": "f200k", "modification_text_short": "a"},
            {"source_id": 3, "target_id": 4, "dataset": "f200k", "modification_text_short": "b"},  # 4 has no images
            {"source_id": 2, "target_id": 1, "dataset": "deepfashion", "modification_text_short": "c"},  # not selected
        ],
    )
    data = load_eval_data(tmp_path / "data", tmp_path / "images", datasets=["f200k"])
    assert data.gallery == [("f200k", "1"), ("f200k", "2"), ("f200k", "3")]
    assert [(t.index, t.source_id, t.target_id) for t in data.queries] == [(0, "1", "2")]


def test_a_step_draws_one_of_a_triplets_paraphrases_reproducibly():
    triplet = Triplet(0, "shop", "a", "b", "first text", paraphrases=("first text", "second one", "third way"))
    draws = [triplet.short_text(random.Random(f"0:paraphrase:{step}")) for step in range(60)]
    assert set(draws) == set(triplet.paraphrases)  # every paraphrase is used, not only stored
    assert draws == [triplet.short_text(random.Random(f"0:paraphrase:{step}")) for step in range(60)]
    assert Triplet(1, "shop", "a", "b", "only text").short_text(random.Random(0)) == "only text"  # FashionMV's release
