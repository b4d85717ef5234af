"""The tag artifact: ``tags.safetensors`` + ``heads.safetensors`` + ``tagset.json``. No pickle anywhere.

A tag set is cumulative: the artifact of stage 2 holds stage 1's domain tags too, so the last stage's
folder is all that serving needs. ``tagset.json`` records the base fingerprint, and loading onto a
different base raises :class:`FingerprintMismatch`. Paths may be local or ``s3://`` (via fsspec).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import __version__
from .base import fingerprint_id, same_base
from .errors import ConfigError, FingerprintMismatch
from .heads import HeadSpec

FORMAT = "tagray.tagset/1"
FILES = ("tags.safetensors", "heads.safetensors", "tagset.json")
STATS = "::feature_stats"


@dataclass
class TagSet:
    """Tags, heads and what is needed to use them.

    Attributes:
        tags: name -> ``(p, d)`` float32.
        heads: function-tag name -> ``(out_dim, d + 1)`` rows ``[W | b]``.
        tag_info: name -> ``{"kind": "domain"|"function", "length": p, "stage": str}``.
        head_specs: name -> :class:`HeadSpec`.
        base: fingerprint of the base model (:func:`tagray.core.base.fingerprint`).
        tasks: task name -> task definition (template, fields, target) so predict/serve need no config.
        metrics: task name -> metric name -> value (validation / test).
    """

    tags: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    tag_info: dict[str, dict]
    head_specs: dict[str, HeadSpec]
    base: dict
    tasks: dict[str, dict] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    stage: str | None = None
    meta: dict = field(default_factory=dict)
    head_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """name -> ``(2, d)`` fixed feature mean / std the head standardises its input with."""

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "tagray_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stage": self.stage,
            "base": self.base,
            "base_id": fingerprint_id(self.base),
            "tags": self.tag_info,
            "heads": {n: s.to_json() for n, s in self.head_specs.items()},
            "tasks": self.tasks,
            "metrics": self.metrics,
            "meta": self.meta,
        }

    def check_base(self, fp: dict, where: str = "tags") -> None:
        """Raise :class:`FingerprintMismatch` unless this set was trained on the base ``fp``."""
        if not same_base(self.base, fp):
            raise FingerprintMismatch(
                where,
                f"trained on base {fingerprint_id(self.base)}, but the loaded base is {fingerprint_id(fp)}",
            )


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def save_tagset(ts: TagSet, path: str) -> str:
    """Write the three files under ``path`` (local folder or ``s3://bucket/prefix``); returns ``path``."""
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in ts.tags.items()}
    heads = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in ts.heads.items()}
    heads.update(
        {f"{n}{STATS}": t.detach().to("cpu", torch.float32).contiguous() for n, t in ts.head_stats.items()}
    )
    blobs = {
        "tags.safetensors": st_save(tensors, metadata={"format": FORMAT}),
        "heads.safetensors": st_save(heads, metadata={"format": FORMAT}),
        # json last: a reader that finds tagset.json finds complete tensors
        "tagset.json": json.dumps(ts.to_json(), indent=2, sort_keys=False).encode(),
    }
    for name, data in blobs.items():
        with fs.open(_join(root, name), "wb") as f:
            f.write(data)
    return path


def is_tagset(path: str) -> bool:
    try:
        fs, root = fsspec.core.url_to_fs(path)
        return fs.exists(_join(root, "tagset.json"))
    except Exception:  # noqa: BLE001 - unreachable storage is simply "not a tag set"
        return False


def load_tagset(path: str, expect_base: dict | None = None) -> TagSet:
    """Read a tag set; with ``expect_base`` refuse one trained on another base."""
    fs, root = fsspec.core.url_to_fs(path)
    meta_path = _join(root, "tagset.json")
    if not fs.exists(meta_path):
        raise ConfigError("tags", f"{path} holds no tagset.json (expected {', '.join(FILES)})")
    try:
        meta = json.loads(fs.cat_file(meta_path))
    except json.JSONDecodeError as e:
        raise ConfigError("tags", f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise ConfigError(
            "tags", f"{meta_path}: unsupported format {meta.get('format')!r}, expected {FORMAT}"
        )
    tags = st_load(fs.cat_file(_join(root, "tags.safetensors")))
    heads_all = st_load(fs.cat_file(_join(root, "heads.safetensors")))
    heads = {n: t for n, t in heads_all.items() if not n.endswith(STATS)}
    stats = {n[: -len(STATS)]: t for n, t in heads_all.items() if n.endswith(STATS)}
    for n, info in meta["tags"].items():
        if n not in tags or tags[n].shape[0] != info["length"]:
            raise ConfigError("tags", f"{path}: tag {n} missing or of the wrong length in tags.safetensors")
    ts = TagSet(
        tags=tags,
        heads=heads,
        tag_info=meta["tags"],
        head_specs={n: HeadSpec.from_json(s) for n, s in meta["heads"].items()},
        base=meta["base"],
        tasks=meta.get("tasks", {}),
        metrics=meta.get("metrics", {}),
        stage=meta.get("stage"),
        meta=meta.get("meta", {}),
        head_stats=stats,
    )
    if expect_base is not None:
        ts.check_base(expect_base, where=str(path))
    return ts


def _digest(t: torch.Tensor) -> str:
    a = t.detach().to("cpu", torch.float32).contiguous()
    return hashlib.blake2b(a.numpy().tobytes(), digest_size=16).hexdigest()


def merge_tagsets(sets: dict[str, TagSet]) -> TagSet:
    """Namespace several tag sets into one (``"set/<Tag>"``) so one bank serves them all in one batch.

    Tags of the same kind with identical values are stored once, under the first name seen, e.g. the
    stage-1 domain tags that every trial of a search inherited: rows of ensemble members that differ
    only in their function tag then hold the same tag rows before it, which is what lets
    :class:`~tagray.core.model.TagLLM` compute their shared prefix once. ``meta["aliases"]`` maps every
    ``"set/<Tag>"`` to the entry that holds its values (itself when it was not merged). Heads are
    namespaced, never merged.
    """
    first = next(iter(sets.values()))
    out = TagSet({}, {}, {}, {}, first.base, meta={"aliases": {}})
    # (kind, shape, digest of the values) -> entry name; the kind is part of the key so that a function
    # tag keeps an entry of its own (serving packs function tags apart, see tagray.serving.predictor)
    seen: dict[tuple, str] = {}
    for ns, ts in sets.items():
        ts.check_base(first.base, where=ns)
        for n, t in ts.tags.items():
            name = f"{ns}/{n}"
            key = (ts.tag_info[n].get("kind", "domain"), tuple(t.shape), _digest(t))
            entry = seen.get(key)
            if entry is None or not torch.equal(out.tags[entry].float(), t.float()):  # a digest collision
                seen[key] = entry = name
                out.tags[name] = t
                out.tag_info[name] = ts.tag_info[n]
            out.meta["aliases"][name] = entry
        for n, t in ts.heads.items():
            out.heads[f"{ns}/{n}"] = t
            out.head_specs[f"{ns}/{n}"] = ts.head_specs[n]
            if n in ts.head_stats:
                out.head_stats[f"{ns}/{n}"] = ts.head_stats[n]
    return out
