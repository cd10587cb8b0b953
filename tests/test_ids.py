import unicodedata

import pytest

from fashionmv_builder.core.ids import DEEPFASHION_ID, NUMERIC_ID, id_problem


@pytest.mark.parametrize(
    "product_id",
    ["WOMEN/Dresses/id_00004544/02", "90456812", "95636", "p00012", "a/b.c/d-e_f"],
)
def test_fashionmv_ids_are_accepted(product_id):
    assert id_problem(product_id) is None


@pytest.mark.parametrize(
    "product_id",
    [
        "é",
        "robe d'été 夏",
        "brand/robe d'été 夏",
        "Платье (синее)",
        "فستان",
        "ドレス・赤",
        "शर्ट",  # combining vowel signs (marks)
        "Kleid, blau & grün + 2",
        "chemise – “lin”",  # non-ASCII dashes and quotes
        "2½",
    ],
)
def test_letters_of_any_script_spaces_and_common_punctuation_are_accepted(product_id):
    assert id_problem(product_id) is None, id_problem(product_id)


@pytest.mark.parametrize(
    "product_id",
    [
        "",
        "../../etc/passwd",
        "a/../b",
        "/abs/path",
        "a\\b",
        "a\x00b",
        "a//b",
        "bad id!",
        "./x",
        "x/",
        "a\nb",  # control characters
        "a\rb",
        "a\x1b[31mb",
        "a\tb",
        "a\x7fb",
        "a\u0085b",
        "a\u2028b",  # line separator
        "a\u202eb",  # right-to-left override
        "a\u200bb",  # zero-width space
        "a\u00a0b",  # no-break space
        "a／b",  # fullwidth solidus: a separator once NFKC-normalised
        "a＼b",
        "‥",  # two-dot leader: `..` under NFKC
        " lead",
        "trail ",
        "a/ b",
        "a:b",
        "a?b",
        "a*b",
        "a#b",
        "a%2e",
        "a|b",
        "a<b>",
        'a"b',
        "dress 👗",
        "x" * 256,  # one segment over a file name's 255 bytes
        "é" * 128,  # 256 UTF-8 bytes
    ],
)
def test_unsafe_ids_are_rejected_with_a_reason(product_id):
    assert id_problem(product_id)


def test_ids_must_be_nfc():
    nfd = unicodedata.normalize("NFD", "robe d'été")
    assert nfd != "robe d'été"
    assert "NFC" in (id_problem(nfd) or "")
    assert id_problem(unicodedata.normalize("NFC", nfd)) is None


def test_deepfashion_id_format():
    assert DEEPFASHION_ID.fullmatch("WOMEN/Dresses/id_00004544/02")
    assert not DEEPFASHION_ID.fullmatch("WOMEN/Dresses/id_4544/02")
    assert not DEEPFASHION_ID.fullmatch("WOMEN/Robe été/id_00004544/02")  # DeepFashion ids stay ASCII
    assert NUMERIC_ID.fullmatch("90456812") and not NUMERIC_ID.fullmatch("9045 6812")
