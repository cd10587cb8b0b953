"""A model per LMM stage: per-stage settings over the run's, API keys from the environment, quotas, refusals that
stop a stage at once, the structured-output canary, and servers sized to (and checked against) a stage's largest
request. The slow tests run caption and selection on one real vLLM server and verification on another (another
architecture, started with --api-key)."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from conftest import SMALL_WORDS, VLLM_PYTHON, start_vllm
from fastapi import FastAPI

from fashionmv_builder.core.build import CAPTIONS, SELECTED_TRIPLETS, VERDICTS, Build
from fashionmv_builder.core.config import ConfigError, LmmConfig, LmmPrice, validate_config
from fashionmv_builder.devtools.local_server import serve_app
from fashionmv_builder.lmm.client import LmmRefused, RateBudget, api_key, retry_after
from fashionmv_builder.pipeline import build_stages, run_local

SECOND_VLM = Path(__file__).resolve().parents[1] / "build" / "models" / "tiny-qwen2-vl"
KEY = "sk-test-7f3c9a1e5b2d4c6e8a0b"  # what the second server is started with; must leak nowhere
KEY_ENV = "FASHIONMV_TEST_VERIFY_KEY"


def _config(out: Path, catalogue: Path, **sections) -> dict:
    return {
        "output_dir": str(out),
        "shard_size": 10,
        "workers": 2,
        "sources": [{"kind": "deepfashion", "dataset": "deepfashion", "root": str(catalogue)}],
        "lmm": {"endpoints": ["http://127.0.0.1:9"], "words": SMALL_WORDS, "send_seed": False},
        "caption": {"max_tokens": 1024},
        "verify": {"max_tokens": 1024, "remove": False},
        "triplets": {"val_ratio": 0.3, "min_targets": 1, "max_tokens": 1024},
        **sections,
    }


# -- settings ---------------------------------------------------------------------------------------------------


def test_a_stage_takes_its_own_lmm_fields_and_the_rest_from_the_run(tmp_path):
    config = validate_config(
        _config(
            tmp_path,
            tmp_path,
            verify={"lmm": {"model": "judge", "endpoints": ["http://b"], "api_key_env": KEY_ENV}},
            triplets={"lmm": {"model": "picker", "price": {"input_per_million": 0.1}}},
        )
    )
    caption, verify, select = (config.stage_lmm(s) for s in ("caption", "verify", "triplets"))
    assert (caption.model, caption.endpoints) == ("tiny-vlm", ("http://127.0.0.1:9",))
    assert (verify.model, verify.endpoints, verify.api_key_env) == ("judge", ("http://b",), KEY_ENV)
    assert verify.words == caption.words  # not set on the stage: the run's
    assert (select.model, select.endpoints, select.price.input_per_million) == ("picker", caption.endpoints, 0.1)


def test_a_stage_naming_a_server_to_start_drops_the_runs_endpoints(tmp_path):
    config = validate_config(_config(tmp_path, tmp_path, verify={"lmm": {"serve": {"model": str(tmp_path)}}}))
    verify = config.stage_lmm("verify")
    assert verify.endpoints == () and verify.serve is not None


def test_a_stage_with_its_own_server_never_inherits_the_runs_key_quota_or_price(tmp_path):
    run = {"endpoints": ["http://a"], "api_key_env": "A_KEY", "requests_per_minute": 10, "share_disk": False}
    run["price"] = {"input_per_million": 5.0}
    config = validate_config(
        _config(
            tmp_path,
            tmp_path,
            lmm=run,
            caption={"lmm": {"endpoints": ["http://b"]}},  # another server: nothing of A's carries over
            verify={"lmm": {"model": "judge"}},  # the run's server: its key and quota do
            triplets={"lmm": {"api_key_env": None}},  # an explicit null clears the run's value
        )
    )
    caption, verify, select = (config.stage_lmm(s) for s in ("caption", "verify", "triplets"))
    assert (caption.api_key_env, caption.requests_per_minute, caption.share_disk) == (None, None, True)
    assert caption.price.input_per_million == 0
    assert (verify.api_key_env, verify.requests_per_minute, verify.endpoints) == ("A_KEY", 10, ("http://a",))
    assert (select.api_key_env, select.requests_per_minute) == (None, 10)


def test_the_api_key_comes_from_the_named_variable_only(monkeypatch):
    lmm = LmmConfig(endpoints=("http://a",), api_key_env=KEY_ENV)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=KEY_ENV):
        api_key(lmm)
    monkeypatch.setenv(KEY_ENV, KEY)
    assert api_key(lmm) == KEY
    assert KEY not in lmm.model_dump_json()


def test_a_price_turns_tokens_and_hours_into_money():
    price = LmmPrice(input_per_million=0.5, output_per_million=2.0, per_gpu_hour=3.0)
    assert price.cost(2_000_000, 500_000, 1800) == pytest.approx(1.0 + 1.0 + 1.5)


def test_the_budget_waits_for_the_oldest_request_to_leave_the_minute():
    budget = RateBudget(requests=2, tokens=1000)
    budget._sent.extend([(0.0, 300), (10.0, 600)])
    assert budget._wait_s(50, now=20.0) == pytest.approx(40.0)  # two requests in the window: wait for the first
    budget.requests = None
    assert budget._wait_s(50, now=20.0) == 0  # 900 + 50 tokens fit
    assert budget._wait_s(400, now=20.0) == pytest.approx(40.0)  # 1300 do not: wait until the 300 leave
    assert budget._wait_s(5000, now=20.0) == pytest.approx(50.0)  # larger than the quota: wait for an empty window


def _status_error(code: int, headers: dict[str, str]) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://x/v1/chat/completions")
    response = httpx.Response(code, headers=headers, request=request)
    return openai.RateLimitError("slow down", response=response, body=None)


def test_retry_after_in_seconds_or_as_a_date_is_honoured_and_capped():
    assert retry_after(_status_error(429, {"retry-after": "7"})) == 7.0
    assert retry_after(_status_error(429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0  # in the past
    assert retry_after(_status_error(429, {"retry-after": "86400"})) == 300.0
    assert retry_after(_status_error(429, {})) is None
    assert retry_after(_status_error(429, {"retry-after": "soon"})) is None  # malformed: back off as usual
    assert retry_after(_status_error(429, {"retry-after": "nan"})) is None


# -- against small local servers --------------------------------------------------------------------------------


def _chatty_app(model: str, status: int | None = None) -> tuple[FastAPI, list[dict]]:
    """An OpenAI-compatible endpoint that ignores response_format and answers free text (or fails with `status`)."""
    app, seen = FastAPI(), []

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "max_model_len": 8192}]}

    @app.post("/v1/chat/completions")
    def complete(body: dict) -> dict:
        seen.append(body)
        if status is not None:
            raise _http_error(status)
        text = "Sure! Here is a JSON object describing the product: it is a red shirt."
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 15, "total_tokens": 25},
        }

    return app, seen


def _http_error(status: int):
    from fastapi import HTTPException

    return HTTPException(status, "model 'tiny-vlm' does not exist" if status == 404 else "no")


@pytest.fixture
def deduped_small(sample_catalogue, tmp_path) -> Path:
    """A few products of the sample, ingested and deduped (no LMM needed)."""
    root = tmp_path / "catalogue"
    for part in ("MEN/Jackets_Coats", "WOMEN/Dresses"):
        shutil.copytree(sample_catalogue / "deepfashion" / part, root / part)
    return root


def test_the_canary_stops_a_stage_against_a_server_that_ignores_schemas(deduped_small, tmp_path):
    app, seen = _chatty_app("tiny-vlm")
    with serve_app(app) as url:
        config = validate_config(
            _config(tmp_path / "out", deduped_small, lmm={"endpoints": [url], "words": SMALL_WORDS})
        )
        with pytest.raises(LmmRefused, match="does not enforce JSON schemas"):
            run_local(config, ["ingest", "dedupe", "caption"])
    assert [body["response_format"]["json_schema"]["name"] for body in seen] == ["canary"]  # nothing else was sent
    assert Build(config.output_dir).markers(CAPTIONS, "deepfashion") == []


def test_a_refusal_stops_the_stage_at_once_naming_the_setting(deduped_small, tmp_path):
    app, seen = _chatty_app("tiny-vlm", status=404)
    with serve_app(app) as url:
        config = validate_config(
            _config(tmp_path / "out", deduped_small, lmm={"endpoints": [url], "words": SMALL_WORDS})
        )
        with pytest.raises(LmmRefused, match=r"HTTP 404.*lmm.model"):
            run_local(config, ["ingest", "dedupe", "caption"])
    assert len(seen) == 1  # not retried


# -- against real vLLM servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_vllm(tmp_path_factory):
    """A second real vLLM server: another architecture (tiny Qwen2-VL), started with --api-key."""
    base = tmp_path_factory.getbasetemp()
    server = start_vllm(
        base, SECOND_VLM, "tiny-vlm2", max_model_len=8192, kv_cache_gib=1, extra_args=["--api-key", KEY]
    )
    yield server
    server.stop()


def _requests(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    return int(sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)))


@pytest.mark.slow
def test_caption_and_selection_on_one_server_verification_on_another_with_a_key(
    vllm_server, keyed_vllm, deduped_small, tmp_path, monkeypatch, capsys
):
    first, second = vllm_server.spec.url, keyed_vllm.spec.url
    sections = {
        "lmm": {"endpoints": [first], "words": SMALL_WORDS, "send_seed": False, "breaker_min_products": 1000},
        "verify": {
            "max_tokens": 1024,
            "remove": False,
            "lmm": {"endpoints": [second], "model": "tiny-vlm2", "api_key_env": KEY_ENV},
        },
    }
    config = validate_config(_config(tmp_path / "out", deduped_small, **sections))
    run_local(config, ["ingest", "dedupe"])
    before = {first: _requests(first), second: _requests(second, KEY)}
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(LmmRefused, match=r"HTTP 401.*api_key_env"):  # captions are made, then verify is refused
        run_local(config)
    monkeypatch.setenv(KEY_ENV, KEY)
    run_local(config)  # captions done: their server's requests are only the other stages'

    build = Build(config.output_dir)
    stages = ("caption", "verify", "select", "discriminate")
    sent = {stage: build.counts(stage, "deepfashion")["requests_sent"] for stage in stages}
    assert min(sent.values()) > 0
    # each stage also asked its server one canary (stored with its answers: a rerun does not ask it again)
    assert _requests(first) - before[first] == sent["caption"] + sent["select"] + sent["discriminate"] + 3
    assert _requests(second, KEY) - before[second] == sent["verify"] + 1

    build = Build(config.output_dir)
    assert {r["model"] for r in build.rows(CAPTIONS, "deepfashion")} == {"tiny-vlm"}
    assert {r["model"] for r in build.rows(VERDICTS, "deepfashion")} == {"tiny-vlm2"}
    assert {r["model"] for r in build.rows(SELECTED_TRIPLETS, "deepfashion")} == {"tiny-vlm"}
    assert build.stats("verify", "deepfashion")["model"] == "tiny-vlm2"

    out = capsys.readouterr()
    assert KEY not in out.out + out.err
    for path in Path(config.output_dir).rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_a_stage_3_request_that_cannot_fit_the_context_is_refused_before_any_request(
    keyed_vllm, deduped_small, tmp_path, monkeypatch
):
    """Captions and verdicts fit the 8192-token server; Stage 3 with max_tokens 7000 cannot (its source and ten
    candidates' views come on top): refused with the numbers, and the server sees no request of it."""
    monkeypatch.setenv(KEY_ENV, KEY)
    lmm = {"endpoints": [keyed_vllm.spec.url], "model": "tiny-vlm2", "api_key_env": KEY_ENV, "words": SMALL_WORDS}
    triplets = {"val_ratio": 0.3, "min_targets": 1, "max_tokens": 7000}
    config = validate_config(_config(tmp_path / "out", deduped_small, lmm=lmm, triplets=triplets))
    sizes = {s.name: s.largest_request().tokens for s in build_stages(config, ["caption", "verify", "select"])}
    assert sizes["caption"] < 8192 and sizes["verify"] < 8192 < sizes["select"]
    run_local(config, ["ingest", "dedupe", "caption", "verify", "embed", "candidates"])
    before = _requests(keyed_vllm.spec.url, KEY)
    with pytest.raises(LmmRefused, match=r"select: its largest request needs about \d+ tokens .*max_model_len 8192"):
        run_local(config, ["select"])
    assert _requests(keyed_vllm.spec.url, KEY) == before


def test_a_served_model_is_sized_from_the_stages_it_serves(tmp_path):
    from fashionmv_builder.lmm.serving import server_for

    model = tmp_path / "model"
    lmm = {"serve": {"model": str(model), "python": str(VLLM_PYTHON)}, "words": SMALL_WORDS}
    config = validate_config(_config(tmp_path / "out", tmp_path, lmm=lmm, triplets={"candidates_shown": 4}))
    command = server_for(config).spec.command()
    limits = dict(itertools.pairwise(command))
    stages = build_stages(config, ["caption", "verify", "select"])
    largest = max(s.largest_request().tokens for s in stages)
    assert int(limits["--max-model-len"]) >= 1.5 * largest
    assert limits["--limit-mm-per-prompt"] == '{"image": 25, "video": 0}'  # 5 source views and 4 × 5 candidates'


def test_select_sizes_its_request_from_the_candidates_it_shows(tmp_path):
    few = validate_config(_config(tmp_path, tmp_path, triplets={"candidates_shown": 2}))
    many = validate_config(_config(tmp_path, tmp_path, triplets={"candidates_shown": 10}))
    [a], [b] = build_stages(few, ["select"]), build_stages(many, ["select"])
    assert (a.largest_request().images, b.largest_request().images) == (15, 55)
    assert b.largest_request().tokens > a.largest_request().tokens


def _answers(out: Path, stage: str) -> int:
    """Answers stored by a stage, its canaries left out."""
    return sum(1 for p in (out / stage / "_answers").rglob("*.json") if '"canary": true' not in p.read_text())


@pytest.mark.slow
def test_the_run_swaps_served_models_between_stages_and_resumes_after_a_kill_with_the_right_one(
    deduped_small, tmp_path
):
    """caption and verify each with a `serve` spec (two architectures); the run starts the first, stops it, starts
    the second; kill -9 between the stages; the rerun asks no caption and no stored verdict again."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from fashionmv_builder.lmm.server import free_port

    models = Path(__file__).resolve().parents[1] / "build" / "models"

    def serve(model: str, name: str) -> dict:
        env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
        return {
            "model": str(models / model),
            "served_name": name,
            "port": free_port(),
            "python": str(VLLM_PYTHON),
            "dtype": "float32",
            "env": env,
        }

    first, second = serve("tiny-qwen2.5-vl", "tiny-vlm"), serve("tiny-qwen2-vl", "tiny-vlm2")
    out = tmp_path / "out"
    config = _config(out, deduped_small)
    config["lmm"] = {"serve": first, "words": SMALL_WORDS, "send_seed": False, "breaker_min_products": 1000}
    config["verify"]["lmm"] = {"serve": second, "model": "tiny-vlm2"}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    fashionmv = str(Path(sys.executable).parent / "fashionmv")
    for stage in ("ingest", "dedupe"):
        subprocess.run([fashionmv, stage, str(path)], check=True, capture_output=True, timeout=600)
    command = [fashionmv, "run", str(path)]

    pidfile = out / "_lmm_server" / "vllm.pid.json"
    log = (tmp_path / "first.log").open("wb")
    run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:  # until the verify server is up: captions done, their server stopped
            assert run.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the verify server did not come up"
            record = json.loads(pidfile.read_text()) if pidfile.exists() else {}
            if record.get("model", "").endswith("tiny-qwen2-vl") and record.get("members"):
                break
            time.sleep(1)
        assert (out / "caption" / "deepfashion" / "stats.json").exists()
        with pytest.raises(httpx.HTTPError):  # one machine, one server: the caption server is gone
            httpx.get(f"http://127.0.0.1:{first['port']}/health", timeout=2)
        os.killpg(run.pid, signal.SIGKILL)  # the run dies; its verify server (own session) is left behind
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    stored = {stage: _answers(out, stage) for stage in ("caption", "verify")}
    build = Build(str(out))
    verified_before = {m.shard for m in build.markers("verify", "deepfashion")}

    rerun = subprocess.run([fashionmv, "verify", str(path)], capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    counts = {stage: build.counts(stage, "deepfashion") for stage in ("caption", "verify")}
    assert _answers(out, "caption") == stored["caption"] == counts["caption"]["requests_sent"]
    # the rerun asked only what the first run had not stored, and with the verify stage's own model
    redone = [m for m in build.markers("verify", "deepfashion") if m.shard not in verified_before]
    assert _answers(out, "verify") - stored["verify"] == sum(m.counts["requests_sent"] for m in redone) > 0
    assert counts["verify"]["products_in"] == counts["caption"]["products_out"]
    assert {r["model"] for r in build.rows(VERDICTS, "deepfashion")} == {"tiny-vlm2"}
    assert {r["model"] for r in build.rows(CAPTIONS, "deepfashion")} == {"tiny-vlm"}
    assert not pidfile.exists()  # the rerun stopped its server (and reaped or reused the one left behind)
