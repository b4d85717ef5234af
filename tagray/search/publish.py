"""Publish a search's best trial and its top-k ensemble to the tag registry (:mod:`tagray.registry`).

Names: ``<name>-<task>`` (the best trial), ``<name>-<task>-<trial>`` (each top-k member) and the ensemble
``<name>-<task>-top<k>``, which ``tagray serve`` answers with the members' mean and spread.
"""

from __future__ import annotations

from ..config import PipelineConfig
from ..registry import publish_ensemble, publish_tagset
from ..util import abs_uri
from .plan import Search
from .settings import TuneSettings


def registry_of(cfg: PipelineConfig, ts: TuneSettings) -> str:
    """``tune.registry``, else ``<output>/<name>/registry``."""
    return ts.registry or abs_uri(cfg.run_dir()) + "/registry"


def publish_best(cfg: PipelineConfig, ts: TuneSettings, s: Search, done: list[dict]) -> dict:
    """``done``: the finished trials' rows, best first. Returns where they went (for ``summary.json``)."""
    reg = registry_of(cfg, ts)
    best = f"{cfg.name}-{s.task}"
    publish_tagset(reg, best, done[0]["artifact"])
    top = done[: ts.top_k]
    members = [f"{cfg.name}-{s.task}-{r['trial']}" for r in top]
    for name, r in zip(members, top, strict=True):
        publish_tagset(reg, name, r["artifact"])
    ens = f"{cfg.name}-{s.task}-top{len(members)}"
    meta = {
        "task": s.task,
        "metric": s.metric,
        "mode": ts.mode,
        "search": s.name,
        "values": [r["value"] for r in top],
    }
    publish_ensemble(reg, ens, members, meta)
    return {"registry": reg, "tagset": best, "ensemble": ens}
