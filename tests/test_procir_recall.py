"""Recall@K against hand-computed values on constructed embeddings (FashionMV's protocol, no model)."""

import json

import numpy as np
import pytest

from fashionmv_builder.procir.recall import (
    DatasetRecall,
    QueryResult,
    maxsim_scores,
    merge_gallery,
    merge_queries,
    recall_at_k,
    recall_by_dataset,
    results_json,
    target_ranks,
    write_results,
)

# Eight directions 45° apart, in gallery order. Seen from (1, 0) the scores are 1, √½, 0, -√½, -1, -√½, 0, √½:
# g1/g7, g2/g6 and g3/g5 tie exactly, so tie-breaking by gallery order is visible.
OCTAGON = np.array([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=np.float32)


def test_ranks_count_higher_scores_and_earlier_ties():
    queries = np.array([[3, 0]] * 6, dtype=np.float32)  # length 3: normalisation must not matter
    targets = np.array([0, 1, 7, 6, 3, 4])
    # g7 ties with g1 (earlier) -> behind g0, g1; g6 ties with g2 -> behind g0, g1, g7, g2; g3 behind g6 too.
    assert target_ranks(queries, OCTAGON, targets).tolist() == [0, 1, 2, 4, 5, 7]


def test_recall_at_k_hand_computed():
    queries = np.array([[1, 0]] * 6, dtype=np.float32)
    recall = recall_at_k(queries, OCTAGON, np.array([0, 1, 7, 6, 3, 4]))
    # ranks 0,1,2,4,5,7 -> R@1 1/6, R@5 4/6 (rank < 5), R@10 6/6.
    assert recall == pytest.approx({1: 100 / 6, 5: 400 / 6, 10: 100.0})


def test_gallery_smaller_than_k_counts_every_query_at_k():
    gallery = OCTAGON[:3]
    queries = np.array([[-1, 0]], dtype=np.float32)  # target g0 is last of three
    assert recall_at_k(queries, gallery, np.array([0])) == {1: 0.0, 5: 100.0, 10: 100.0}


def test_recall_of_no_queries_is_an_error():
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((0, 2), np.float32), OCTAGON, np.array([], dtype=np.int64))


def _query(index: int, dataset: str, source: str, target: str, vec) -> QueryResult:
    return QueryResult(index, dataset, source, target, np.asarray(vec, dtype=np.float32))


def test_source_stays_in_the_gallery_and_can_take_rank_one():
    gallery = {
        ("df", "src"): np.array([1.0, 0.0], np.float32),
        ("df", "tgt"): np.array([1.0, 0.2], np.float32),
        ("df", "other"): np.array([0.0, 1.0], np.float32),
    }
    # The query sits next to its source: the source ranks first, the target second.
    [result] = recall_by_dataset(gallery, [_query(0, "df", "src", "tgt", [1.0, 0.05])])
    assert result == DatasetRecall("df", {1: 0.0, 5: 100.0, 10: 100.0}, queries=1, gallery=3)


def test_datasets_have_their_own_galleries_and_unknown_targets_are_dropped():
    gallery = {
        ("a", "1"): np.array([1.0, 0.0], np.float32),
        ("a", "2"): np.array([0.0, 1.0], np.float32),
        ("b", "1"): np.array([0.0, 1.0], np.float32),  # same id string as ("a", "1"): must not collide
        ("b", "3"): np.array([1.0, 0.0], np.float32),
    }
    queries = [
        _query(0, "a", "2", "1", [1.0, 0.1]),  # hit at 1 in a's gallery of 2
        _query(1, "b", "3", "1", [1.0, 0.1]),  # b/3 outranks b/1: miss at 1
        _query(2, "b", "1", "2", [1.0, 0.0]),  # target b/2 has no images: dropped
    ]
    results = recall_by_dataset(gallery, queries)
    assert [(r.dataset, r.recall[1], r.queries, r.gallery) for r in results] == [("a", 100.0, 1, 2), ("b", 0.0, 1, 2)]


