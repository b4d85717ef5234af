"""Named training state: the loop's counters (:class:`LoopState`), the best validation state per task
group (:class:`BestSnapshot`), and checkpoints (tag set + optimizer moments + trainer state, kilobytes).

A checkpoint folder::

    tagset.json, tags.safetensors, heads.safetensors   the current tags and heads (a loadable tag set)
    optimizer.safetensors                               AdamW moments of the trainable tables
    trainer_state.json                                  LoopState and the snapshot's steps and scores
    best/                                               the best state as a tag set
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

from ..core.artifacts import TagSet, load_tagset, save_tagset
from .setup import Group, Setup


@dataclass
class LoopState:
    """Counters of the training loop; everything needed to resume it exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from_step: int | None = None
    opt_step: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> LoopState:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class GroupBest:
    step: int
    score: float
    tags: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]


class BestSnapshot:
    """The best validation state of each task group (lower score is better).

    Groups train disjoint parameters and their losses do not depend on each other's, so each keeps the
    step where its own score was lowest; step 0 (the initial state) competes too.
    """

    def __init__(self, groups: list[Group]):
        self.groups = {g.name: g for g in groups}
        self.best: dict[str, GroupBest] = {}

    def offer(self, setup: Setup, step: int, scores: dict[str, float]) -> list[str]:
        """Record groups whose ``scores[group]`` improved at ``step``; returns their names."""
        improved = []
        m = setup.model
        for name, g in self.groups.items():
            s = scores.get(name)
            if s is None or (name in self.best and not s < self.best[name].score):
                continue
            self.best[name] = GroupBest(
                step,
                float(s),
                {n: m.tags.get(n).detach().cpu().clone() for n in g.tags},
                {n: m.heads.get(n).detach().cpu().clone() for n in g.heads},
                {n: m.heads.stats()[n] for n in g.heads},
            )
            improved.append(name)
        return improved

    def restore(self, setup: Setup) -> None:
        m = setup.model
        with torch.no_grad():
            for b in self.best.values():
                for n, t in b.tags.items():
                    m.tags.get(n).copy_(t)
                for n, t in b.heads.items():
                    m.heads.get(n).copy_(t)
                for n, st in b.stats.items():
                    m.heads.set_stats(n, st[0], st[1])

    def steps(self) -> dict[str, int]:
        return {n: b.step for n, b in self.best.items()}

    def to_json(self) -> dict:
        return {n: {"step": b.step, "score": b.score} for n, b in self.best.items()}

    def save(self, setup: Setup, path: str, stage: str) -> None:
        ts = current_tagset(setup, stage=stage)
        for b in self.best.values():
            ts.tags.update(b.tags)
            ts.heads.update(b.heads)
            ts.head_stats.update(b.stats)
        save_tagset(ts, path)

    def load(self, setup: Setup, path: str, doc: dict) -> None:
        """Reload from :meth:`save`'s folder and :meth:`to_json`'s record."""
        ts = load_tagset(path)
        for name, rec in doc.items():
            g = self.groups.get(name)
            if g is None:
                continue
            self.best[name] = GroupBest(
                rec["step"],
                rec["score"],
                {n: ts.tags[n] for n in g.tags},
                {n: ts.heads[n] for n in g.heads},
                {n: ts.head_stats[n] for n in g.heads if n in ts.head_stats},
            )


def current_tagset(setup: Setup, metrics: dict | None = None, stage: str | None = None) -> TagSet:
    """The model's tags and heads now, with what serving needs to use them."""
    m = setup.model
    prev_metrics = dict(setup.prev.metrics) if setup.prev else {}
    prev_metrics.update(metrics or {})
    return TagSet(
        tags=m.tags.state(),
        heads=m.heads.state() if m.heads is not None else {},
        tag_info=setup.tag_info,
        head_specs=dict(m.heads.specs) if m.heads is not None else {},
        base=setup.base.fingerprint,
        tasks=setup.task_specs,
        metrics=prev_metrics,
        stage=stage,
        head_stats=m.heads.stats() if m.heads is not None else {},
    )


def save_checkpoint(path: str, setup: Setup, opt, state: LoopState, best: BestSnapshot, stage: str) -> None:
    save_tagset(current_tagset(setup, stage=stage), path)
    flat = {}
    for i, p in enumerate(setup.model.trainable_parameters()):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                flat[f"{i}.{k}"] = st[k].detach().cpu().contiguous()
        if "step" in st:
            state.opt_step[str(i)] = float(st["step"])
    save_file(flat, os.path.join(path, "optimizer.safetensors"))
    best.save(setup, os.path.join(path, "best"), stage)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({**state.to_json(), "best": best.to_json()}, f)


def load_checkpoint(path: str, setup: Setup, opt, best: BestSnapshot) -> LoopState:
    ts = load_tagset(path, expect_base=setup.base.fingerprint)
    m = setup.model
    with torch.no_grad():
        for name in setup.train_tags:
            m.tags.get(name).copy_(ts.tags[name])
        for name in setup.train_heads:
            m.heads.get(name).copy_(ts.heads[name])
            if name in ts.head_stats:  # the running feature mean moves during training
                m.heads.set_stats(name, ts.head_stats[name][0], ts.head_stats[name][1])
    with open(os.path.join(path, "trainer_state.json")) as f:
        doc = json.load(f)
    state = LoopState.from_json(doc)
    flat = load_file(os.path.join(path, "optimizer.safetensors"))
    for i, p in enumerate(m.trainable_parameters()):
        if f"{i}.exp_avg" in flat:
            opt.state[p] = {
                "exp_avg": flat[f"{i}.exp_avg"].to(p.device),
                "exp_avg_sq": flat[f"{i}.exp_avg_sq"].to(p.device),
                "step": torch.tensor(state.opt_step.get(str(i), 0.0)),
            }
    if os.path.exists(os.path.join(path, "best", "tagset.json")):
        best.load(setup, os.path.join(path, "best"), doc.get("best", {}))
    return state
