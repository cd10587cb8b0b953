"""The caption scorer must be right, whatever the model: perfect captions score 1, mirrored ones 0."""

from fashionmv_builder.devtools.score_captions import score_product, summarise

TRUTH = {
    "colour": "pink",
    "category": "tee",
    "pocket": "left",
    "back_detail": "zip",
    "is_clothing": True,
    "views": ["front", "side", "back", "detail"],
    "files": {"folder": ["1_front.jpg", "2_side.jpg", "3_back.jpg", "4_detail.jpg"]},
}
VIEWS = [{"view_index": i, "file_name": f} for i, f in enumerate(TRUTH["files"]["folder"])]


def _caption(front: str, back: str, text: str) -> dict:
    sides = [front, "not_visible", back, "not_visible"]
    return {
        "view_captions": [{"view_index": i, "wearer_left_on_image": s} for i, s in enumerate(sides)],
        "long_caption": text,
        "short_caption": "",
        "category": "t-shirt",
        "is_clothing": True,
    }


def test_correct_captions_score_one():
    good = _caption(
        "image_right", "image_left", "A pink tee with a chest pocket on the wearer's left and a zip at the back."
    )
    scores = score_product(TRUTH, "folder", good, VIEWS)
    assert scores == {
        "orientation_claims": 2,
        "orientation_correct": 2,
        "left_right_error": False,
        "colour": True,
        "category": True,
        "is_clothing": True,
        "pocket": True,
        "back_detail": True,
    }


def test_mirrored_captions_are_left_right_errors():
    bad = _caption("image_left", "image_right", "A blue shirt with a pocket on the right.")
    scores = score_product(TRUTH, "folder", bad, VIEWS)
    assert scores["orientation_correct"] == 0 and scores["left_right_error"]
    assert not scores["pocket"] and not scores["colour"] and not scores["back_detail"]


def test_verifier_precision_and_recall():
    rows = [
        {"product_id": "a", "orientation_claims": 2, "orientation_correct": 2, "left_right_error": False},
        {"product_id": "b", "orientation_claims": 2, "orientation_correct": 1, "left_right_error": True},
        {"product_id": "c", "orientation_claims": 2, "orientation_correct": 0, "left_right_error": True},
        {"product_id": "d", "orientation_claims": 2, "orientation_correct": 2, "left_right_error": False},
    ]
    summary = summarise(rows, {"a": "remove", "b": "remove", "c": "pass", "d": "pass"})
    assert summary["verifier_precision"] == 0.5  # a was removed wrongly
    assert summary["verifier_recall"] == 0.5  # c was missed
    assert summary["left_right_error_rate"] == 0.5
    assert summary["orientation_accuracy"] == 5 / 8
