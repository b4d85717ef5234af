"""Offline checks for the Ray cluster launcher config (``cluster.yaml``).

``python -m tagray.cluster cluster.yaml`` runs Ray's own schema check (the one ``ray up`` runs before it
touches the cloud) and then tagray's rules: a GPU-free head, at least one GPU worker type, explicit
``resources`` on every node type, Ray pins equal to the installed Ray, an image tag that Ray publishes,
sane worker bounds, no placeholders left (example account ids, ``<...>``, ``REPLACE_ME``, ``xxx``,
unexpanded ``${VAR}``), Ray started with token authentication on every node (the token from a file, never
in the config), and a security group that opens nothing but SSH. No cloud credentials or network access
are needed.
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
_START_KEYS = ("head_start_ray_commands", "worker_start_ray_commands")
# Left-over template values: AWS's documentation account ids, <your-value>, REPLACE_ME-style markers, xxx.
_PLACEHOLDERS = (
    re.compile(r"(?<!\d)(123456789012|111122223333|000000000000)(?!\d)"),
    re.compile(r"<[A-Za-z][^<>\s]*>"),
    re.compile(r"(?i)(replace[_-]?me|change[_-]?me|fill[_-]?me|\byour[_-]\w+|\btodo\b)"),
    re.compile(r"(?i)(?<![a-z0-9])x{3,}(?![a-z0-9])"),
)
# `${VAR}` is never expanded by `ray up`; in shell commands it is the shell's, so only checked elsewhere.
_UNEXPANDED = re.compile(r"\$\{[^}]*\}")
# rayproject/ray tags are {version}-py{XY}-{platform}[-aarch64]; the Python versions and platforms Ray's
# image matrix builds (ray-project/ray: ray-images.yaml). ray-ml was last published for 2.49.
_RAY_IMAGE_RE = re.compile(r"^(?:docker\.io/)?rayproject/(ray|ray-ml|ray-llm):(.+)$")
_RAY_TAG_RE = re.compile(r"^\d+\.\d+\.\d+(?:-(py\d+))?(?:-(cpu|gpu|tpu|cu\d+))?(?:-aarch64)?$")
_RAY_PYTHONS = ("py310", "py311", "py312", "py313")
_RAY_PLATFORMS = (
    "cpu",
    "gpu",
    "tpu",
    "cu117",
    "cu118",
    "cu121",
    "cu123",
    "cu124",
    "cu125",
    "cu126",
    "cu128",
    "cu129",
)
_AUTH_ON = re.compile(r"RAY_AUTH_MODE=token\b")
_AUTH_VAR = re.compile(r"RAY_AUTH_MODE=(\w+)")
_TOKEN_LITERAL = re.compile(r"RAY_AUTH_TOKEN=(?![\"']?\$)")
_TOKEN_PATH = re.compile(r"RAY_AUTH_TOKEN_PATH=([^\s;'\"]+)")


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

    for key, command in _iter_commands(cfg):
        for pinned in _RAY_PIN_RE.findall(command):
            if pinned != ray_version:
                _fail(key, f"pins ray=={pinned}, but the installed Ray is {ray_version}")


def _image_rules(cfg: dict[str, Any], ray_version: str) -> None:
    """Every docker image carries the installed Ray version; a rayproject image uses a published tag."""
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
        official = _RAY_IMAGE_RE.match(str(image).split("@", 1)[0])
        if not official:
            continue  # a derived image (e.g. tagray's own, built FROM rayproject/ray): its tag is the user's
        if official.group(1) == "ray-ml":
            _fail(key, "rayproject/ray-ml is no longer published (last: 2.49); use rayproject/ray")
        tag = _RAY_TAG_RE.match(official.group(2))
        python, platform = (tag.group(1), tag.group(2)) if tag else (None, None)
        if (
            not tag
            or (python and python not in _RAY_PYTHONS)
            or (platform and platform not in _RAY_PLATFORMS)
        ):
            _fail(
                key,
                f"image {image!r} is not a published rayproject tag: {{version}}-py{{XY}}-{{platform}} with "
                f"Python in {', '.join(_RAY_PYTHONS)} and platform in {', '.join(_RAY_PLATFORMS)}",
            )


def _leaves(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, scalar)`` for every scalar of a parsed YAML tree (list items as ``key[i]``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}[{i}]")
    else:
        yield key, value


def _placeholder_rules(cfg: dict[str, Any]) -> None:
    """No template value left to fill in: ``ray up`` would send it to AWS as is."""
    commands = {key for key, _ in _iter_commands(cfg)}
    for key, value in _leaves(cfg, ""):
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            continue
        text = str(value)
        for pattern in _PLACEHOLDERS:
            found = pattern.search(text)
            if found:
                _fail(key, f"placeholder {found.group(0)!r} left in {text!r}: set a real value")
        found = _UNEXPANDED.search(text) if key not in commands else None
        if found:
            _fail(key, f"{found.group(0)} is not expanded by `ray up`: substitute it first (e.g. envsubst)")


def _auth_rules(cfg: dict[str, Any]) -> None:
    """Token auth on for every ``ray start``; the token comes from a file every node gets, never inline."""
    options = " ".join(str(o) for o in (cfg.get("docker") or {}).get("run_options") or [])
    for key, text in [("docker.run_options", options), *_iter_commands(cfg)]:
        for mode in _AUTH_VAR.findall(text):
            if mode != "token":
                _fail(key, f"RAY_AUTH_MODE={mode}: the cluster must run with token authentication")
        if _TOKEN_LITERAL.search(text):
            _fail(
                key,
                "RAY_AUTH_TOKEN set inline: the token would be stored in the cluster config and logs; "
                "mount a token file (file_mounts) and set RAY_AUTH_TOKEN_PATH",
            )
    for list_key in _START_KEYS:
        starts = [(k, c) for k, c in _iter_commands(cfg) if k.startswith(list_key) and "ray start" in c]
        if not starts:
            _fail(list_key, "must start Ray explicitly (Ray's default commands run it without token auth)")
        for key, command in starts:
            before = command[: command.index("ray start")]
            if not _AUTH_ON.search(before) and not _AUTH_ON.search(options):
                _fail(key, "`ray start` without token authentication: prefix it with RAY_AUTH_MODE=token")
    mounts = [str(m).rstrip("/") for m in (cfg.get("file_mounts") or {})]
    for key, text in [("docker.run_options", options), *_iter_commands(cfg)]:
        for path in _TOKEN_PATH.findall(text):
            if not any(path == m or path.startswith(m + "/") for m in mounts):
                _fail(key, f"RAY_AUTH_TOKEN_PATH={path} is not under a file_mounts path: nodes would lack it")


def _security_group_rules(cfg: dict[str, Any]) -> None:
    """Extra ingress rules may only open SSH (22) or admit the cluster's own security groups."""
    rules = ((cfg.get("provider") or {}).get("security_group") or {}).get("IpPermissions") or []
    for i, rule in enumerate(rules):
        outside = any(rule.get(k) for k in ("IpRanges", "Ipv6Ranges", "PrefixListIds"))
        ssh = rule.get("IpProtocol") == "tcp" and rule.get("FromPort") == 22 and rule.get("ToPort") == 22
        if outside and not ssh:
            _fail(
                f"provider.security_group.IpPermissions[{i}]",
                f"opens {rule.get('IpProtocol')} {rule.get('FromPort')}-{rule.get('ToPort')} beyond the "
                "cluster; only SSH (22) may: reach the dashboard with `ray dashboard`, Serve via an ssh tunnel",
            )


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
    _image_rules(cfg, ray.__version__)
    _placeholder_rules(cfg)
    _auth_rules(cfg)
    _security_group_rules(cfg)
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
