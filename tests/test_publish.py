"""`fashionmv publish` and `fashionmv remove` against a Hub-compatible endpoint on 127.0.0.1 (tests/hub_server.py),
with the real huggingface_hub client and `datasets.load_dataset`, on a tiny build written here shard by shard."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import jpeg_bytes
from hub_server import FakeHub, serve_hub
from typer.testing import CliRunner

from fashionmv_builder.cli import app
from fashionmv_builder.core.build import (
    CAPTIONS,
    DEDUPE_PRODUCTS,
    DEDUPE_VIEWS,
    HARD_NEGATIVES,
    INGEST_IMAGES,
    INGEST_PRODUCTS,
    SPLIT_PRODUCTS,
    TRIPLETS,
    VERDICTS,
    Build,
    TableRef,
)
from fashionmv_builder.core.config import RunConfig, validate_config
from fashionmv_builder.outputs.hub import upload
from fashionmv_builder.outputs.hub.tables import Takedown
from fashionmv_builder.outputs.hub.upload import (
    LocalFile,
    RetryPolicy,
    UploadError,
    UploadPlan,
    plan_upload,
    retry_wait,
)
from fashionmv_builder.outputs.publish import PublishOptions, publish, remove
from fashionmv_builder.pipeline import stage_class

TOKEN = "hf_fixtureSECRET0123456789abcdef"
FAST = RetryPolicy(attempts=3, backoff_s=0.01, max_wait_s=0.05)
DATASETS = ("alpha", "beta")
N_PRODUCTS = 9  # 1-6 train, 7-9 val
# huggingface_hub's own LFS PUT passes a file as `data=`, which httpx2 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def pid(n: int) -> str:
    return f"WOMEN/id_{n:06d}/01"  # fixed width: no id is a substring of another


# -- a tiny build --------------------------------------------------------------------------------------------------


def _write(out: Path, dataset: str, tables: dict[TableRef, list[dict]], extra: dict | None = None) -> None:
    """One shard of one stage (the tables' stage), each table with the schema its stage writes, and its stats."""
    (stage,) = {ref.stage for ref in tables}
    arrow = {
        ref.table: pa.Table.from_pylist(rows, schema=stage_class(stage).writes[ref.table])
        for ref, rows in tables.items()
    }
    counts = {"products_in": N_PRODUCTS, "products_out": N_PRODUCTS, "tokens_in": 1000, "tokens_out": 100}
    build = Build(str(out))
    build.write_shard(
        stage, dataset, 0, arrow, config_hash="fixture", fingerprint="fixture", counts=counts, metadata={}
    )
    build.store(stage, dataset).write_stats(extra)


def _split(n: int) -> str:
    return "train" if n <= 6 else "val"


def _triplet_pairs() -> list[tuple[int, int]]:
    return [(n, n % 6 + 1) for n in range(1, 7)] + [(7, 8), (8, 9), (9, 7)]


def _build_dataset(out: Path, dataset: str) -> None:
    ids = range(1, N_PRODUCTS + 1)
    products = [
        {
            "dataset": dataset,
            "product_id": pid(n),
            "source_kind": "folder",
            "group_key": pid(n),
            "split": None,
            "category": "Dresses",
            "n_views": 2,
            "licence": "owned",
            "source_uri": f"/catalogue/{dataset}/{pid(n)}",
        }
        for n in ids
    ]
    images = []
    for n in ids:
        for v in range(2):
            data = jpeg_bytes(DATASETS.index(dataset) * 100 + n * 10 + v, size=(16, 16))
            images.append(
                {
                    "dataset": dataset,
                    "product_id": pid(n),
                    "view_index": v,
                    "file_name": f"{v}_{'front' if v == 0 else 'back'}.jpg",
                    "view": "front" if v == 0 else "back",
                    "image": {"bytes": data, "path": f"{v}.jpg"},
                    "format": "JPEG",
                    "width": 16,
                    "height": 16,
                    "phash": n,
                    "dhash": v,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "source_uri": f"/catalogue/{dataset}/{pid(n)}/{v}.jpg",
                    "licence": "owned",
                }
            )
    _write(out, dataset, {INGEST_PRODUCTS: products, INGEST_IMAGES: images})
    kept = [{k: r[k] for k in ("dataset", "product_id", "group_key", "split", "category", "n_views")} for r in products]
    views = [
        {k: r[k] for k in ("dataset", "product_id", "view_index", "file_name", "view", "width", "height")}
        for r in images
    ]
    dedup = [{**r, "cluster_id": r["product_id"], "cluster_size": 1} for r in kept]
    _write(out, dataset, {DEDUPE_PRODUCTS: dedup, DEDUPE_VIEWS: views})
    lmm = {"request_sha256": "0" * 64, "model": "tiny-vlm", "tokens_in": 10, "tokens_out": 5}
    captions = [
        {
            "dataset": dataset,
            "product_id": pid(n),
            "view_captions": [{"view_index": 0, "view_type": "front", "wearer_left_on_image": "left", "caption": "a"}],
            "long_caption": f"a long caption of {n}",
            "short_caption": f"caption {n}",
            "category": "dress",
            "gender": "women",
            "is_clothing": True,
            "prompt_version": "caption.v1",
            **lmm,
        }
        for n in ids
    ]
    _write(out, dataset, {CAPTIONS: captions}, {"server_seconds": 12.5})
    verdicts = [
        {"dataset": dataset, "product_id": pid(n), "verdict": "pass", "prompt_version": "verify.v1", **lmm} for n in ids
    ]
    _write(out, dataset, {VERDICTS: verdicts}, {"server_seconds": 7.0})
    split_rows = [
        {"dataset": dataset, "product_id": pid(n), "split": _split(n), "group_key": pid(n), "cluster_id": pid(n)}
        for n in ids
    ]
    _write(out, dataset, {SPLIT_PRODUCTS: split_rows})
    triplets, negatives = [], []
    for s, t in _triplet_pairs():
        others = [m for m in ids if _split(m) == _split(s) and m not in (s, t)][:2]
        triplet_id = f"{dataset}:{pid(s)}->{pid(t)}"
        triplets.append(
            {
                "triplet_id": triplet_id,
                "dataset": dataset,
                "split": _split(s),
                "source_id": pid(s),
                "target_id": pid(t),
                "modification_text_short": f"make {s} like {t}",
                "modification_text_long": f"make product {s} look like product {t}, front and back",
                "views_involved": ["back", "front"],
                "candidate_ids": [pid(t)] + [pid(m) for m in others],
                "request_sha256": "1" * 64,
                "prompt_version": "select.v1",
                "model": "tiny-vlm",
            }
        )
        negatives += [
            {
                "triplet_id": triplet_id,
                "dataset": dataset,
                "split": _split(s),
                "source_id": pid(s),
                "negative_id": pid(m),
            }
            for m in others
        ]
    _write(out, dataset, {TRIPLETS: triplets, HARD_NEGATIVES: negatives}, {"server_seconds": 30.0})


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> RunConfig:
    out = tmp_path_factory.mktemp("build")
    for dataset in DATASETS:
        _build_dataset(out, dataset)
    report = {
        "output_dir": str(out),
        "config_hash": "fixture",
        # The shape `fashionmv report` writes (its text-embedder checks are not needed for a card).
        "datasets": {d: {"products": {"train": 6, "val": 3}, "triplets": {"train": 6, "val": 3}} for d in DATASETS},
    }
    (out / "report").mkdir()
    (out / "report" / "report.json").write_text(json.dumps(report))
    sources = [{"kind": "folder", "dataset": d, "root": str(out), "licence": "owned"} for d in DATASETS]
    return validate_config({"name": "tiny", "output_dir": str(out), "sources": sources})


# -- the endpoint ---------------------------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch, tmp_path) -> Iterator[FakeHub]:
    """The endpoint, and the in-process client pointed at it: LFS (not Xet) uploads, no telemetry, our token."""
    from huggingface_hub import constants

    with serve_hub(TOKEN) as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield fake


def _options(hub: FakeHub, repo_id: str = "org/tiny", **kwargs) -> PublishOptions:
    return PublishOptions(repo_id, endpoint=hub.url, retry=FAST, **kwargs)


def _env(hub: FakeHub, home: Path, token: str = TOKEN) -> dict[str, str]:
    return {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": token,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_VERBOSITY": "debug",
        "NO_PROXY": "127.0.0.1",
    }


def remote_tree(hub: FakeHub, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    repo = hub.state.repos[f"dataset/{repo_id}"]
    commit = repo.resolve(revision)
    assert commit is not None
    return {path: hub.state.content(entry) for path, entry in commit.tree.items()}


def local_tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- unit tests -----------------------------------------------------------------------------------------------------


def test_takedown_parses_dataset_qualified_and_bare_ids() -> None:
    t = Takedown.parse(["alpha/WOMEN/id_1/01", "  WOMEN/id_2/01 ", "", "# comment", "gamma/x"], DATASETS)
    assert t.names("alpha", "WOMEN/id_1/01") and not t.names("beta", "WOMEN/id_1/01")
    assert t.names("alpha", "WOMEN/id_2/01") and t.names("beta", "WOMEN/id_2/01")
    assert t.names("beta", "gamma/x")  # not a dataset of the build: a bare id containing "/"


def test_plan_skips_identical_files_and_deletes_stale_data() -> None:
    files = [LocalFile("README.md", 3, "s1", "b1"), LocalFile("data/a/train-00000-of-00001.parquet", 5, "s2", "b2")]
    remote = {
        "README.md": (None, "b1"),  # regular file: compared by git blob id
        "data/a/train-00000-of-00001.parquet": ("other", "x"),
        "data/a/train-00000-of-00002.parquet": ("s3", "y"),
        ".gitattributes": (None, "z"),
    }
    plan = plan_upload(files, remote)
    assert plan.unchanged == ["README.md"]
    assert [f.path for f in plan.upload] == ["data/a/train-00000-of-00001.parquet"]
    assert plan.delete == ["data/a/train-00000-of-00002.parquet"]  # never files outside data/


def test_batches_keep_commits_small_and_the_card_last(monkeypatch) -> None:
    monkeypatch.setattr(upload, "MAX_FILES_PER_COMMIT", 3)
    data = [LocalFile(f"data/a/train-{i:05d}-of-00007.parquet", 1, f"s{i}", f"b{i}") for i in range(7)]
    plan = UploadPlan(upload=[LocalFile("README.md", 1, "c", "c"), *data], delete=["data/old.parquet"])
    batches = upload._batches(plan)
    assert all(len(files) + len(deletions) <= 3 for files, deletions in batches)
    assert [f.path for f in batches[-1][0]] == ["README.md"] and batches[-1][1] == ["data/old.parquet"]
    assert sorted(f.path for files, _ in batches[:-1] for f in files) == [f.path for f in data]


def test_retry_wait_only_for_rate_limits_server_errors_and_network() -> None:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    def error(status: int, headers: dict[str, str] | None = None) -> HfHubHTTPError:
        request = httpx2.Request("POST", "http://127.0.0.1/x")
        return HfHubHTTPError("x", response=httpx2.Response(status, headers=headers, request=request))

    policy = RetryPolicy(backoff_s=1.0, max_wait_s=10.0)
    assert retry_wait(error(429, {"Retry-After": "3"}), 0, policy) == 3.0
    assert retry_wait(error(503), 2, policy) == 4.0
    assert retry_wait(error(404), 0, policy) is None
    assert retry_wait(httpx2.ConnectError("refused"), 0, policy) == 1.0
    assert retry_wait(ValueError("bug"), 0, policy) is None
    wrapped = RuntimeError("Error while uploading 'x' to the Hub.")  # how the client reports a failed LFS upload
    wrapped.__cause__ = error(502)
    assert retry_wait(wrapped, 0, policy) == 1.0


# -- publishing -----------------------------------------------------------------------------------------------------


def test_dry_run_writes_the_folder_and_uploads_nothing(build: RunConfig, tmp_path: Path) -> None:
    args = [
        "publish",
        _config_file(build, tmp_path),
        "--repo-id",
        "org/tiny",
        "--dry-run",
        "--folder",
        str(tmp_path / "pub"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "pub" / "repo"
    assert "dry run" in result.output and "data/triplets/train-00000-of-00001.parquet" in result.output
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet")) == [
        f"data/{c}/{s}-00000-of-00001.parquet"
        for c in ("captions", "hard_negatives", "products", "triplets")
        for s in ("train", "val")
    ]
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert [c["config_name"] for c in meta["configs"]] == ["triplets", "captions", "products", "hard_negatives"]
    assert meta["configs"][0]["data_files"] == [
        {"split": "train", "path": "data/triplets/train-*.parquet"},
        {"split": "val", "path": "data/triplets/val-*.parquet"},
    ]
    assert meta["size_categories"] == ["n<1K"] and meta["license"] == "other" and meta["task_categories"]
    for text in ("tiny-vlm", "caption.v1", "select.v1", "server-seconds", "load_dataset", "Images are not included"):
        assert text in card
    products = pq.read_table(folder / "data/products/train-00000-of-00001.parquet")
    assert "images" not in products.schema.names  # annotations only by default
    view = products.to_pylist()[0]["views"][0]
    assert view["file_name"] == "0_front.jpg" and view["source_uri"].endswith("/0.jpg") and len(view["sha256"]) == 64


def _config_file(build: RunConfig, tmp_path: Path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(build.model_dump(mode="json")))
    return str(path)


def test_publish_lands_every_file_and_a_rerun_sends_nothing(build: RunConfig, hub: FakeHub, tmp_path: Path) -> None:
    result = publish(build, _options(hub), root=tmp_path / "pub")
    folder = tmp_path / "pub" / "repo"
    remote = remote_tree(hub, "org/tiny")
    assert {p: remote[p] for p in local_tree(folder)} == local_tree(folder)  # every file, byte for byte
    assert set(remote) == {*local_tree(folder), ".gitattributes"}
    # Parquet went the large-file way: LFS batch + one PUT per file, checked against its sha256.
    lfs = {p: e.lfs_oid for p, e in hub.state.repos["dataset/org/tiny"].resolve("main").tree.items()}
    assert all(lfs[p] == hashlib.sha256(remote[p]).hexdigest() for p in remote if p.endswith(".parquet"))
    assert lfs["README.md"] is None and hub.state.count("POST", r"\.git/info/lfs/objects/batch") == 1
    assert set(hub.state.lfs_puts.values()) == {1} and len(hub.state.lfs_puts) == 8
    assert len(result.upload.commits) == 1

    again = publish(build, _options(hub), root=tmp_path / "pub")
    assert again.upload.plan.upload == [] and again.upload.commits == []
    assert len(again.upload.plan.unchanged) == 9 and set(hub.state.lfs_puts.values()) == {1}


def test_interrupted_upload_resumes_without_resending_finished_files(
    build: RunConfig, hub: FakeHub, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(upload, "MAX_FILES_PER_COMMIT", 3)
    hub.state.fail("POST", r"/commit/main", 500, times=10, skip=1)  # the first commit lands, then the server fails
    with pytest.raises(UploadError):
        publish(build, _options(hub), root=tmp_path / "pub")
    landed = remote_tree(hub, "org/tiny")
    assert len([p for p in landed if p.startswith("data/")]) == 3 and "README.md" not in landed
    sent_first = dict(hub.state.lfs_bytes)

    hub.state.clear_faults()
    preuploads_before = hub.state.count("POST", r"/preupload/")
    result = publish(build, _options(hub), root=tmp_path / "pub")
    folder = tmp_path / "pub" / "repo"
    assert remote_tree(hub, "org/tiny") == {**local_tree(folder), ".gitattributes": landed[".gitattributes"]}
    # The files of the finished commit are not even offered again; no LFS object was ever sent twice.
    assert sorted(result.upload.plan.unchanged) == sorted(p for p in landed if p.startswith("data/"))
    assert hub.state.count("POST", r"/preupload/") - preuploads_before == len(result.upload.commits)
    assert set(hub.state.lfs_puts.values()) == {1}
    parquet = {hashlib.sha256(d).hexdigest(): len(d) for p, d in local_tree(folder).items() if p.endswith(".parquet")}
    assert dict(hub.state.lfs_bytes) == parquet
    assert all(hub.state.lfs_bytes[oid] == sent_first[oid] for oid in sent_first)  # zero bytes re-sent


def test_upload_cut_during_lfs_transfers_sends_only_the_rest(build: RunConfig, hub: FakeHub, tmp_path: Path) -> None:
    hub.state.fail("PUT", r"/_lfs/", 400, times=100, skip=3)  # three objects land, then every transfer is refused
    with pytest.raises(UploadError, match="400"):
        publish(build, _options(hub), root=tmp_path / "pub")
    landed = {p.rsplit("/", 1)[1] for m, p, s in hub.state.requests if m == "PUT" and s == 200}
    assert len(landed) == 3 and "README.md" not in remote_tree(hub, "org/tiny")

    hub.state.clear_faults()
    first_run = len(hub.state.requests)
    publish(build, _options(hub), root=tmp_path / "pub")
    resent = {p.rsplit("/", 1)[1] for m, p, _ in hub.state.requests[first_run:] if m == "PUT"}
    assert resent and not resent & landed  # the objects that had landed were not sent again
    folder = tmp_path / "pub" / "repo"
    assert {p: d for p, d in remote_tree(hub, "org/tiny").items() if p != ".gitattributes"} == local_tree(folder)


def test_rate_limits_and_server_errors_are_retried(
    build: RunConfig, hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hub.state.fail("POST", r"/commit/main", 429, times=1, retry_after=0)  # our retry, honouring Retry-After
    hub.state.fail("GET", r"/tree/main", 502, times=1)  # our retry
    hub.state.fail("PUT", r"/_lfs/", 429, times=1, retry_after=0)  # huggingface_hub's own backoff
    publish(build, _options(hub), root=tmp_path / "pub")
    assert hub.state.count("POST", r"/commit/main") == 2
    statuses = [s for m, p, s in hub.state.requests if m == "PUT" and p.startswith("/_lfs/")]
    assert statuses.count(429) == 1 and statuses.count(200) == 8
    assert remote_tree(hub, "org/tiny")["README.md"] == (tmp_path / "pub" / "repo" / "README.md").read_bytes()
    assert "retry 1/2" in caplog.text  # the retries were logged, the token never
    captured = capfd.readouterr()
    assert all(TOKEN not in text for text in (caplog.text, captured.out, captured.err))


def test_revision_branch_and_private_repo(build: RunConfig, hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    publish(build, _options(hub, "org/private", private=True, revision="v2"), root=tmp_path / "pub")
    repo = hub.state.repos["dataset/org/private"]
    assert repo.private and set(repo.branches) == {"main", "v2"}
    assert set(remote_tree(hub, "org/private", "main")) == {".gitattributes"}
    assert "README.md" in remote_tree(hub, "org/private", "v2")
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.dataset_info("org/private")


def test_token_never_appears_in_any_output(build: RunConfig, hub: FakeHub, tmp_path: Path) -> None:
    config = _config_file(build, tmp_path)
    command = [sys.executable, "-c", "from fashionmv_builder.cli import app; app()", "publish", config]
    command += ["--repo-id", "org/tiny"]
    command += ["--folder", str(tmp_path / "pub"), "--verbose"]
    wrong = "hf_wrongTOKEN9876543210zyxwvu"
    refused = subprocess.run(
        command, env=_env(hub, tmp_path / "home", wrong), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1 and "401" in refused.stderr
    hub.state.fail("POST", r"/commit/main", 503, times=1)
    done = subprocess.run(command, env=_env(hub, tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HTTP Request" in done.stderr  # the client's request logs were on
    for out in (refused.stdout, refused.stderr, done.stdout, done.stderr):
        assert wrong not in out and TOKEN not in out
    logs = [p for p in (tmp_path / "home").rglob("*") if p.is_file() and "token" not in p.name]
    assert all(TOKEN.encode() not in p.read_bytes() for p in logs)


def test_load_dataset_gives_back_every_config_and_split(build: RunConfig, hub: FakeHub, tmp_path: Path) -> None:
    """Annotations-only and with-images repos, loaded by `datasets` through HF_ENDPOINT, in a fresh process."""
    publish(build, _options(hub, "org/plain"), root=tmp_path / "plain")
    publish(build, _options(hub, "org/images", with_images=True), root=tmp_path / "images")
    script = """
import hashlib, json, sys
from datasets import Image, List, load_dataset
out = {}
for config in ("triplets", "captions", "products", "hard_negatives"):
    out[config] = {s: d.to_list() for s, d in load_dataset("org/plain", config).items()}
images = load_dataset("org/images", "products")
first = images["train"][0]["images"][0]  # decoded by the Image feature
out["decoded"] = [first.format, first.size]
raw = {s: d.cast_column("images", List(Image(decode=False))) for s, d in images.items()}
out["images"] = {s: [[hashlib.sha256(i["bytes"]).hexdigest() for i in r["images"]] for r in d] for s, d in raw.items()}
json.dump(out, sys.stdout, default=str)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], env=_env(hub, tmp_path / "home"), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout)
    folder = tmp_path / "plain" / "repo"
    for config in ("triplets", "captions", "products", "hard_negatives"):
        expected = {
            s: json.loads(json.dumps(pq.read_table(folder / f"data/{config}/{s}-00000-of-00001.parquet").to_pylist()))
            for s in ("train", "val")
        }
        assert loaded[config] == expected, config
    assert loaded["decoded"] == ["JPEG", [16, 16]]
    views = {s: [[v["sha256"] for v in r["views"]] for r in loaded["products"][s]] for s in ("train", "val")}
    assert loaded["images"] == views  # each embedded image is the ingested one, in view order


# -- takedown -------------------------------------------------------------------------------------------------------


def _rows_naming(tree: dict[str, bytes], dataset: str | None, product_id: str) -> list[str]:
    """Every row of every published table (and the card) that mentions the product."""
    found = []
    for path, data in tree.items():
        if not path.endswith(".parquet"):
            found += [path] if product_id in data.decode(errors="replace") else []
            continue
        for row in pq.read_table(io.BytesIO(data)).to_pylist():
            if (dataset is None or row["dataset"] == dataset) and product_id in json.dumps(row, default=str):
                found.append(f"{path}: {row}")
    return found


def test_takedown_leaves_no_reference_and_publishes_a_new_revision(
    build: RunConfig, hub: FakeHub, tmp_path: Path
) -> None:
    root = tmp_path / "pub"
    publish(build, _options(hub), root=root)
    before = remote_tree(hub, "org/tiny")
    commits_before = len(hub.state.repos["dataset/org/tiny"].commits)
    assert _rows_naming(before, "alpha", pid(3)) and _rows_naming(before, None, pid(5))

    ids = tmp_path / "ids.txt"
    ids.write_text(f"alpha/{pid(3)}\n{pid(5)}\n")
    args = ["remove", _config_file(build, tmp_path), "--ids", str(ids), "--folder", str(root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    after = remote_tree(hub, "org/tiny")
    assert _rows_naming(after, "alpha", pid(3)) == [] and _rows_naming(after, None, pid(5)) == []
    assert _rows_naming(after, "beta", pid(3))  # only alpha's product 3 was named
    history = hub.state.repos["dataset/org/tiny"]
    assert len(history.commits) == commits_before + 1
    assert history.resolve("main").title == "Takedown: remove 2 product(s)"
    # Only the shards that lost rows changed (val has neither product); the shard names stay.
    assert set(after) == set(before)
    assert {p for p in after if after[p] != before[p]} == {
        *(f"data/{c}/train-00000-of-00001.parquet" for c in ("captions", "hard_negatives", "products", "triplets")),
        "README.md",
    }
    hard_negatives = pq.read_table(io.BytesIO(after["data/hard_negatives/train-00000-of-00001.parquet"]))
    triplet_ids = set(
        pq.read_table(io.BytesIO(after["data/triplets/train-00000-of-00001.parquet"]))["triplet_id"].to_pylist()
    )
    assert set(hard_negatives["triplet_id"].to_pylist()) <= triplet_ids  # no hard negative of a dropped triplet

    # A later publish from the build keeps them out; squashing leaves no old revision that still has them.
    publish(build, _options(hub), root=root)
    assert _rows_naming(remote_tree(hub, "org/tiny"), None, pid(5)) == []
    old = history.branches["main"]
    remove(build, [pid(5)], root=root, endpoint=hub.url, retry=FAST, squash_history=True)
    assert len(history.commits) == 1 and old not in history.commits
