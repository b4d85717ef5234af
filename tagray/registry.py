"""Tag registry: a folder (local or ``s3://``) of named tag sets and ensembles that Serve loads.

Layout::

    registry/
      tagsets/<name>/{tags.safetensors, heads.safetensors, tagset.json}
      ensembles/<name>.json      # {"name": ..., "members": [tag-set names], "meta": {...}}

Training publishes a stage's artifact as a tag set; a search publishes its best trial as a tag set and
its top-k trials as an ensemble. Serving reads the whole registry and reloads it without restarts.
"""

from __future__ import annotations

import json
import re
import time

import fsspec

from .core.artifacts import TagSet, is_tagset, load_tagset, save_tagset
from .core.errors import ConfigError, UnknownTagError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(what, f"invalid name {name!r}: letters, digits, '_', '.', '-' only")
    return name


def _fs(root: str):
    fs, path = fsspec.core.url_to_fs(root)
    return fs, path.rstrip("/")


def publish_tagset(registry: str, name: str, tagset: TagSet | str) -> str:
    """Copy a tag set (object or path) into ``registry/tagsets/name``; returns its path."""
    _check_name(name, "name")
    ts = load_tagset(tagset) if isinstance(tagset, str) else tagset
    dest = registry.rstrip("/") + f"/tagsets/{name}"
    save_tagset(ts, dest)
    return dest


def publish_ensemble(registry: str, name: str, members: list[str], meta: dict | None = None) -> str:
    """Record an ensemble of tag sets already in the registry (same base, same function tags)."""
    _check_name(name, "name")
    if not members:
        raise ConfigError("members", "an ensemble needs at least one member")
    sets = list_tagsets(registry)
    missing = [m for m in members if m not in sets]
    if missing:
        raise UnknownTagError("members", f"not in the registry: {missing}")
    fs, root = _fs(registry)
    fs.makedirs(f"{root}/ensembles", exist_ok=True)
    doc = {
        "name": name,
        "members": list(members),
        "meta": meta or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with fs.open(f"{root}/ensembles/{name}.json", "w") as f:
        json.dump(doc, f, indent=2)
    return registry.rstrip("/") + f"/ensembles/{name}.json"


def list_tagsets(registry: str) -> list[str]:
    fs, root = _fs(registry)
    if not fs.exists(f"{root}/tagsets"):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/tagsets", detail=False)]
    prefix = registry.split("://")[0] + "://" if "://" in registry else ""
    return sorted(n for n in names if is_tagset(f"{prefix}{root}/tagsets/{n}"))


def list_ensembles(registry: str) -> dict[str, dict]:
    fs, root = _fs(registry)
    if not fs.exists(f"{root}/ensembles"):
        return {}
    out = {}
    for p in fs.ls(f"{root}/ensembles", detail=False):
        if p.endswith(".json"):
            doc = json.loads(fs.cat_file(p))
            out[doc["name"]] = doc
    return out


def load_registry(
    registry: str, expect_base: dict | None = None
) -> tuple[dict[str, TagSet], dict[str, dict]]:
    """All tag sets and ensembles of a registry; tag sets trained on another base are refused."""
    prefix = registry.rstrip("/")
    sets = {n: load_tagset(f"{prefix}/tagsets/{n}", expect_base=expect_base) for n in list_tagsets(registry)}
    ens = list_ensembles(registry)
    for e in ens.values():
        missing = [m for m in e["members"] if m not in sets]
        if missing:
            raise ConfigError(f"ensembles/{e['name']}", f"members not in the registry: {missing}")
    return sets, ens
