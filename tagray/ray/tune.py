"""Ray Tune executor of a tag-length x learning-rate search (the plans, results and publishing: tagray.search).

Per :class:`tagray.search.Search` one Tuner: a seeded Optuna TPE searcher proposes ``(tag_length, lr)``,
ASHA stops trials whose validation metric lags at a rung (FIFO when multi-objective), and each trial is a
small Tune function that runs the one-task stage through Ray Train (:func:`tagray.ray.train.fit_stage`).
Trials beyond what the cluster holds now wait for it to grow (``max_concurrent_trials`` comes from the
settings, never from the cluster's size at start-up). Re-running resumes (``Tuner.restore``). Layout under
``<output>/<name>/tune/``::

    <exp>/                    Tune experiment state (<exp> = <stage>-<task>-<settings hash>)
    _train/                   the trials' Ray Train runs (checkpoints)
    _artifacts/<exp>/<trial>/ each finished trial's tag set
    _asha/<exp>.json          ASHA's rung records (Tune does not checkpoint schedulers)
    results/<exp>/            trials.csv, summary.json, study.db (Optuna), history.png, importance.png
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace

import fsspec
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from ..config import PipelineConfig, stage_from_dict, to_dict
from ..core.artifacts import is_tagset, load_tagset
from ..core.errors import ConfigError
from ..core.prefix import remove_shared
from ..search.plan import (
    Search,
    base_ref,
    plan_searches,
    prerequisites,
    trial_demand,
    trials_that_fit,
    tune_dir,
)
from ..search.report import DONE, TrialRecord, finish
from ..search.settings import TuneSettings
from ..train import StageJob, resolve_dtype
from ..util import stable_hash
from .internals import reap_orphaned_placement_groups, reaper, resumable_asha
from .session import ensure_ray, on_every_node
from .shared import get_base_owner
from .train import fit_stage

log = logging.getLogger("tagray")


class _Report(TuneReportCallback):
    """Tune's forwarding callback, adding ``extra`` to every report (the searcher checks each result for all
    its metrics, and the multi-objective one includes ``tag_length``)."""

    def __init__(self, extra: dict):
        super().__init__()
        self.extra = extra

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, [{**metrics[0], **self.extra}, *metrics[1:]], checkpoint)


def _trial(config: dict, ctx: dict) -> None:
    """One trial: the one-task stage with this ``(tag_length, lr)``, run as a Ray Train job."""
    tid = tune.get_context().get_trial_id()
    st = stage_from_dict(ctx["stage"])
    p, lr = int(config["tag_length"]), float(config["lr"])
    st = replace(st, train=replace(st.train, tag_length=p, lr=lr))
    out, metric, h = f"{ctx['artifacts']}/{tid}", ctx["metric"], stable_hash(to_dict(st))
    fs, root = fsspec.core.url_to_fs(out)
    if is_tagset(out) and fs.exists(root + "/trial.json") and load_tagset(out).meta.get("config_hash") == h:
        summary = json.loads(fs.cat_file(root + "/trial.json"))  # finished before a driver restart
    else:
        # the Train run is named after the trial: a restarted trial resumes it from its last checkpoint
        job = StageJob(st, ctx["base"], ctx["dtype"], ctx["init_from"], out, f"{ctx['exp']}-{tid}")
        res = fit_stage(job, ctx["train_storage"], config_hash=h, callbacks=[_Report({"tag_length": p})])
        m = res.metrics or {}
        kept = m.get("best_val", m.get(metric)) if st.train.select_metric == metric else m.get(metric)
        summary = {metric: kept, "tag_length": p, "lr": lr, "artifact": out, DONE: 1}
        for t, d in load_tagset(out).metrics.items():
            summary.update(
                {f"test/{t}/{k}": v for k, v in d.get("test", {}).items() if isinstance(v, (int, float))}
            )
        with fs.open(root + "/trial.json", "w") as f:
            json.dump(summary, f)
    tune.report(summary)  # the searcher learns the value of the state the artifact holds


def trainable(cfg: PipelineConfig, ts: TuneSettings, s: Search):
    """The trial function with its context and the driver's resources (``tune.trial_resources``)."""
    tdir = tune_dir(cfg)
    ctx = {
        "stage": to_dict(s.stage),
        "base": base_ref(cfg),
        "dtype": cfg.dtype,
        "init_from": s.init_from,
        "exp": s.name,
        "metric": s.metric,
        "artifacts": f"{tdir}/_artifacts/{s.name}",
        "train_storage": f"{tdir}/_train",
    }
    return tune.with_resources(tune.with_parameters(_trial, ctx=ctx), dict(ts.trial_resources))


