"""The declared pipeline and its one life cycle: a stage added to the list runs through `fashionmv run` and the
Prefect flow with no other edit; the executor guards conservation; why a shard reruns has one answer."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest
from conftest import jpeg_bytes, write
from typer.testing import CliRunner

from fashionmv_builder import pipeline
from fashionmv_builder.cli import app
from fashionmv_builder.core.build import DEDUPE_PRODUCTS, Build, TableRef
from fashionmv_builder.core.config import RunConfig, validate_config
from fashionmv_builder.core.executor import LocalRunner, run_pipeline
from fashionmv_builder.core.ledger import ConservationError, Reject
from fashionmv_builder.core.stage import ShardOutput, ShardTask, Stage, Work
from fashionmv_builder.data_schema.reasons import RejectReason

COUNTS = pa.schema([("dataset", pa.string()), ("product_id", pa.string()), ("n_views", pa.int32())])


class ViewCountStage(Stage):
    """Test only: count each product's kept views.

    One row per kept product; products with 3 views or more are rejected, so the ledger's reject path runs too."""

    name = "view_count"
    version = "1"
    work = Work.SHARD
    reads = (DEDUPE_PRODUCTS,)
    writes: ClassVar[dict] = {"counts": COUNTS}

    def run_shard(self, task: ShardTask) -> ShardOutput:
        ledger = self.ledger(task.dataset)
        rows = []
        for product in self.build.read_shard(DEDUPE_PRODUCTS, task.dataset, task.shard).to_pylist():
            ledger.take(product["n_views"])
            if product["n_views"] >= 3:
                reject = Reject(RejectReason.VIEW_BEYOND_LIMIT, f"{product['n_views']} views")
                ledger.reject_product(reject, product["product_id"], views_left=product["n_views"])
                continue
            ledger.keep(product["n_views"])
            rows.append({"dataset": task.dataset, "product_id": product["product_id"], "n_views": product["n_views"]})
        return ShardOutput({"counts": pa.Table.from_pylist(rows, schema=COUNTS)}, ledger)


class LosingStage(ViewCountStage):
    """Forgets to account for a product: the executor must refuse to write the shard."""

    name = "losing"

    def run_shard(self, task: ShardTask) -> ShardOutput:
        output = super().run_shard(task)
        output.ledger.counts["products_in"] += 1
        return output


def _shop(root: Path) -> None:
    """Six products of 2 or 3 views each."""
    for p in range(6):
        for v in range(2 + p % 2):
            write(root / f"p{p}" / f"{v}.jpg", jpeg_bytes(10 * p + v))


def _config(tmp_path: Path, **extra) -> RunConfig:
    _shop(tmp_path / "shop")
    data = {
        "output_dir": str(tmp_path / "out"),
        "shard_size": 2,
        "workers": 1,
        "sources": [{"kind": "folder", "dataset": "shop", "root": str(tmp_path / "shop")}],
        "dedupe": {"min_image_side": 32},
        **extra,
    }
    return validate_config(data)


def _config_file(tmp_path: Path) -> Path:
    """The same run as a YAML file, paths relative to it, as a user writes one."""
    _shop(tmp_path / "shop")
    path = tmp_path / "run.yaml"
    path.write_text(
        "output_dir: out\nshard_size: 2\nworkers: 1\ndedupe: {min_image_side: 32}\n"
        "sources:\n  - {kind: folder, dataset: shop, root: shop}\n"
    )
    return path


@pytest.fixture
def with_view_count(monkeypatch):
    monkeypatch.setattr(pipeline, "PIPELINE", [*pipeline.PIPELINE, ViewCountStage])


def _check_view_counts(out: str) -> None:
    build = Build(out)
    counts = build.rows(TableRef("view_count", "counts"), "shop")
    rejects = build.rows(TableRef("view_count", "rejects"), "shop")
    assert sorted(r["product_id"] for r in counts) == ["p0", "p2", "p4"]
    assert sorted(r["product_id"] for r in rejects) == ["p1", "p3", "p5"]
    assert build.counts("view_count", "shop")["products_in"] == 6
    assert len(build.markers("view_count", "shop")) == 3


