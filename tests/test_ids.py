import pytest

from fashionmv_builder.core.ids import DEEPFASHION_ID, id_problem


@pytest.mark.parametrize(
    "product_id",
    ["WOMEN/Dresses/id_00004544/02", "90456812", "95636", "p00012", "a/b.c/d-e_f"],
)
def test_fashionmv_ids_are_accepted(product_id):
    assert id_problem(product_id) is None


@pytest.mark.parametrize(
    "product_id",
    ["", "../../etc/passwd", "a/../b", "/abs/path", "a\\b", "a\x00b", "a//b", "bad id!", "./x", "x/", "é"],
)
def test_unsafe_ids_are_rejected_with_a_reason(product_id):
    assert id_problem(product_id)


def test_deepfashion_id_format():
    assert DEEPFASHION_ID.fullmatch("WOMEN/Dresses/id_00004544/02")
    assert not DEEPFASHION_ID.fullmatch("WOMEN/Dresses/id_4544/02")
