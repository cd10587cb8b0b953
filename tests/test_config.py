from pathlib import Path

import pytest

from fashionmv_builder.core.config import ConfigError, load_config

BASE = """
output_dir: out
shard_size: 5
sources:
  - kind: folder
    dataset: shop
    root: catalogue
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.output_dir == str(tmp_path / "out")
    assert cfg.sources[0].root == tmp_path / "catalogue"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.max_pixels: unknown key"):
        load_config(_write(tmp_path, BASE + "ingest:\n  max_pixels: 3\n"))


def test_unknown_key_inside_a_source_names_the_source(tmp_path):
    text = BASE.replace("root: catalogue", "root: catalogue\n    base_url: http://x")
    with pytest.raises(ConfigError, match=r"sources\.0\.folder\.base_url: unknown key"):
        load_config(_write(tmp_path, text))


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"shard_size"):
        load_config(_write(tmp_path, BASE.replace("shard_size: 5", "shard_size: 0")))


def test_overrides_and_hash(tmp_path):
    path = _write(tmp_path, BASE)
    a = load_config(path)
    b = load_config(path, {"ingest.max_image_pixels": 1000})
    assert b.ingest.max_image_pixels == 1000
    assert a.config_hash() != b.config_hash()
    assert a.config_hash() == load_config(path).config_hash()


def test_embedded_sample_config_is_valid():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "sample.yaml")
    assert cfg.shard_size == 25
    assert {s.kind for s in cfg.sources} >= {"deepfashion", "fashion200k", "fashiongen"}


def test_a_refresh_is_a_run_option_in_no_stage_hash(tmp_path):
    from fashionmv_builder.pipeline import build_stages

    path = _write(tmp_path, BASE + "lmm:\n  endpoints: ['http://127.0.0.1:1']\n")
    plain = load_config(path)
    refresh = load_config(path, {"triplets.refresh.share": "10%", "triplets.refresh.slice": 3})
    assert (refresh.triplets.refresh.share, refresh.triplets.refresh.slice) == (0.1, 3)
    for a, b in zip(build_stages(plain), build_stages(refresh), strict=True):
        assert a.config_hash("shop") == b.config_hash("shop"), a.name
    with pytest.raises(ConfigError, match=r"triplets\.refresh\.share"):
        load_config(path, {"triplets.refresh.share": "0%"})