def test_a_stage_appended_to_the_pipeline_runs_from_the_command_line(tmp_path, with_view_count):
    config = _config_file(tmp_path)
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    _check_view_counts(str(tmp_path / "out"))
    # `fashionmv stages` lists it with the others, in order
    listed = CliRunner().invoke(app, ["stages"]).output
    assert listed.index("select") < listed.index("view_count")


@pytest.mark.slow
def test_a_stage_appended_to_the_pipeline_runs_in_the_prefect_flow(tmp_path, with_view_count):
    from prefect.testing.utilities import prefect_test_harness

    from fashionmv_builder.flows.build_fashionmv import build_fashionmv

    config = _config_file(tmp_path)
    with prefect_test_harness(server_startup_timeout=120):
        reports = build_fashionmv(str(config))
    assert [r["dataset"] for r in reports["view_count"]] == ["shop"]
    _check_view_counts(str(tmp_path / "out"))


def test_the_executor_refuses_a_shard_whose_counts_do_not_add_up(tmp_path):
    config = _config(tmp_path)
    stages = pipeline.build_stages(config, ["ingest", "dedupe"])
    run_pipeline(config, stages, LocalRunner(1))
    with pytest.raises(ConservationError, match="product counts do not add up"):
        run_pipeline(config, [LosingStage(config)], LocalRunner(1))
    assert Build(config.output_dir).markers("losing", "shop") == []


def test_a_shard_reruns_exactly_when_a_file_it_reads_changes(tmp_path):
    config = _config(tmp_path)
    run_pipeline(config, [*pipeline.build_stages(config, ["ingest", "dedupe"]), ViewCountStage(config)], LocalRunner(1))
    again = run_pipeline(config, [ViewCountStage(config)], LocalRunner(1))
    assert again["view_count"][0].skipped == 3

    # rewrite dedupe's shard 1 with the same rows: its file checksum changes only in the Parquet metadata we add
    build = Build(config.output_dir)
    marker = build.marker("dedupe", "shop", 1)
    products = build.read_shard(DEDUPE_PRODUCTS, "shop", 1)
    tables = {name: build.read_shard(TableRef("dedupe", name), "shop", 1) for name in marker.files}
    tables["products"] = products.replace_schema_metadata({b"touched": b"yes"})
    build.write_shard(
        "dedupe",
        "shop",
        1,
        tables,
        config_hash=marker.config_hash,
        fingerprint=marker.input_fingerprint,
        counts=marker.counts,
        metadata={"note": "rewritten"},
    )
    redo = run_pipeline(config, [ViewCountStage(config)], LocalRunner(1))
    assert redo["view_count"][0].skipped == 2  # only the shard that read the rewritten file


class CrashingStage(ViewCountStage):
    """Test only: its worker dies (as a crash in native code would) on the shard holding p2."""

    name = "crashing"

    def run_shard(self, task: ShardTask) -> ShardOutput:
        import os
        import signal

        if task.shard == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run_shard(task)


def test_a_worker_that_dies_fails_the_stage_instead_of_hanging_it(tmp_path):
    from fashionmv_builder.core.executor import WorkerDied

    config = _config(tmp_path, workers=2)
    run_pipeline(config, pipeline.build_stages(config, ["ingest", "dedupe"]), LocalRunner(2))
    with pytest.raises(WorkerDied, match=r"crashing: a worker process died \(signal 9\)"):
        run_pipeline(config, [CrashingStage(config)], LocalRunner(2))
    done = {m.shard for m in Build(config.output_dir).markers("crashing", "shop")}
    assert 1 not in done  # the shard it held was not written; a rerun redoes it
