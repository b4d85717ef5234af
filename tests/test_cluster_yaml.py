"""The shipped cluster.yaml passes Ray's offline schema check and tagray's rules; broken copies fail loudly."""

from __future__ import annotations

import copy
import os
import subprocess
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
    assert ray.__version__ in cfg["docker"]["image"]
    assert all("resources" in node for node in cfg["available_node_types"].values())


def reachable_gpus(cfg: Config) -> int:
    """The most GPUs the autoscaler can have up at once: per-type max_workers within the global cap,
    the GPU-richest types first."""
    left, total = cfg["max_workers"], 0
    types = [cfg["available_node_types"][n] for n in _workers(cfg)]
    for node in sorted(types, key=lambda t: -t["resources"].get("GPU", 0)):
        n = min(node.get("max_workers", left), left)
        total, left = total + n * int(node["resources"].get("GPU", 0)), left - n
    return total


def test_reachable_gpus_counts_the_global_cap() -> None:
    node = {"resources": {"GPU": 4}, "max_workers": 3}
    small = {"resources": {"GPU": 1}, "max_workers": 10}
    cfg = {"head_node_type": "h", "max_workers": 4, "available_node_types": {"h": {}, "a": small, "b": node}}
    assert reachable_gpus(cfg) == 3 * 4 + 1


def test_head_declares_one_driver_slot_per_reachable_gpu(shipped: Config) -> None:
    """Search trial drivers take TRAIN_DRIVER_RESOURCE: 1 each and pin to the head: it declares as many as
    the most GPUs the autoscaler can reach (12), so the driver slots never cap the trials that fit."""
    head = shipped["available_node_types"][shipped["head_node_type"]]["resources"]
    assert head["TRAIN_DRIVER_RESOURCE"] == reachable_gpus(shipped) == 12


def test_shipped_cluster_yaml_is_launchable_as_is(shipped: Config) -> None:
    """No account ids to fill in, a current AMI in any region, token auth on every node, SSH-only ingress."""
    for name, node in shipped["available_node_types"].items():
        nc = node["node_config"]
        assert set(nc["IamInstanceProfile"]) == {"Name"}, f"{name}: a profile name needs no account id"
        assert nc["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"), name
    assert "IpPermissions" not in shipped["provider"]["security_group"]
    options = shipped["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in options
    token_path = next(o.split("=", 1)[1] for o in options if "RAY_AUTH_TOKEN_PATH=" in o)
    mount = os.path.dirname(token_path)
    assert shipped["file_mounts"][mount] == "~/.tagray/ray-auth", "the laptop's token dir goes to every node"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in shipped[key]), key


def _setup_script(shipped: Config, tmp_path: Path, pip_rc: int) -> tuple[Path, dict[str, str]]:
    """The shipped setup command against this checkout, with a fake `pip` that logs its calls."""
    repo = str(CLUSTER_YAML.parent)
    script = tmp_path / "setup.sh"
    script.write_text(shipped["setup_commands"][0].replace("/home/ray/tagray", repo))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    pip = bin_dir / "pip"
    pip.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/pip.log\nexit {pip_rc}\n')
    pip.chmod(0o755)
    user_base = tmp_path / "pyuser"
    user_base.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUSERBASE": str(user_base),
    }
    return script, env


def test_setup_installs_once_per_dependency_set(shipped: Config, tmp_path: Path) -> None:
    script, env = _setup_script(shipped, tmp_path, pip_rc=1)
    assert subprocess.run(["bash", str(script)], env=env).returncode != 0, "a failed install fails setup"
    assert not list((tmp_path / "pyuser").glob(".tagray-deps-*")), "and leaves no stamp"
    script, env = _setup_script(shipped, tmp_path, pip_rc=0)
    (tmp_path / "pip.log").unlink()
    for _ in range(2):  # a re-run (code change, resumed node) finds the stamp and installs nothing
        assert subprocess.run(["bash", str(script)], env=env).returncode == 0
    calls = (tmp_path / "pip.log").read_text().splitlines()
    assert len(calls) == 3 and all(c.startswith("install --user") for c in calls), calls
    assert f"ray[train,tune,serve]=={ray.__version__}" in calls[0]
    assert len(list((tmp_path / "pyuser").glob(".tagray-deps-*"))) == 1


def test_cli_ok_and_error(tmp_path: Path, shipped: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(CLUSTER_YAML)]) == 0
    assert capsys.readouterr().out.strip() == f"{CLUSTER_YAML}: OK"
    bad = copy.deepcopy(shipped)
    bad["available_node_types"][bad["head_node_type"]]["resources"]["GPU"] = 1
    assert main([str(_write(tmp_path, bad))]) == 2
    assert "head must not have GPUs" in capsys.readouterr().err