def tune_config(cfg: PipelineConfig, ts: TuneSettings, s: Search) -> tune.TuneConfig:
    """Optuna TPE (seeded) + ASHA, or FIFO when multi-objective (ASHA needs a scalar)."""
    common = {"num_samples": ts.num_samples, "max_concurrent_trials": ts.concurrent_trials}
    if ts.multi_objective:  # metric/mode live in the searcher
        search = OptunaSearch(metric=[s.metric, "tag_length"], mode=[ts.mode, "min"], seed=ts.seed)
        return tune.TuneConfig(search_alg=search, scheduler=FIFOScheduler(), **common)
    sched = FIFOScheduler()
    if ts.asha:  # rungs strictly below the last evaluation, so no finished run is thrown away
        sched = resumable_asha(
            f"{tune_dir(cfg)}/_asha/{s.name}.json",
            max_t=s.evals - 1,
            grace_period=ts.asha["grace_period"],
            reduction_factor=ts.asha["reduction_factor"],
            stop_last_trials=False,
        )
    # metric/mode given once, here: Tune hands them to the searcher and the scheduler
    return tune.TuneConfig(
        metric=s.metric, mode=ts.mode, search_alg=OptunaSearch(seed=ts.seed), scheduler=sched, **common
    )


def new_tuner(cfg: PipelineConfig, ts: TuneSettings, s: Search, callbacks: list | None = None) -> tune.Tuner:
    """A fresh Tuner for ``s`` (nothing runs until ``fit``)."""
    return tune.Tuner(
        trainable(cfg, ts, s),
        param_space={"tag_length": tune.choice(ts.tag_length), "lr": tune.loguniform(*ts.lr)},
        tune_config=tune_config(cfg, ts, s),
        run_config=tune.RunConfig(
            name=s.name,
            storage_path=tune_dir(cfg),
            callbacks=[reaper(), *(callbacks or [])],
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )


def _log_capacity(ts: TuneSettings, s: Search) -> None:
    """Say how many trials the cluster holds now; the rest wait (their requests drive the autoscaler)."""
    total, need = ray.cluster_resources(), trial_demand(s.stage, ts)
    now, want = trials_that_fit(total, need), ts.concurrent_trials
    log.info("tune %s: %d trials, up to %d at a time; one trial needs %s", s.task, ts.num_samples, want, need)
    if now < want:
        log.info(
            "tune %s: the cluster holds %d of them now (%s); the others wait for the autoscaler or for "
            "running trials to end",
            s.task,
            now,
            {k: total.get(k, 0) for k in need},
        )


def _record(r) -> TrialRecord:
    df = r.metrics_dataframe
    return TrialRecord(
        dirname=os.path.basename(r.path),
        config=dict(r.config or {}),
        metrics=dict(r.metrics or {}),
        history=[] if df is None else df.to_dict("records"),
        error=r.error is not None,
    )


def _run_one(cfg: PipelineConfig, ts: TuneSettings, s: Search, callbacks: list | None) -> dict:
    path = f"{tune_dir(cfg)}/{s.name}"
    if tune.Tuner.can_restore(path):
        # a restored search keeps its saved TuneConfig (concurrency included); the searcher resumes
        log.info("tune %s: resuming %s", s.task, path)
        tuner = tune.Tuner.restore(path, trainable(cfg, ts, s), resume_errored=True)
    else:
        _log_capacity(ts, s)
        tuner = new_tuner(cfg, ts, s, callbacks)
    grid = tuner.fit()
    reap_orphaned_placement_groups()  # trials stopped at the very end (the reaper catches later deaths)
    summary = {"task": s.task, "experiment": path, "metric": s.metric, "mode": ts.mode, "trials": len(grid)}
    if grid.num_terminated + grid.num_errors < len(grid) or len(grid) < ts.num_samples:  # Ctrl-C / SIGUSR1
        return {**summary, "interrupted": True}
    return finish(cfg, ts, s, [_record(r) for r in grid], summary)


def run_search(
    cfg: PipelineConfig, ts: TuneSettings, address: str | None = None, callbacks: list | None = None
) -> dict[str, dict]:
    """Search every selected task of the stage (resuming earlier searches); returns ``{task: summary}``.

    The searched stage's initial tags must exist: run :func:`tagray.search.prerequisites` through
    ``tagray.pipeline.run_pipeline`` first (``tagray tune`` does). ``callbacks``: extra Tune callbacks.
    A summary with ``interrupted: True`` means Ctrl-C stopped it; calling again resumes.
    """
    searches = plan_searches(cfg, ts)
    missing = prerequisites(cfg, ts)
    if missing is not None and not is_tagset(searches[0].init_from):
        raise ConfigError(
            "tune.stage",
            f"stage {searches[0].stage.name} starts from {searches[0].init_from}, which does not exist: "
            f"run stage(s) {[st.name for st in missing.stages]} first (tagray tune does)",
        )
    ensure_ray(address)
    # the frozen base is loaded once, before concurrent trials race for it; its dtype is the workers'
    get_base_owner(base_ref(cfg), resolve_dtype(cfg.dtype, searches[0].stage.scaling.use_gpu))
    out = {}
    for s in searches:
        out[s.task] = _run_one(cfg, ts, s, callbacks)
        if out[s.task].get("interrupted"):
            break  # Ctrl-C: leave the other tasks (and the prefix rows) for the resumed run
        shared = s.stage.train.prefix_cache_shared
        if shared.startswith("auto:"):  # the search's own rows: RAM-backed (/dev/shm), freed when it ends
            freed = on_every_node(remove_shared, shared)
            log.info(
                "tune %s: shared prefix rows deleted on %d of %d node(s)", s.task, sum(freed), len(freed)
            )
    return out
