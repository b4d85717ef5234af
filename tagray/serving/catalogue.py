"""What a registry serves (``GET /v1/tags``): every tag of every tag set, ensembles, rejected sets."""

from __future__ import annotations

from collections.abc import Mapping

from ..core.artifacts import TagSet
from ..core.base import fingerprint_id
from ..core.errors import TagrayError
from ..core.template import parse_template, template_tags
from ..tasks.spec import TaskSpec


def _task_uses(spec: TaskSpec, tag: str, info: Mapping, static: set[str]) -> bool:
    if info.get("kind") == "function":
        return spec.function_tag == tag
    if tag in template_tags(spec.template):
        return True
    # a tag that only ever fills dynamic slots (<FR> in "<{lang}> {text}") belongs to those tasks
    return tag not in static and any(p.kind == "tag" and p.dynamic for p in parse_template(spec.template))


def catalogue(sets: Mapping[str, TagSet], tasks: Mapping[str, Mapping[str, TaskSpec]]) -> list[dict]:
    """One record per tag of every tag set: name, kind, length, stage, tasks, metrics, base, head."""
    out = []
    for sname, ts in sets.items():
        specs = tasks[sname]
        static = {t for s in specs.values() for t in template_tags(s.template)}
        for tag, info in ts.tag_info.items():
            used = [t for t, s in specs.items() if _task_uses(s, tag, info, static)]
            rec = {
                "tagset": sname,
                "name": tag,
                "id": f"{sname}/{tag}",
                "kind": info.get("kind"),
                "length": info.get("length"),
                "stage": info.get("stage"),
                "tasks": used,
                "metrics": {t: ts.metrics[t] for t in used if t in ts.metrics},
                "base": fingerprint_id(ts.base),
            }
            if tag in ts.head_specs:
                rec["head"] = ts.head_specs[tag].to_json()
            out.append(rec)
    return out


def describe(
    base_fp: dict,
    sets: Mapping[str, TagSet],
    tasks: Mapping[str, Mapping[str, TaskSpec]],
    ensembles: Mapping[str, list[str]],
    rejected: Mapping[str, TagrayError],
) -> dict:
    """Catalogue plus ensembles and rejected tag sets / ensembles (with the error a request gets)."""
    return {
        "base": fingerprint_id(base_fp),
        "tags": catalogue(sets, tasks),
        "tagsets": sorted(sets),
        "ensembles": {n: {"members": list(m)} for n, m in ensembles.items()},
        "rejected": {n: e.to_dict() for n, e in rejected.items()},
    }