def test_tagray_validate_cluster_names_the_placeholder_field(
    tmp_path: Path, shipped: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from tagray.cli import main as tagray_main

    assert tagray_main(["validate-cluster", str(CLUSTER_YAML)]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")
    bad = copy.deepcopy(shipped)
    _account_arn(bad)
    assert tagray_main(["validate-cluster", str(_write(tmp_path, bad))]) == 2
    err = capsys.readouterr().err
    field = f"available_node_types.{bad['head_node_type']}.node_config.IamInstanceProfile.Arn"
    assert f"{field}: placeholder '123456789012'" in err, err


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


def _head_nc(cfg: Config) -> Config:
    return cfg["available_node_types"][cfg["head_node_type"]]["node_config"]


def _worker_nc(cfg: Config) -> Config:
    return cfg["available_node_types"][_workers(cfg)[0]]["node_config"]


def _account_arn(cfg: Config) -> None:
    _head_nc(cfg)["IamInstanceProfile"] = {"Arn": "arn:aws:iam::123456789012:instance-profile/tagray-head"}


def _ami_replace_me(cfg: Config) -> None:
    _worker_nc(cfg)["ImageId"] = "ami-REPLACE_ME"


def _ami_xxx(cfg: Config) -> None:
    _worker_nc(cfg)["ImageId"] = "ami-xxxxxxxx"


def _angle_placeholder(cfg: Config) -> None:
    cfg["provider"]["region"] = "<your-region>"


def _unexpanded_env(cfg: Config) -> None:
    _head_nc(cfg)["IamInstanceProfile"] = {"Name": "${TAGRAY_HEAD_PROFILE}"}


def _image_unpublished_cuda(cfg: Config) -> None:
    cfg["docker"]["image"] = f"rayproject/ray:{ray.__version__}-py311-cu122"


def _image_ray_ml(cfg: Config) -> None:
    cfg["docker"]["image"] = f"rayproject/ray-ml:{ray.__version__}-py311-gpu"


def _auth_disabled(cfg: Config) -> None:
    cfg["worker_start_ray_commands"] = [
        "ray stop",
        "RAY_AUTH_MODE=disabled ray start --address=$RAY_HEAD_IP:6379",
    ]


def _head_without_token(cfg: Config) -> None:
    cfg["docker"]["run_options"] = [o for o in cfg["docker"]["run_options"] if "RAY_AUTH_MODE" not in o]
    cfg["head_start_ray_commands"] = ["ray stop", "ray start --head --port=6379 --dashboard-host=127.0.0.1"]


def _default_start_commands(cfg: Config) -> None:
    del cfg["worker_start_ray_commands"]


def _inline_token(cfg: Config) -> None:
    cfg["docker"]["run_options"].append("--env RAY_AUTH_TOKEN=0123abcd")


def _token_not_mounted(cfg: Config) -> None:
    cfg["file_mounts"] = {k: v for k, v in cfg["file_mounts"].items() if "auth" not in k}


def _open_dashboard(cfg: Config) -> None:
    rule = {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    cfg["provider"]["security_group"]["IpPermissions"] = [rule]


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
    (
        "account_arn",
        _account_arn,
        lambda c: (
            f"available_node_types.{c['head_node_type']}.node_config.IamInstanceProfile.Arn: placeholder"
        ),
    ),
    (
        "ami_replace_me",
        _ami_replace_me,
        lambda c: f"available_node_types.{_workers(c)[0]}.node_config.ImageId",
    ),
    ("ami_xxx", _ami_xxx, lambda c: "placeholder 'xxxxxxxx'"),
    ("angle_placeholder", _angle_placeholder, lambda c: "provider.region: placeholder '<your-region>'"),
    (
        "unexpanded_env",
        _unexpanded_env,
        lambda c: "IamInstanceProfile.Name: ${TAGRAY_HEAD_PROFILE} is not expanded",
    ),
    ("image_unpublished_cuda", _image_unpublished_cuda, lambda c: "docker.image: image"),
    ("image_ray_ml", _image_ray_ml, lambda c: "docker.image: rayproject/ray-ml is no longer published"),
    ("auth_disabled", _auth_disabled, lambda c: "worker_start_ray_commands[1]: RAY_AUTH_MODE=disabled"),
    (
        "head_without_token",
        _head_without_token,
        lambda c: "head_start_ray_commands[1]: `ray start` without token",
    ),
    (
        "default_start_commands",
        _default_start_commands,
        lambda c: "worker_start_ray_commands: must start Ray",
    ),
    ("inline_token", _inline_token, lambda c: "docker.run_options: RAY_AUTH_TOKEN set inline"),
    ("token_not_mounted", _token_not_mounted, lambda c: "is not under a file_mounts path"),
    ("open_dashboard", _open_dashboard, lambda c: "provider.security_group.IpPermissions[0]: opens tcp 8265"),
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


def test_ssh_only_rule_and_derived_images_pass(tmp_path: Path, shipped: Config) -> None:
    cfg = copy.deepcopy(shipped)
    ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}
    cfg["provider"]["security_group"]["IpPermissions"] = [ssh]
    cfg["docker"]["image"] = f"registry.example/tagray:{ray.__version__}-py311-cu121-abc123"  # built FROM ray
    validate_cluster_yaml(_write(tmp_path, cfg))


def test_non_mapping_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        validate_cluster_yaml(path)
