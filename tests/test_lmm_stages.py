"""Stage 1 (captions) and Stage 2 (verifier) against a real vLLM server with a tiny random-weight model."""

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import SMALL_WORDS

from fashionmv_builder.core.build import Build, TableRef
from fashionmv_builder.core.config import RunConfig, validate_config
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.devtools.score_captions import score_build
from fashionmv_builder.lmm.calls import CircuitOpen
from fashionmv_builder.lmm.client import LmmUnreachable
from fashionmv_builder.lmm.server import free_port
from fashionmv_builder.pipeline import run_local

pytestmark = pytest.mark.slow


def _config(out, endpoint: str, **lmm) -> RunConfig:
    return validate_config(
        {
            "output_dir": str(out),
            "shard_size": 25,
            "workers": 2,
            "sources": [
                {"kind": "deepfashion", "dataset": "deepfashion", "root": str(_sample_root(out) / "deepfashion")}
            ],
            "lmm": {
                "endpoints": [endpoint],
                "words": SMALL_WORDS,
                "breaker_min_products": 10,
                "send_seed": False,
                **lmm,
            },
            "caption": {"max_tokens": 1024},
            "verify": {"max_tokens": 1024, "breaker_threshold": 1.0},
        }
    )


def _sample_root(out) -> Path:
    """Each build folder records which sample catalogue it was made from."""
    return Path((Path(out) / "sample-root.txt").read_text())


@pytest.fixture(scope="module")
def deduped(sample_catalogue, tmp_path_factory):
    """The sample's DeepFashion layout, ingested and deduped once for this module."""
    out = tmp_path_factory.mktemp("lmm-build")
    (out / "sample-root.txt").write_text(str(sample_catalogue))
    config = _config(out, "http://unused")
    run_local(config, ["ingest", "dedupe"])
    return out


def _copy_build(src, dst):
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "sample-root.txt", dst / "sample-root.txt")
    shutil.copytree(src / "ingest", dst / "ingest")
    shutil.copytree(src / "dedupe", dst / "dedupe")


def _counts(config, stage: str) -> dict:
    return Build(config.output_dir).counts(stage, "deepfashion")


def _server_requests(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return int(sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)))


def test_caption_then_verify_on_the_sample(deduped, vllm_server, tmp_path):
    _copy_build(deduped, tmp_path)
    config = _config(tmp_path, vllm_server.spec.url)
    [caption] = run_local(config, ["caption"])["caption"]
    c = caption.stats["counts"]
    assert c["products_in"] > 100
    assert c["products_out"] >= 0.9 * c["products_in"], c  # >= 90% valid answers
    assert c["products_in"] == c["products_out"] + c["products_rejected"]
    assert c["tokens_in"] > 0 and c["tokens_out"] > 0
    captions = Build(config.output_dir).read(TableRef("caption", "captions"), "deepfashion").to_pylist()
    assert len(captions) == c["products_out"] == len({r["product_id"] for r in captions})
    views = Build(config.output_dir).read(TableRef("dedupe", "views"), "deepfashion").to_pylist()
    n_views = {}
    for v in views:
        n_views[v["product_id"]] = n_views.get(v["product_id"], 0) + 1
    assert all(len(r["view_captions"]) == n_views[r["product_id"]] for r in captions)
    assert all(10 <= len(r["long_caption"].split()) <= 20 for r in captions)

    [verify] = run_local(config, ["verify"])["verify"]
    v = verify.stats["counts"]
    assert v["products_in"] == c["products_out"]
    answered = v["products_in"] - v.get("rejected.invalid_lmm_answer", 0)
    assert answered >= 0.9 * v["products_in"], v
    assert v["products_in"] == v["products_out"] + v["products_rejected"]
    rejects = Build(config.output_dir).read(TableRef("verify", "rejects"), "deepfashion").to_pylist()
    assert {r["reason"] for r in rejects} <= {RejectReason.REMOVED_BY_VERIFIER, RejectReason.INVALID_LMM_ANSWER}

    # The scorer runs on the real answers (a random model scores at chance; the scorer's own tests check it is right).
    truth = json.loads((_sample_root(tmp_path) / "ground_truth.json").read_text())
    scores = score_build(config, truth)["deepfashion"]
    assert scores["products"] == len(captions)
    assert 0 <= scores["orientation_accuracy"] <= 1 and scores["verifier_recall"] is not None

    # A rerun replays nothing and asks nothing: every shard is complete.
    before = _server_requests(vllm_server.spec.url)
    [again] = run_local(config, ["caption"])["caption"]
    assert again.skipped == again.shards
    assert _server_requests(vllm_server.spec.url) == before


