"""The shipped cluster.yaml passes Ray's offline schema check and tagray's rules; broken copies fail loudly."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from tagray.cluster import main, validate_cluster_yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
Config = dict[str, Any]


@pytest.fixture(scope="module")
def shipped() -> Config:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _write(tmp_path: Path, cfg: Config) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _workers(cfg: Config) -> list[str]:
    return [n for n in cfg["available_node_types"] if n != cfg["head_node_type"]]


def test_shipped_cluster_yaml_validates() -> None:
    cfg = validate_cluster_yaml(CLUSTER_YAML)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["TRAIN_DRIVER_RESOURCE"] == 1
    assert ray.__version__ in cfg["docker"]["image"]
    assert all("resources" in node for node in cfg["available_node_types"].values())


def test_cli_ok_and_error(tmp_path: Path, shipped: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(CLUSTER_YAML)]) == 0
    assert capsys.readouterr().out.strip() == f"{CLUSTER_YAML}: OK"
    bad = copy.deepcopy(shipped)
    bad["available_node_types"][bad["head_node_type"]]["resources"]["GPU"] = 1
    assert main([str(_write(tmp_path, bad))]) == 2
    assert "head must not have GPUs" in capsys.readouterr().err


def _head_gpu(cfg: Config) -> None:
    cfg["available_node_types"][cfg["head_node_type"]]["resources"]["GPU"] = 1


def _no_gpu_worker(cfg: Config) -> None:
    for name in _workers(cfg):
        cfg["available_node_types"][name]["resources"].pop("GPU")


def _worker_gpu_zero(cfg: Config) -> None:
    for name in _workers(cfg):
        cfg["available_node_types"][name]["resources"]["GPU"] = 0


def _no_resources(cfg: Config) -> None:
    del cfg["available_node_types"][_workers(cfg)[0]]["resources"]


def _empty_resources(cfg: Config) -> None:
    cfg["available_node_types"][_workers(cfg)[0]]["resources"] = {}


def _image_version(cfg: Config) -> None:
    cfg["docker"]["image"] = "rayproject/ray:2.9.3-py311-cu121"


def _image_latest(cfg: Config) -> None:
    cfg["docker"]["image"] = "rayproject/ray:latest-gpu"


def _pip_pin(cfg: Config) -> None:
    cfg["setup_commands"] = ["pip install -U 'ray[train,tune,serve]==2.9.3'"] + cfg["setup_commands"]


def _min_over_max(cfg: Config) -> None:
    node = cfg["available_node_types"][_workers(cfg)[0]]
    node["min_workers"], node["max_workers"] = 3, 1


def _typo_top_level(cfg: Config) -> None:
    cfg["max_worker"] = cfg.pop("max_workers")


def _typo_node_key(cfg: Config) -> None:
    cfg["available_node_types"][_workers(cfg)[0]]["min_worker"] = 0


def _bad_head_type(cfg: Config) -> None:
    cfg["head_node_type"] = "nope"


CASES: list[tuple[str, Callable[[Config], None], Callable[[Config], str]]] = [
    ("head_gpu", _head_gpu, lambda c: f"available_node_types.{c['head_node_type']}.resources.GPU"),
    ("no_gpu_worker", _no_gpu_worker, lambda c: "at least one worker node type needs resources.GPU"),
    ("worker_gpu_zero", _worker_gpu_zero, lambda c: "available_node_types"),
    ("no_resources", _no_resources, lambda c: f"available_node_types.{_workers(c)[0]}.resources"),
    ("empty_resources", _empty_resources, lambda c: f"available_node_types.{_workers(c)[0]}.resources"),
    ("image_version", _image_version, lambda c: "docker.image"),
    ("image_latest", _image_latest, lambda c: "docker.image"),
    ("pip_pin", _pip_pin, lambda c: "setup_commands[0]"),
    ("min_over_max", _min_over_max, lambda c: f"available_node_types.{_workers(c)[0]}.min_workers"),
    ("typo_top_level", _typo_top_level, lambda c: "max_worker"),
    ("typo_node_key", _typo_node_key, lambda c: f"available_node_types.{_workers(c)[0]}.min_worker"),
    ("bad_head_type", _bad_head_type, lambda c: "head_node_type"),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mutated_config_fails(
    tmp_path: Path,
    shipped: Config,
    mutate: Callable[[Config], None],
    expected: Callable[[Config], str],
) -> None:
    cfg = copy.deepcopy(shipped)
    mutate(cfg)
    with pytest.raises(ValueError) as info:
        validate_cluster_yaml(_write(tmp_path, cfg))
    assert expected(cfg) in str(info.value)


def test_version_mismatch_names_both_versions(tmp_path: Path, shipped: Config) -> None:
    cfg = copy.deepcopy(shipped)
    _image_version(cfg)
    with pytest.raises(ValueError, match=r"^docker\.image: .*2\.9\.3.*installed Ray is " + ray.__version__):
        validate_cluster_yaml(_write(tmp_path, cfg))


def test_typo_is_rejected_by_ray_schema(tmp_path: Path, shipped: Config) -> None:
    cfg = copy.deepcopy(shipped)
    cfg["setup_comands"] = []
    with pytest.raises(ValueError, match=r"^setup_comands: Ray schema: Additional properties"):
        validate_cluster_yaml(_write(tmp_path, cfg))


def test_non_mapping_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        validate_cluster_yaml(path)
