"""The distribution as a user installs it: the built wheel in a fresh virtual environment, outside the clone."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, jpeg_bytes, write

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [built] = out.glob("fashionmv_builder-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A new venv holding only the wheel; its dependencies are the test environment's (a path file points at them),
    so nothing is downloaded and the clone's own folders are never on the path."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    return root


def test_the_wheel_holds_one_top_level_package_with_its_prompts_schemas_and_flow(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"fashionmv_builder"}
    for inside in ("prompts/caption.v1.txt", "data_schema/tables.py", "flows/build_fashionmv.py", "pipeline.py"):
        assert f"fashionmv_builder/{inside}" in names
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("__init__.py")}
    in_clone = {str(p.parent.relative_to(REPO)) for p in (REPO / "fashionmv_builder").rglob("__init__.py")}
    assert in_clone <= packages, f"packages missing from pyproject.toml: {sorted(in_clone - packages)}"


def test_the_installed_package_runs_outside_the_clone(venv, tmp_path):
    bin_dir = venv / "bin"
    done = subprocess.run([str(bin_dir / "fashionmv"), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "ingest" in done.stdout, done.stderr

    check = (
        "import fashionmv_builder, importlib.util\n"
        "assert 'site-packages' in fashionmv_builder.__file__, fashionmv_builder.__file__\n"
        "assert importlib.util.find_spec('data_schema') is None and importlib.util.find_spec('flows') is None\n"
        "from importlib.resources import files\n"
        "from fashionmv_builder.core.prompts import load_prompt\n"
        "from fashionmv_builder.data_schema import lmm_answers, tables\n"
        "ids = [p.name[:-4] for p in files('fashionmv_builder.prompts').iterdir() if p.name.endswith('.txt')]\n"
        "assert len(ids) >= 3 and all(load_prompt(i).text for i in ids), ids\n"
        "assert tables.ALL and lmm_answers.caption_answer\n"
        "import fashionmv_builder.flows.build_fashionmv, fashionmv_builder.pipeline\n"
    )
    done = subprocess.run([str(bin_dir / "python"), "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    for p in range(2):
        for v in range(2):
            write(tmp_path / "shop" / f"p{p}" / f"{v}.jpg", jpeg_bytes(10 * p + v))
    (tmp_path / "run.yaml").write_text("output_dir: out\nsources:\n  - {kind: folder, dataset: shop, root: shop}\n")
    done = subprocess.run(
        [str(bin_dir / "fashionmv"), "ingest", "run.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "ingest" / "shop" / "stats.json").exists()