def test_results_json_keys_rounding_and_unweighted_average():
    results = [
        DatasetRecall("deepfashion", {1: 50.0, 5: 100 * 2 / 3, 10: 90.0}, 3, 10),
        DatasetRecall("f200k", {1: 10.0, 5: 20.0, 10: 30.0}, 300, 1000),
        DatasetRecall("fashiongen_val", {1: 1.0, 5: 2.0, 10: 3.0}, 1, 5),
        DatasetRecall("shop_x", {1: 0.0, 5: 0.0, 10: 0.0}, 1, 5),
    ]
    out = results_json(results)
    assert list(out) == [
        "DeepFashion_R@1",
        "DeepFashion_R@5",
        "DeepFashion_R@10",
        "Fashion200K_R@1",
        "Fashion200K_R@5",
        "Fashion200K_R@10",
        "FashionGen-val_R@1",
        "FashionGen-val_R@5",
        "FashionGen-val_R@10",
        "shop_x_R@1",
        "shop_x_R@5",
        "shop_x_R@10",
        "Average_R@5",
        "Average_R@10",
    ]
    assert out["DeepFashion_R@5"] == 66.67
    # Unweighted: the 300-query dataset counts as much as the 1-query ones.
    assert out["Average_R@5"] == round((100 * 2 / 3 + 20 + 2 + 0) / 4, 2)
    assert out["Average_R@10"] == 30.75


def test_write_results(tmp_path):
    path = write_results(tmp_path / "out", [DatasetRecall("f200k", {1: 1.234, 5: 5.0, 10: 10.0}, 1, 1)])
    assert json.loads(path.read_text()) == {
        "Fashion200K_R@1": 1.23,
        "Fashion200K_R@5": 5.0,
        "Fashion200K_R@10": 10.0,
        "Average_R@5": 5.0,
        "Average_R@10": 10.0,
    }


def test_gathered_queries_are_counted_once_in_file_order():
    queries = [_query(i, "d", "s", "t", [float(i), 1.0]) for i in range(5)]
    # Two processes took every other query; the second padded its share by repeating one (as DistributedSampler does).
    parts = [queries[0::2], [*queries[1::2], queries[1]]]
    assert merge_queries(parts) == queries
    gallery = {("d", "s"): np.array([0.0, 1.0], np.float32), ("d", "t"): np.array([1.0, 1.0], np.float32)}
    merged = recall_by_dataset(gallery, merge_queries(parts))
    assert merged == recall_by_dataset(gallery, queries)
    assert merged[0].queries == 5


def test_gathered_gallery_first_part_wins_and_keys_are_sorted():
    first = {("d", "b"): np.array([1.0], np.float32), ("d", "a"): np.array([2.0], np.float32)}
    second = {("d", "a"): np.array([9.0], np.float32), ("c", "z"): np.array([3.0], np.float32)}
    merged = merge_gallery([first, second])
    assert list(merged) == [("c", "z"), ("d", "a"), ("d", "b")]
    assert merged[("d", "a")].tolist() == [2.0]


def test_maxsim_scores_take_the_best_pair_of_views():
    queries = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0]])]
    gallery = [np.array([[0.0, 2.0]]), np.array([[1.0, -1.0], [3.0, 0.0], [-1.0, 0.0]])]
    half = 1 / np.sqrt(2)
    expected = [[1.0, 1.0], [half, half]]  # query 0: view 2 matches gallery 0, view 1 matches gallery 1's view 2
    np.testing.assert_allclose(maxsim_scores(queries, gallery), expected, rtol=1e-6)


def test_multi_vector_items_are_ranked_by_maxsim():
    gallery = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0]])]
    query = [np.array([[0.0, 1.0]])]  # MaxSim: 1.0 for item 0, 0.71 for item 1; a mean vector would tie them
    assert recall_at_k(query, gallery, np.array([0]), ks=(1,)) == {1: 100.0}
    assert recall_at_k(query, gallery, np.array([1]), ks=(1,)) == {1: 0.0}
