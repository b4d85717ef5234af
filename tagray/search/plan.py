"""Search plans: one :class:`Search` per task of the searched stage, named by a hash of what its trials compute.

Optuna rejects ``grid_search``, so tasks are not one more grid axis: every task gets its own search (its
own Tuner), the stage reduced to that one task. The name ``<stage>-<task>-<hash>`` is the search's folder;
the hash covers the one-task stage, base, dtype, initial tags and the settings that change a trial (not
``top_k``, ``registry``, ``max_concurrent`` or ``trial_resources``), so re-running the same search resumes
it and changing one of those starts a new one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..config import PipelineConfig, StageConfig, init_ref, initial_tags, to_dict
from ..core.errors import ConfigError
from ..util import abs_uri, stable_hash

if TYPE_CHECKING:
    from .settings import TuneSettings

# The settings in the search hash: everything that changes what the trials compute or propose.
HASHED = ("num_samples", "tag_length", "lr", "metric", "mode", "asha", "seed", "multi_objective")


@dataclass
class Search:
    """One Tuner: the stage reduced to one task."""

    task: str
    name: str
    """``<stage>-<task>-<hash>``: the experiment folder under ``<output>/<name>/tune/``."""
    stage: StageConfig
    init_from: str | None
    """The tag set the trials start from (an earlier stage's artifact), or None."""
    metric: str
    evals: int
    """Validations per full trial (ASHA's time unit)."""


def tune_dir(cfg: PipelineConfig) -> str:
    """``<output>/<name>/tune``, absolute (trials run in their own working directories)."""
    return abs_uri(cfg.run_dir()) + "/tune"


def base_ref(cfg: PipelineConfig) -> str:
    """The base as trials must name it: a local folder made absolute, an alias / hub id / URI unchanged."""
    return os.path.abspath(cfg.base) if os.path.exists(cfg.base) else cfg.base


def searched_stage(cfg: PipelineConfig, ts: TuneSettings) -> StageConfig:
    try:
        return cfg.stage(ts.stage) if ts.stage else cfg.stages[-1]
    except ConfigError as e:
        raise ConfigError("tune.stage", e.message) from None


def prerequisites(cfg: PipelineConfig, ts: TuneSettings) -> PipelineConfig | None:
    """The pipeline of earlier stages that must run before the search, or None when the searched stage's
    starts from no earlier stage. Run it with ``tagray.pipeline.run_pipeline`` first: it trains (or
    resumes) the stages up to the one the search starts from, skipping finished ones."""
    stage = searched_stage(cfg, ts)
    ref, names = init_ref(cfg, stage), [s.name for s in cfg.stages]
    if ref not in names:
        return None
    # always the earlier stages: run_pipeline skips those whose artifact matches their config hash and
    # retrains stale ones, so a search never starts from tags of an older configuration
    # registry=None: a partial pipeline's last artifact is not the pipeline's product (it would replace
    # the tag set `tagray pipeline` published under the same name); the search publishes its own results
    return replace(cfg, stages=cfg.stages[: names.index(ref) + 1], registry=None)


def _task_entries(stage: StageConfig) -> dict:
    """``{task name: (entry as trials must load it, spec)}``; local task YAMLs made absolute."""
    from ..tasks.spec import load_task

    entries = {}
    for e in stage.tasks:
        spec = load_task(e)
        local = isinstance(e, str) and e.endswith((".yaml", ".yml")) and "://" not in e
        entries[spec.name] = (os.path.abspath(e) if local else e, spec)
    return entries


def plan_searches(cfg: PipelineConfig, ts: TuneSettings) -> list[Search]:
    """One :class:`Search` per selected task; validates the stage, the tasks and ASHA's budget."""
    from ..core.template import template_tags

    stage = searched_stage(cfg, ts)
    init = initial_tags(cfg, stage)
    entries = _task_entries(stage)
    names = ts.tasks or list(entries)
    unknown = [t for t in names if t not in entries]
    if unknown:
        raise ConfigError("tune.tasks", f"{unknown} not in stage {stage.name!r}; its tasks: {list(entries)}")
    tr = stage.train
    from_search = tr.prefix_cache_shared == "search"
    if from_search:  # trials differ only in the function tag: one prefix set per node
        tr = replace(tr, prefix_cache_shared="auto")
    if ts.asha and ts.asha["max_t"]:
        tr = replace(tr, max_steps=ts.asha["max_t"] * tr.eval_every)  # ASHA's budget = the trial's length
    evals = math.ceil(tr.max_steps / tr.eval_every)
    if ts.asha and evals <= ts.asha["grace_period"]:
        raise ConfigError(
            "tune.asha.grace_period",
            f"must be below the {evals} evaluation(s) of a trial "
            "(train.max_steps / train.eval_every), or ASHA can never stop one",
        )
    out = []
    for name in names:
        entry, spec = entries[name]
        metric = ts.metric.replace("{task}", name)
        own = set(template_tags(spec.template)) | {spec.function_tag}
        st = replace(
            stage,
            tasks=[entry],
            eval_tasks=[],
            train_tags=None if stage.train_tags is None else [t for t in stage.train_tags if t in own],
            # the artifact keeps the best state by this metric (select_metric is lower-is-better)
            train=replace(tr, select_metric=metric) if ts.mode == "min" else tr,
        )
        doc = {
            "stage": to_dict(st),
            "base": cfg.base,
            "dtype": cfg.dtype,
            "init": init,
            "tune": {k: getattr(ts, k) for k in HASHED},
        }
        sname = f"{stage.name}-{name}-{stable_hash(doc)}"
        if from_search:  # its own folder of the node's shared root, deleted when the search ends (the
            # hash above keeps "auto": an existing search resumes under the same name)
            st = replace(st, train=replace(st.train, prefix_cache_shared=f"auto:{sname}"))
        out.append(Search(name, sname, st, init, metric, evals))
    return out


def trial_demand(stage: StageConfig, ts: TuneSettings) -> dict[str, float]:
    """Resources one running trial holds: its driver plus all its Train workers."""
    sc = stage.scaling
    need = dict(ts.trial_resources)
    need["CPU"] = need.get("CPU", 0.0) + sc.num_workers * sc.cpus_per_worker
    if sc.use_gpu:
        need["GPU"] = need.get("GPU", 0.0) + sc.num_workers * sc.gpus_per_worker
    return need


def trials_that_fit(total: dict[str, float], need: dict[str, float]) -> int:
    """How many trials of ``need`` fit in ``total`` (only a hint for a log line: the cluster may grow)."""
    fits = [math.floor(total.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return min(fits) if fits else 0
