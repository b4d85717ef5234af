"""Offline checks for the Ray cluster launcher config (``cluster.yaml``).

``python -m tagray.cluster cluster.yaml`` runs Ray's own schema check (the one ``ray up`` runs before it
touches the cloud) and then tagray's rules: a GPU-free head, at least one GPU worker type, explicit
``resources`` on every node type, Ray pins equal to the installed Ray, and sane worker bounds. No cloud
credentials or network access are needed.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

__all__ = ["main", "validate_cluster_yaml"]

# "rayproject/ray:2.60.0-py311-cu121" -> "2.60.0" (any registry/repository, tag starts with the version).
_IMAGE_VERSION_RE = re.compile(r"^(\d+\.\d+\.\d+)(?:[-.].*)?$")
# `ray==X` or `ray[extras]==X` inside a shell command, not `xray==` / `ray-foo==`.
_RAY_PIN_RE = re.compile(r"(?<![\w.-])ray(?:\[[^\]]*\])?\s*==\s*([0-9][^\s'\";,]*)")
_COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
_NODE_COMMAND_KEYS = ("initialization_commands", "worker_setup_commands")
_DOCKER_IMAGE_KEYS = ("image", "head_image", "worker_image")


def _fail(key: str, why: str) -> NoReturn:
    raise ValueError(f"{key}: {why}")


def _schema_key(err: Any) -> str:
    """Dotted key of a ``jsonschema.ValidationError``, naming the missing/unexpected property if any."""
    parts = [str(p) for p in err.absolute_path]
    instance = err.instance if isinstance(err.instance, dict) else {}
    if err.validator == "required":
        parts += [p for p in err.validator_value if p not in instance][:1]
    elif err.validator == "additionalProperties":
        known = set(err.schema.get("properties", {}))
        patterns = list(err.schema.get("patternProperties", {}))
        parts += [
            str(k) for k in instance if k not in known and not any(re.search(p, str(k)) for p in patterns)
        ][:1]
    return ".".join(parts) or "<root>"


def _ray_schema_check(cfg: dict[str, Any]) -> None:
    """Run Ray's ``prepare_config`` + ``validate_config`` (offline) and re-raise failures as ValueError."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    util_logger = logging.getLogger("ray.autoscaler._private.util")
    level = util_logger.level
    util_logger.setLevel(logging.WARNING)  # silence "setting max workers for head node type to 0"
    try:
        try:
            prepared = prepare_config(cfg)
        except KeyError as e:
            _fail(str(e.args[0]) if e.args else "<root>", "missing (required by Ray's prepare_config)")
        except (AssertionError, TypeError, AttributeError, NotImplementedError) as e:
            _fail("<root>", f"Ray's prepare_config rejected the config: {e}")
        try:
            validate_config(prepared)
        except jsonschema.ValidationError as e:
            _fail(_schema_key(e), f"Ray schema: {e.message}")
        except ValueError as e:  # head_node_type / sum of min_workers: name the key it quotes
            quoted = re.search(r"`(\w+)", str(e))
            _fail(quoted.group(1) if quoted else "<root>", f"Ray: {e}")
        except (RuntimeError, KeyError) as e:
            _fail("<root>", f"Ray's validate_config rejected the config: {e}")
    finally:
        util_logger.setLevel(level)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, f"must be a number, got {value!r}")
    return float(value)


def _iter_commands(cfg: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield ``(dotted key, command)`` for every shell command list in the config."""
    sources: list[tuple[str, Any]] = [(k, cfg.get(k)) for k in _COMMAND_KEYS]
    for name, node in (cfg.get("available_node_types") or {}).items():
        if isinstance(node, dict):
            sources += [(f"available_node_types.{name}.{k}", node.get(k)) for k in _NODE_COMMAND_KEYS]
    for key, commands in sources:
        for i, command in enumerate(commands or []):
            if isinstance(command, str):
                yield f"{key}[{i}]", command


def _docker_images(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """``(dotted key, image)`` for the global docker images and per-node-type worker images."""
    docker = cfg.get("docker") or {}
    images = [(f"docker.{k}", docker[k]) for k in _DOCKER_IMAGE_KEYS if docker.get(k)]
    for name, node in (cfg.get("available_node_types") or {}).items():
        node_image = ((node or {}).get("docker") or {}).get("worker_image")
        if node_image:
            images.append((f"available_node_types.{name}.docker.worker_image", node_image))
    return images


def _image_ray_version(image: str) -> str | None:
    """The Ray version an image tag starts with, or None (no tag, digest-only, ``latest``/``nightly``)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    match = _IMAGE_VERSION_RE.match(last.rsplit(":", 1)[1])
    return match.group(1) if match else None


def _project_rules(cfg: dict[str, Any], ray_version: str) -> None:
    """tagray's own rules, on the config as written (before Ray fills in defaults)."""
    node_types = cfg.get("available_node_types")
    if not isinstance(node_types, dict) or not node_types:
        _fail("available_node_types", "must list the node types explicitly")
    head = cfg.get("head_node_type")
    global_max = cfg.get("max_workers")

    for name, node in node_types.items():
        base = f"available_node_types.{name}"
        resources = node.get("resources")
        if not isinstance(resources, dict) or "CPU" not in resources:
            _fail(f"{base}.resources", "every node type must set resources explicitly (at least CPU)")
        if name == head:
            if _number(resources.get("GPU", 0), f"{base}.resources.GPU") > 0:
                _fail(f"{base}.resources.GPU", "head must not have GPUs")
            continue
        max_workers = node.get("max_workers", global_max)
        if max_workers is not None and node.get("min_workers", 0) > max_workers:
            _fail(f"{base}.min_workers", f"min_workers {node.get('min_workers')} > max_workers {max_workers}")

    gpu_workers = [
        n
        for n, node in node_types.items()
        if n != head
        and _number(node["resources"].get("GPU", 0), f"available_node_types.{n}.resources.GPU") >= 1
    ]
    if not gpu_workers:
        _fail("available_node_types", "at least one worker node type needs resources.GPU >= 1")

    images = _docker_images(cfg)
    if not images:
        _fail("docker.image", f"a docker image pinned to Ray {ray_version} is required")
    for key, image in images:
        found = _image_ray_version(str(image))
        if found is None:
            _fail(
                key, f"image {image!r} must be tagged with the Ray version, e.g. '{ray_version}-py311-cu121'"
            )
        if found != ray_version:
            _fail(key, f"image {image!r} has Ray {found}, but the installed Ray is {ray_version}")

    for key, command in _iter_commands(cfg):
        for pinned in _RAY_PIN_RE.findall(command):
            if pinned != ray_version:
                _fail(key, f"pins ray=={pinned}, but the installed Ray is {ray_version}")


def validate_cluster_yaml(path: str | Path) -> dict[str, Any]:
    """Load and validate a cluster launcher YAML; return the parsed config or raise ``ValueError``.

    The error message starts with the offending dotted key, e.g.
    ``available_node_types.head.resources.GPU: head must not have GPUs``.
    """
    import ray

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"<root>: not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        _fail("<root>", f"must be a mapping, got {type(cfg).__name__}")
    _ray_schema_check(cfg)
    _project_rules(cfg, ray.__version__)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m tagray.cluster [cluster.yaml]``; prints ``<file>: OK`` or the error (exit 2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or any(a in ("-h", "--help") for a in args):
        print("usage: python -m tagray.cluster [cluster.yaml]", file=sys.stderr)
        return 2
    path = args[0] if args else "cluster.yaml"
    try:
        validate_cluster_yaml(path)
    except (OSError, ValueError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    print(f"{path}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
