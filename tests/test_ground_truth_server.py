"""The ground-truth answering server's answers, without HTTP: they fit the schemas the stages send, and they say what
the truth says about the product the images belong to (tests/test_semantics.py runs it behind a real build)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fashionmv_builder.data_schema.lmm_answers import (
    WordBounds,
    caption_answer,
    discrimination_answer,
    schema_of,
    selection_answer,
    verdict_answer,
    words,
)
from fashionmv_builder.devtools.ground_truth_server import (
    Answerer,
    GroundTruth,
    Seen,
    difference_views,
    word_bounds,
)
from fashionmv_builder.devtools.sample_catalogue import generate_sample
from fashionmv_builder.lmm.media import fit_to_pixels

BOUNDS = WordBounds(view_caption=(3, 10), long_caption=(10, 24), short_caption=(4, 10), modification_short=(4, 12))
BUDGET = 256 * 320


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> GroundTruth:
    folder = tmp_path_factory.mktemp("catalogue")
    generate_sample(folder, products=30, seed=3)
    truth = GroundTruth(folder, (BUDGET,))
    truth.folder = folder  # type: ignore[attr-defined]
    return truth


def seen(truth: GroundTruth, product: dict) -> list[Seen]:
    """What the server sees of a product's deepfashion files, prepared as the client prepares them."""
    files = [truth.folder / path for path in product["paths"]["deepfashion"]]  # type: ignore[attr-defined]
    return [truth.see(hashlib.sha256(fit_to_pixels(f.read_bytes(), BUDGET)).hexdigest()) for f in files]


def products(truth: GroundTruth, role: str) -> list[dict]:
    return [p for p in truth.products.values() if p["role"] == role and len(p["renders"]) >= 3]


@pytest.mark.parametrize("low,high", [(1, 1), (2, 6), (16, 32), (200, 400)])
def test_word_bounds_are_read_back_from_the_schema_pattern(low, high):
    assert word_bounds({"pattern": words(low, high).__metadata__[0].pattern}) == (low, high)


def test_a_caption_names_each_views_truth_and_the_verifier_passes_it(truth):
    p = products(truth, "sibling")[0]
    model = caption_answer(BOUNDS, len(p["renders"]))
    answer = model.model_validate(Answerer(truth, 0.0, 0).caption(schema_of(model), seen(truth, p)))
    assert [v.view_type for v in answer.views] == [r if not r.startswith("detail") else "detail" for r in p["renders"]]
    assert answer.category == p["category"] and answer.long_caption.split()[:2] == [p["colour"], p["pattern"]]
    verdict = verdict_answer(BOUNDS)
    claims = json.loads(answer.model_dump_json())
    got = verdict.model_validate(Answerer(truth, 0.0, 0).verify(schema_of(verdict), seen(truth, p), claims))
    assert (got.verdict, got.wrong_claims) == ("pass", [])


def test_the_verifier_flags_planted_claims_and_captions_of_misordered_views(truth):
    p = products(truth, "sibling")[0]
    model = caption_answer(BOUNDS, len(p["renders"]))
    verdict = verdict_answer(BOUNDS)
    planted = Answerer(truth, 1.0, 0).caption(schema_of(model), seen(truth, p))  # every product gets a wrong claim
    got = verdict.model_validate(Answerer(truth, 0.0, 0).verify(schema_of(verdict), seen(truth, p), planted))
    assert got.verdict == "remove" and any("left_on=image_left" in c for c in got.wrong_claims)
    honest = Answerer(truth, 0.0, 0).caption(schema_of(model), seen(truth, p))
    misordered = {**honest, "views": honest["views"][::-1]}
    got = verdict.model_validate(Answerer(truth, 0.0, 0).verify(schema_of(verdict), seen(truth, p), misordered))
    assert got.verdict == "remove" and any("view_type" in c for c in got.wrong_claims)


def test_selection_picks_only_true_siblings_and_names_their_differences(truth):
    pairs = [
        (s, truth.products[s["sibling_of"]])
        for s in products(truth, "sibling")
        if len(
            difference_views(
                s, s["renders"], truth.products[s["sibling_of"]], truth.products[s["sibling_of"]]["renders"]
            )
        )
        >= 2
    ]
    source, sibling = pairs[0]
    stranger = next(p for p in products(truth, "base") if p["index"] not in (sibling["index"],))
    model = selection_answer(BOUNDS, 2, max_targets=2, min_targets=0, min_views=2, paraphrases=3)
    answerer = Answerer(truth, 0.0, 0)
    answer = model.model_validate(
        answerer.select(schema_of(model), seen(truth, source), [seen(truth, stranger), seen(truth, sibling)])
    )
    [choice] = answer.choices
    assert choice.candidate == 2
    assert set(choice.views_involved) == set(difference_views(source, source["renders"], sibling, sibling["renders"]))
    assert len(set(choice.modifications_short)) == 3
    for text in choice.modifications_short:
        named = dict(w.split("=") for w in text.split() if "=" in w)
        assert named and all(sibling[a] == v != source[a] for a, v in named.items())
    assert answerer.unrecognised == 0
    # The discriminability check, shown the same candidates (as images, then as captions), finds the sibling from
    # each paraphrase, and the source itself from a text that names no change.
    check = discrimination_answer(2)
    captions = [
        f"Candidate {c}: " + answerer.caption(schema_of(caption_answer(BOUNDS, 1)), seen(truth, p)[:1])["short_caption"]
        for c, p in enumerate((stranger, sibling), start=1)
    ]
    for text in choice.modifications_short:
        lines = [f"Candidate {c}:" for c in (1, 2)] + [f"Modification text: {text}"]
        shown = [seen(truth, stranger), seen(truth, sibling)]
        assert (
            check.model_validate(answerer.discriminate(schema_of(check), seen(truth, source), shown, lines)).candidate
            == 2
        )
        lines = [*captions, f"Modification text: {text}"]
        assert (
            check.model_validate(answerer.discriminate(schema_of(check), seen(truth, source), [], lines)).candidate == 2
        )
    lines = ["Candidate 1:", "Candidate 2:", "Modification text: same but nothing"]
    shown = [seen(truth, sibling), seen(truth, source)]
    assert answerer.discriminate(schema_of(check), seen(truth, source), shown, lines) == {"candidate": 2}


def test_images_that_are_not_the_catalogues_are_counted_and_never_described(truth):
    model = caption_answer(BOUNDS, 1)
    answerer = Answerer(truth, 0.0, 0)
    answer = model.model_validate(answerer.caption(schema_of(model), [truth.see("0" * 64)]))
    assert answerer.unrecognised == 1 and answer.category == "unknown"


def test_a_rerun_of_the_sample_generator_keeps_its_files_where_the_truth_says(truth, tmp_path):
    record = products(truth, "base")[0]
    for layout, paths in record["paths"].items():
        assert all((Path(truth.folder) / path).is_file() for path in paths), layout  # type: ignore[attr-defined]
