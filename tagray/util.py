"""Small helpers every layer shares: YAML files with ``--set`` overrides, a stable hash, URIs, the
environment Ray workers get. One of each, so config, tasks, search and serving read files alike."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import yaml

from .core.errors import ConfigError

# Environment every Ray worker and replica gets: quiet progress bars, no preemption watcher, no
# tokenizer thread pools fighting torch's. Credentials are never copied here (they would be stored in
# the job's runtime_env, visible to anyone who can list jobs): workers read them from their own node.
WORKER_ENV = {
    "TAGRAY_PROGRESS": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# Non-secret settings forwarded from the driver to workers when set (where data and models live).
FORWARDED_ENV = (
    "TAGRAY_CACHE",
    "TAGRAY_PREFIX_SHARED",
    "HF_HUB_OFFLINE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def worker_env() -> dict[str, str]:
    """:data:`WORKER_ENV` plus the :data:`FORWARDED_ENV` variables set in this process."""
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return env


def is_remote(path: str) -> bool:
    return "://" in path


def abs_uri(path: str) -> str:
    """Absolute local path, or the URI unchanged (``s3://...``): workers run in other directories."""
    return path if is_remote(path) else os.path.abspath(path)


def join_uri(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def stable_hash(doc: Any, size: int = 4) -> str:
    """Short hex digest of a JSON-able document (sorted keys): equal configs give equal hashes."""
    return hashlib.blake2b(
        json.dumps(doc, sort_keys=True, default=str).encode(), digest_size=size
    ).hexdigest()


def read_yaml(path: str, what: str = "config") -> Any:
    """Parse a YAML file (local or ``s3://``); errors name ``what``."""
    import fsspec

    if not is_remote(path) and not os.path.exists(path):
        raise ConfigError(what, f"{path} does not exist")
    try:
        with fsspec.open(path, "r") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(what, f"{path} is not valid YAML: {e}") from e
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(what, f"cannot read {path}: {e}") from e


def set_dotted(d: dict, key: str, value: Any) -> None:
    """``train.lr=1e-3`` or ``stages.1.train.max_steps=5`` on a raw config dict."""
    parts = key.split(".")
    cur: Any = d
    for p in parts[:-1]:
        if isinstance(cur, list):
            if not p.isdigit() or int(p) >= len(cur):
                raise ConfigError(key, f"{p!r} is not a valid list index")
            cur = cur[int(p)]
        elif isinstance(cur, dict):
            cur = cur.setdefault(p, {})
        else:
            raise ConfigError(key, f"{p!r} is not a mapping")
    last = parts[-1]
    if isinstance(cur, list):
        if not last.isdigit() or int(last) >= len(cur):
            raise ConfigError(key, f"{last!r} is not a valid list index")
        cur[int(last)] = value
    else:
        cur[last] = value


def apply_overrides(raw: Any, overrides: list[str] | None) -> Any:
    """Apply ``key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError("--set", f"expected key=value, got {o!r}")
        if not isinstance(raw, dict):
            raise ConfigError("config", "expected a YAML mapping at the top level")
        k, v = o.split("=", 1)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(k.strip(), f"value {v!r} is not valid YAML: {e}") from e
        set_dotted(raw, k.strip(), value)
    return raw


def load_yaml(path: str, overrides: list[str] | None = None, what: str = "config") -> Any:
    """:func:`read_yaml` then :func:`apply_overrides`."""
    return apply_overrides(read_yaml(path, what), overrides)
