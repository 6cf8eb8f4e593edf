"""Where a GPU worker keeps its node's cache: the node's own disk when the node says where it is."""

from __future__ import annotations

from pathlib import Path

from cluster.worker import NODE_CACHE_ENV, node_cache_dir
from headshots.config import Config


def test_the_node_folder_wins_over_the_config_and_the_home(tmp_path):
    config = Config.from_dict({"home": str(tmp_path / "home"), "workers": {"cache_dir": str(tmp_path / "shared")}})
    assert node_cache_dir(config, {NODE_CACHE_ENV: str(tmp_path / "node-a")}) == tmp_path / "node-a"
    assert node_cache_dir(config, {}) == tmp_path / "shared"
    # Set but empty (a chart value left blank) counts as not set.
    assert node_cache_dir(config, {NODE_CACHE_ENV: ""}) == tmp_path / "shared"


def test_without_either_it_is_under_the_home(tmp_path):
    config = Config.from_dict({"home": str(tmp_path / "home")})
    assert node_cache_dir(config, {}) == Path(config.home_path) / "model-cache"