def test_unreachable_server_is_a_clear_error(deduped, tmp_path):
    _copy_build(deduped, tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LmmUnreachable, match=re.escape(url) + ".*fashionmv serve-lmm"):
        run_local(_config(tmp_path, url), ["caption"])


def test_invalid_answers_are_retried_then_rejected_and_the_breaker_trips(deduped, vllm_server, tmp_path):
    _copy_build(deduped, tmp_path)
    url = vllm_server.spec.url
    # 12 output tokens cannot hold a caption: every answer is cut off, so every one is invalid, for real.
    tolerant = _config(tmp_path, url, invalid_retries=1).model_copy(
        update={
            "caption": _config(tmp_path, url).caption.model_copy(update={"max_tokens": 12, "breaker_threshold": 1.0})
        }
    )
    [report] = run_local(tolerant, ["caption"], pilot=0.1)["caption"]
    counts = report.stats["counts"]
    assert counts["products_out"] == 0
    assert counts["rejected.invalid_lmm_answer"] == counts["products_in"] > 0
    assert counts["requests_sent"] == 2 * counts["products_in"]  # the first answer and one retry each
    rejects = Build(tolerant.output_dir).read(TableRef("caption", "rejects"), "deepfashion").to_pylist()
    assert all("cut off at max_tokens" in r["detail"] for r in rejects)

    strict = tolerant.model_copy(
        update={
            "caption": tolerant.caption.model_copy(update={"breaker_threshold": 0.2}),
            "output_dir": str(tmp_path / "b"),
        }
    )
    _copy_build(deduped, tmp_path / "b")
    with pytest.raises(CircuitOpen, match="over the threshold"):
        run_local(strict, ["caption"])


def test_server_killed_mid_stage_resumes_without_paying_twice(deduped, vllm_server, tmp_path):
    _copy_build(deduped, tmp_path)
    url = vllm_server.spec.url
    config = _config(tmp_path, url, retries=1, backoff_s=0.1)
    answers = Build(config.output_dir).answers("caption")
    failure: list[BaseException] = []

    def first_run() -> None:
        try:
            run_local(config, ["caption"])
        except BaseException as err:  # the crash we cause
            failure.append(err)

    runner = threading.Thread(target=first_run)
    runner.start()
    deadline = time.monotonic() + 300
    build = Build(config.output_dir)

    def half_answered() -> bool:
        # A shard's views are prepared before its requests go, so shards start one after another and the first may
        # be committed whole before the 20th answer: kill only once some answer belongs to a shard not yet committed.
        stored = answers.count()
        return stored >= 20 and stored > 25 * len(build.markers("caption", "deepfashion"))

    while not half_answered() and time.monotonic() < deadline:
        time.sleep(0.2)
    vllm_server.kill_hard()  # SIGKILL of the API server only, as a crash would: its engine is orphaned
    runner.join(timeout=300)
    assert failure, "the stage must fail when its server dies"
    stored = answers.count()
    assert stored >= 20

    vllm_server.start(timeout_s=600)  # reaps the orphaned engine, starts a fresh server (counters at zero)
    [report] = run_local(config, ["caption"])["caption"]
    new_answers = answers.count() - stored
    assert _server_requests(url) == new_answers  # no stored answer was requested again
    counts = report.stats["counts"]
    assert counts["answers_replayed"] > 0  # the answers stored before the crash were replayed, not requested
    assert counts["products_in"] == counts["products_out"] + counts["products_rejected"]
    captions = Build(config.output_dir).read(TableRef("caption", "captions"), "deepfashion").to_pylist()
    products = Build(config.output_dir).read(TableRef("dedupe", "products"), "deepfashion").to_pylist()
    ids = [r["product_id"] for r in captions]
    assert len(ids) == len(set(ids))  # nothing duplicated
    rejected = {
        r["product_id"]
        for r in Build(config.output_dir).read(TableRef("caption", "rejects"), "deepfashion").to_pylist()
    }
    assert set(ids) | rejected == {p["product_id"] for p in products}  # nothing lost
