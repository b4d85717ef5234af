"""Ray Tune + Optuna: search tag length and learning rate per task, stop lagging trials, publish the best.

A tune YAML is a pipeline YAML plus a ``tune:`` section (docs/tune.md). Every task of the searched stage
gets its own Tuner (Optuna rejects grid_search, so no grid over tasks): a seeded Optuna TPE searcher
proposes ``(tag_length, lr)``, ASHA stops trials whose validation metric lags at a rung (FIFO for the
multi-objective search, since ASHA needs a scalar), and each trial is a small Tune function that runs the
one-task stage through Ray Train (:func:`tagray.ray.train.fit_stage`) on the cluster's shared frozen base.
Re-running the same command resumes an interrupted search (``Tuner.restore``): finished trials are kept,
in-flight ones resume from their last Train checkpoint. Layout under ``<output>/<name>/tune/``::

    <exp>/                    Tune experiment state (<exp> = <stage>-<task>-<settings hash>)
    _train/                   the trials' Ray Train runs (checkpoints)
    _artifacts/<exp>/<trial>/ each finished trial's tag set
    _asha/<exp>.json          ASHA's rung records (Tune does not checkpoint schedulers)
    results/<exp>/            trials.csv, summary.json, study.db (Optuna), history.png, importance.png
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, replace

import fsspec
import yaml

from ..config import PipelineConfig, StageConfig, _build, parse_pipeline, stage_from_dict, to_dict
from ..core.artifacts import is_tagset, load_tagset
from ..core.errors import ConfigError
from ..util import set_dotted

log = logging.getLogger("tagray")
TRIAL_CPU = 0.1  # a trial only drives a Train run; a whole CPU would idle ({"cpu": 0} is refused by Tune)
DONE = "tagray_done"  # marks a trial's final report (artifact written), as opposed to its evaluations
ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 2, "max_t": None}


@dataclass(frozen=True)
class TuneSettings:
    """The ``tune:`` section of a tune YAML."""

    stage: str | None = None
    """Stage to search (default: the last); earlier stages run first when their artifacts are missing."""
    tasks: list | None = None
    """Task names of that stage, each searched on its own (default: all of them)."""
    num_samples: int = 8
    tag_length: list = field(default_factory=lambda: [1, 2, 5, 10, 20])
    """Choices for p (vectors per tag)."""
    lr: list = field(default_factory=lambda: [1e-4, 3e-2])
    """``[low, high]``, sampled log-uniformly."""
    metric: str = "val_loss"
    """Validation metric reported by the stage; ``{task}`` is replaced, e.g. ``val/{task}/mse``."""
    mode: str = "min"
    asha: dict | bool | None = None
    """``{grace_period, reduction_factor, max_t}`` (max_t in evaluations), or false for FIFO."""
    seed: int = 0
    max_concurrent: int | None = None
    """Cap on concurrent trials (default: what the cluster's CPUs / GPUs fit)."""
    registry: str | None = None
    """Where the best tag set and the top-k ensemble are published (default ``<output>/<name>/registry``)."""
    top_k: int = 3
    multi_objective: bool = False
    """Optimise (metric, tag_length) jointly and report the Pareto front."""

    def __post_init__(self):
        tl = self.tag_length
        if (
            not isinstance(tl, list)
            or not tl
            or len(set(tl)) != len(tl)
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in tl)
        ):
            raise ConfigError(
                "tag_length", f"expected a list of distinct integers >= 1, e.g. [1, 2, 5, 10, 20]; got {tl!r}"
            )
        try:
            lo, hi = (float(v) for v in self.lr)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError("lr", f"expected [low, high] (log-uniform), got {self.lr!r}") from None
        if not 0 < lo < hi:
            raise ConfigError("lr", f"expected 0 < low < high, got [{lo:g}, {hi:g}]")
        object.__setattr__(self, "lr", [lo, hi])
        for k in ("num_samples", "top_k", "max_concurrent"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ConfigError(k, "must be >= 1")
        if self.mode not in ("min", "max"):
            raise ConfigError("mode", f"use min or max, got {self.mode!r}")
        if not self.metric:
            raise ConfigError("metric", "a metric name is required, e.g. val_loss")
        if self.multi_objective and self.asha not in (None, False):
            raise ConfigError(
                "asha", "ASHA needs a scalar metric: drop it (or set false) with multi_objective"
            )
        asha = None
        if self.asha is True or (self.asha is None and not self.multi_objective):
            asha = dict(ASHA_DEFAULTS)
        elif isinstance(self.asha, dict):
            unknown = set(self.asha) - set(ASHA_DEFAULTS)
            if unknown:
                raise ConfigError(
                    f"asha.{sorted(unknown)[0]}", f"unknown key; allowed: {sorted(ASHA_DEFAULTS)}"
                )
            asha = {**ASHA_DEFAULTS, **self.asha}
            for k, lo_ in (("grace_period", 1), ("reduction_factor", 2), ("max_t", 2)):
                v = asha[k]
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo_):
                    raise ConfigError(f"asha.{k}", f"expected an integer >= {lo_}, got {v!r}")
        elif self.asha not in (None, False):
            raise ConfigError("asha", f"expected a mapping or false, got {self.asha!r}")
        object.__setattr__(self, "asha", asha)


@dataclass
class Search:
    """One Tuner: the stage reduced to one task."""

    task: str
    name: str
    stage: StageConfig
    init_from: str | None
    metric: str
    evals: int  # validations per full trial


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _base(cfg: PipelineConfig) -> str:
    # trials run in their own working directory: a local base folder must be absolute
    return os.path.abspath(cfg.base) if os.path.exists(cfg.base) else cfg.base


def parse_tune(raw: dict) -> tuple[PipelineConfig, TuneSettings]:
    if not isinstance(raw, dict):
        raise ConfigError("config", "expected a YAML mapping at the top level")
    raw = copy.deepcopy(raw)
    section = raw.pop("tune", None) or {}
    cfg = parse_pipeline(raw)
    ts = _build(TuneSettings, section, "tune")
    plan_searches(cfg, ts)  # validates stage, tasks and the ASHA budget now, not after Ray started
    return cfg, ts


def load_tune(path: str, overrides: list[str] | None = None) -> tuple[PipelineConfig, TuneSettings]:
    """Read a tune YAML (local or s3://) and apply ``key=value`` overrides (e.g. ``tune.num_samples=4``)."""
    if "://" not in path and not os.path.exists(path):
        raise ConfigError("config", f"{path} does not exist")
    with fsspec.open(path, "r") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError("config", f"{path} is not valid YAML: {e}") from e
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError("--set", f"expected key=value, got {o!r}")
        k, v = o.split("=", 1)
        set_dotted(raw if isinstance(raw, dict) else {}, k.strip(), yaml.safe_load(v))
    return parse_tune(raw)


def plan_searches(cfg: PipelineConfig, ts: TuneSettings) -> list[Search]:
    from ..core.template import template_tags
    from ..pipeline import plan
    from ..tasks.spec import load_task

    try:
        stage = cfg.stage(ts.stage) if ts.stage else cfg.stages[-1]
    except ConfigError as e:
        raise ConfigError("tune.stage", e.message) from None
    init = next(j.init_from for j, _, _ in plan(cfg) if j.stage.name == stage.name)
    # trials run in their own working directory: local paths must be absolute
    entries = {}
    for e in stage.tasks:
        spec = load_task(e)
        local = isinstance(e, str) and e.endswith((".yaml", ".yml")) and "://" not in e
        entries[spec.name] = (os.path.abspath(e) if local else e, spec)
    names = ts.tasks or list(entries)
    unknown = [t for t in names if t not in entries]
    if unknown:
        raise ConfigError("tune.tasks", f"{unknown} not in stage {stage.name!r}; its tasks: {list(entries)}")
    tr = stage.train
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
            "tune": {
                k: getattr(ts, k)
                for k in (
                    "num_samples",
                    "tag_length",
                    "lr",
                    "metric",
                    "mode",
                    "asha",
                    "seed",
                    "multi_objective",
                )
            },
        }
        h = hashlib.blake2b(json.dumps(doc, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()
        out.append(Search(name, f"{stage.name}-{name}-{h}", st, init, metric, evals))
    return out


def concurrency(stage: StageConfig, ts: TuneSettings) -> int:
    """Trials that fit the cluster at once: each needs its driver plus all its Train workers."""
    import ray

    total, sc = ray.cluster_resources(), stage.scaling
    n = math.floor(total.get("CPU", 0) / (TRIAL_CPU + sc.num_workers * sc.cpus_per_worker) + 1e-9)
    if sc.use_gpu:
        n = min(n, math.floor(total.get("GPU", 0) / (sc.num_workers * sc.gpus_per_worker) + 1e-9))
    if n < 1:
        log.warning(
            "tune: one trial needs more than the cluster has now (%s); waiting for the autoscaler", total
        )
    return max(1, min(n, ts.max_concurrent or n, ts.num_samples))


def _report_callback(extra: dict):
    """Tune's forwarding callback, adding ``extra`` to every report (the searcher checks each result for all
    its metrics, and the multi-objective one includes ``tag_length``)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class Report(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [{**metrics[0], **extra}, *metrics[1:]], checkpoint)

    return Report()


def _asha(path: str, **kw):
    """ASHA whose rung records survive ``Tuner.restore``: Tune checkpoints the searcher but not the scheduler,
    so a resumed search would otherwise judge new trials against no one. The records (trial -> value per
    rung, a few bytes) are saved at ``path`` after every decision and reloaded on the first trial added.
    ``path`` must lie outside the experiment folder, which Tune overwrites from its local copy."""
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        def on_trial_add(self, controller, trial):
            fs, p = fsspec.core.url_to_fs(path)
            if not getattr(self, "_loaded", False) and fs.exists(p):
                saved = json.loads(fs.cat_file(p))
                for milestone, rec in self._brackets[0]._rungs:
                    rec.update(saved.get(str(milestone), {}))
            self._loaded = True
            super().on_trial_add(controller, trial)

        def _save(self):
            fs, p = fsspec.core.url_to_fs(path)
            fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(p, "w") as f:
                json.dump({str(m): rec for m, rec in self._brackets[0]._rungs}, f)

        def on_trial_result(self, controller, trial, result):
            action = super().on_trial_result(controller, trial, result)
            self._save()
            return action

        def on_trial_complete(self, controller, trial, result):
            super().on_trial_complete(controller, trial, result)
            self._save()

    return ResumableASHA(**kw)


def reap_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor died (returns how many).

    ASHA stops a trial by killing its actor, and with it the Train controller that owns the workers'
    placement group. Ray keeps such a group until the job ends, and Train's own cleaner asks the State API,
    which needs the dashboard and fails when a machine runs several Ray instances: the stopped trial's CPUs
    and GPUs would stay reserved and later trials would wait forever. Groups created by a driver (Tune's
    own) or by a detached actor are never touched. Reads GCS records through a private accessor (Ray 2.60).
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job, n = ray.get_runtime_context().get_job_id(), 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        by_actor = bool(pg.creator_actor_id) and not ray.ActorID(pg.creator_actor_id).is_nil()
        live = pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
        if (
            live
            and by_actor
            and pg.creator_actor_dead
            and not pg.is_detached
            and pg.creator_job_id.hex() == job
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            n += 1
    return n


def _reaper():
    """A Tune callback running :func:`reap_orphaned_placement_groups` every few seconds."""
    import time

    from ray.tune import Callback

    class Reaper(Callback):
        last = 0.0

        def on_step_end(self, iteration, trials, **info):
            if time.monotonic() - self.last > 5:
                self.last = time.monotonic()
                if n := reap_orphaned_placement_groups():
                    log.info("tune: released %d placement group(s) of stopped trials", n)

    return Reaper()


def _trial(config: dict, ctx: dict) -> None:
    """One trial: the one-task stage with this ``(tag_length, lr)``, run as a Ray Train job."""
    from ray import tune

    from ..train import StageJob
    from .train import fit_stage

    tid = tune.get_context().get_trial_id()
    st = stage_from_dict(ctx["stage"])
    p, lr = int(config["tag_length"]), float(config["lr"])
    st = replace(st, train=replace(st.train, tag_length=p, lr=lr))
    out, metric = f"{ctx['artifacts']}/{tid}", ctx["metric"]
    h = hashlib.blake2b(
        json.dumps(to_dict(st), sort_keys=True, default=str).encode(), digest_size=4
    ).hexdigest()
    fs, root = fsspec.core.url_to_fs(out)
    if is_tagset(out) and fs.exists(root + "/trial.json") and load_tagset(out).meta.get("config_hash") == h:
        summary = json.loads(fs.cat_file(root + "/trial.json"))  # finished before a driver restart
    else:
        job = StageJob(st, ctx["base"], ctx["dtype"], ctx["init_from"], out, f"{ctx['exp']}-{tid}")
        res = fit_stage(
            job, ctx["train_storage"], config_hash=h, callbacks=[_report_callback({"tag_length": p})]
        )
        m = res.metrics or {}
        test = load_tagset(out).metrics
        summary = {
            metric: m.get("best_val", m.get(metric)) if st.train.select_metric == metric else m.get(metric),
            "tag_length": p,
            "lr": lr,
            "artifact": out,
            DONE: 1,
            **{
                f"test/{t}/{k}": v
                for t, d in test.items()
                for k, v in d.get("test", {}).items()
                if isinstance(v, (int, float))
            },
        }
        with fs.open(root + "/trial.json", "w") as f:
            json.dump(summary, f)
    tune.report(summary)  # the searcher learns the value of the state the artifact holds


def _rows(grid, s: Search, ts: TuneSettings) -> list[dict]:
    import pandas as pd

    rows = []
    for r in grid:
        m, df = r.metrics or {}, r.metrics_dataframe
        hist = []
        if df is not None and s.metric in df:
            evals = df[df[DONE].isna()] if DONE in df else df
            hist = [float(v) for v in evals[s.metric] if not pd.isna(v)]
        status = "error" if r.error else "completed" if m.get(DONE) else "stopped"
        value = (
            m.get(s.metric)
            if status == "completed"
            else (min if ts.mode == "min" else max)(hist, default=None)
        )
        cfg, tid = r.config or {}, m.get("trial_id") or os.path.basename(r.path)
        n = re.search(rf"_{tid}_(\d+)_", os.path.basename(r.path))  # Tune's trial dir: <fn>_<id>_<number>_...
        rows.append(
            {
                "number": int(n.group(1)) if n else len(rows) + 1,
                "trial": tid,
                "tag_length": cfg.get("tag_length"),
                "lr": cfg.get("lr"),
                "value": value,
                "evals": len(hist),
                "status": status,
                "artifact": m.get("artifact"),
                "history": hist,
                **{k: v for k, v in m.items() if k.startswith("test/")},
            }
        )
    return sorted(rows, key=lambda r: r["number"])


def _history(rows: list[dict], s: Search, ts: TuneSettings):
    """Every trial's value (ASHA-stopped ones too, unlike Optuna's plot) and its validation curve."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    used = sorted({r["tag_length"] for r in rows if r["tag_length"] is not None})
    colors = {p: plt.cm.viridis(i / max(1, len(used) - 1)) for i, p in enumerate(used)}
    best, curve = None, []
    for r in rows:
        if r["value"] is not None and r["status"] == "completed":
            best = r["value"] if best is None else (min if ts.mode == "min" else max)(best, r["value"])
        curve.append(best)
        if r["value"] is not None:
            a1.scatter(
                r["number"],
                r["value"],
                marker="o" if r["status"] == "completed" else "x",
                color=colors.get(r["tag_length"], "grey"),
            )
        ev = range(1, len(r["history"]) + 1)
        a2.plot(
            ev,
            r["history"],
            "-" if r["status"] == "completed" else "--",
            marker=".",
            color=colors.get(r["tag_length"], "grey"),
        )
    a1.step([r["number"] for r in rows], curve, where="post", color="red", label="best finished trial")
    for p, c in colors.items():
        a2.plot([], [], color=c, label=f"p={p}")
    # a finished trial's value is its kept (best) state's, which may be the stage's step-0 head probe
    a1.set(
        xlabel="trial (o finished, x stopped by ASHA)",
        ylabel=f"best {s.metric}",
        title=f"{s.task}: search history",
    )
    a2.set(xlabel="evaluation", ylabel=s.metric, title="validation curves (dashed: stopped early)")
    for a in (a1, a2):
        a.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    a1.legend()
    a2.legend(fontsize="small")
    return fig


def _export(rows: list[dict], s: Search, ts: TuneSettings, d: str) -> dict:
    """An Optuna study of the trials (``study.db``) and its plots, written to the local folder ``d``."""
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {"tag_length": CategoricalDistribution(ts.tag_length), "lr": FloatDistribution(*ts.lr, log=True)}
    dirs = ["minimize" if ts.mode == "min" else "maximize"] + (["minimize"] if ts.multi_objective else [])
    study = optuna.create_study(storage=f"sqlite:///{d}/study.db", study_name=s.name, directions=dirs)
    for r in rows:  # ASHA-stopped trials are recorded as pruned, with their validation curve
        state = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED, "error": TrialState.FAIL}[
            r["status"]
        ]
        values = (
            ([r["value"], r["tag_length"]] if ts.multi_objective else [r["value"]])
            if r["status"] == "completed"
            else None
        )
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                values=values,
                params={"tag_length": r["tag_length"], "lr": r["lr"]},
                distributions=dists,
                user_attrs={"tune_trial": r["trial"]},
                intermediate_values=None if ts.multi_objective else dict(enumerate(r["history"], 1)),
            )
        )
    target = (lambda t: t.values[0]) if ts.multi_objective else None
    plots = {
        "history": lambda: _history(rows, s, ts),
        "importance": lambda: ovm.plot_param_importances(study, target=target, target_name=s.metric),
    }
    if ts.multi_objective:
        plots["pareto"] = lambda: ovm.plot_pareto_front(study, target_names=[s.metric, "tag_length"])
    made = {}
    for name, fn in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's matplotlib backend is "experimental"
            try:
                ax = fn()
            except (
                RuntimeError,
                ValueError,
                ZeroDivisionError,
            ) as e:  # e.g. importance needs 2+ completed trials
                log.warning("tune %s: no %s plot: %s", s.task, name, e)
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax
        fig.savefig(f"{d}/{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        made[name] = f"{name}.png"
    pareto = [t.user_attrs["tune_trial"] for t in study.best_trials] if ts.multi_objective else []
    return {"plots": made, "pareto": pareto}


def _run_search(cfg: PipelineConfig, ts: TuneSettings, s: Search, callbacks: list | None) -> dict:
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    tune_dir = _abs(cfg.run_dir()) + "/tune"
    ctx = {
        "stage": to_dict(s.stage),
        "base": _base(cfg),
        "dtype": cfg.dtype,
        "init_from": s.init_from,
        "exp": s.name,
        "metric": s.metric,
        "artifacts": f"{tune_dir}/_artifacts/{s.name}",
        "train_storage": f"{tune_dir}/_train",
    }
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"cpu": TRIAL_CPU})
    path = f"{tune_dir}/{s.name}"
    if tune.Tuner.can_restore(path):
        log.info("tune %s: resuming %s", s.task, path)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        conc = concurrency(s.stage, ts)
        if ts.multi_objective:  # metric/mode live in the searcher; FIFO, as ASHA needs a scalar
            search = OptunaSearch(metric=[s.metric, "tag_length"], mode=[ts.mode, "min"], seed=ts.seed)
            tc = tune.TuneConfig(
                search_alg=search,
                scheduler=FIFOScheduler(),
                num_samples=ts.num_samples,
                max_concurrent_trials=conc,
            )
        else:  # metric/mode given once, here; Tune hands them to the searcher and the scheduler
            sched = FIFOScheduler()
            if ts.asha:  # rungs strictly below the last evaluation, so no finished run is thrown away
                sched = _asha(
                    f"{tune_dir}/_asha/{s.name}.json",
                    max_t=s.evals - 1,
                    grace_period=ts.asha["grace_period"],
                    reduction_factor=ts.asha["reduction_factor"],
                    stop_last_trials=False,
                )
            tc = tune.TuneConfig(
                metric=s.metric,
                mode=ts.mode,
                search_alg=OptunaSearch(seed=ts.seed),
                scheduler=sched,
                num_samples=ts.num_samples,
                max_concurrent_trials=conc,
            )
        log.info("tune %s: %d trials, %d at a time -> %s", s.task, ts.num_samples, conc, path)
        space = {"tag_length": tune.choice(ts.tag_length), "lr": tune.loguniform(*ts.lr)}
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tc,
            run_config=tune.RunConfig(
                name=s.name,
                storage_path=tune_dir,
                callbacks=[_reaper(), *(callbacks or [])],
                verbose=1,
                failure_config=tune.FailureConfig(max_failures=1),
            ),
        )
    grid = tuner.fit()
    reap_orphaned_placement_groups()  # trials stopped at the very end (the Reaper catches later deaths)
    summary = {"task": s.task, "experiment": path, "metric": s.metric, "mode": ts.mode, "trials": len(grid)}
    if grid.num_terminated + grid.num_errors < len(grid) or len(grid) < ts.num_samples:  # Ctrl-C / SIGUSR1
        return {**summary, "interrupted": True}
    rows = _rows(grid, s, ts)
    summary.update(
        {
            k: sum(r["status"] == v for r in rows)
            for k, v in (("completed", "completed"), ("stopped_early", "stopped"), ("errors", "error"))
        }
    )
    done = sorted(
        (r for r in rows if r["status"] == "completed" and r["value"] is not None),
        key=lambda r: r["value"],
        reverse=ts.mode == "max",
    )
    results = summary["results"] = f"{tune_dir}/results/{s.name}"
    with tempfile.TemporaryDirectory(prefix="tagray-tune-") as d:  # built locally, then copied (local or s3)
        import pandas as pd

        pd.DataFrame([{k: v for k, v in r.items() if k != "history"} for r in rows]).to_csv(
            f"{d}/trials.csv", index=False
        )
        summary.update(_export(rows, s, ts, d) if rows else {})
        if done:
            summary.update(best=done[0], ranked=[r["trial"] for r in done], **_publish(cfg, ts, s, done))
        with open(f"{d}/summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=str)
        fs, root = fsspec.core.url_to_fs(results)
        fs.makedirs(root, exist_ok=True)
        fs.put(f"{d}/", root + "/", recursive=True)
    return summary


def _publish(cfg: PipelineConfig, ts: TuneSettings, s: Search, done: list[dict]) -> dict:
    from ..registry import publish_ensemble, publish_tagset

    reg = ts.registry or _abs(cfg.run_dir()) + "/registry"
    best = f"{cfg.name}-{s.task}"
    publish_tagset(reg, best, done[0]["artifact"])
    members = []
    for r in done[: ts.top_k]:
        members.append(f"{cfg.name}-{s.task}-{r['trial']}")
        publish_tagset(reg, members[-1], r["artifact"])
    ens = f"{cfg.name}-{s.task}-top{len(members)}"
    publish_ensemble(
        reg,
        ens,
        members,
        {
            "task": s.task,
            "metric": s.metric,
            "mode": ts.mode,
            "search": s.name,
            "values": [r["value"] for r in done[: ts.top_k]],
        },
    )
    return {"registry": reg, "tagset": best, "ensemble": ens}


def run_tune(
    cfg: PipelineConfig, ts: TuneSettings, address: str | None = None, callbacks: list | None = None
) -> dict[str, dict]:
    """Search every selected task of the stage (resuming earlier searches); returns ``{task: summary}``."""
    from ..pipeline import run_pipeline
    from .session import ensure_ray
    from .shared import get_base_owner

    ensure_ray(address)
    searches = plan_searches(cfg, ts)
    idx = [st.name for st in cfg.stages].index(searches[0].stage.name)
    if searches[0].init_from and not is_tagset(searches[0].init_from) and idx > 0:
        log.info("tune: running the earlier stages first")
        run_pipeline(replace(cfg, stages=cfg.stages[:idx]))
    get_base_owner(_base(cfg), cfg.dtype)  # load the frozen base once, before concurrent trials race for it
    out = {}
    for s in searches:
        out[s.task] = _run_search(cfg, ts, s, callbacks)
        if out[s.task].get("interrupted"):
            break  # Ctrl-C: leave the other tasks for the resumed run
    return out


def format_table(res: dict[str, dict]) -> str:
    lines = [
        f"{'task':<12} {'trials':>6} {'done':>5} {'ASHA-stopped':>12} {'errors':>6} {'best p':>6} "
        f"{'best lr':>9} {'best metric':>22}  published as"
    ]
    for task, r in res.items():
        if r.get("interrupted"):
            lines.append(f"{task:<12} {r['trials']:>6} interrupted: re-run the same command to resume")
            continue
        b = r.get("best") or {}
        val = f"{r['metric']} {b['value']:.4f}" if b else "-"
        lines.append(
            f"{task:<12} {r['trials']:>6} {r['completed']:>5} {r['stopped_early']:>12} {r['errors']:>6} "
            f"{b.get('tag_length', '-'):>6} {b['lr'] if b else float('nan'):>9.2e} {val:>22}  "
            f"{r.get('tagset', '-')} / {r.get('ensemble', '-')}"
        )
        if r.get("pareto"):
            lines.append(f"{'':<12} Pareto front ({r['metric']} vs tag_length): {', '.join(r['pareto'])}")
    return "\n".join(lines)


def cmd_tune(args) -> int:
    cfg, ts = load_tune(args.config, args.set)
    res = run_tune(cfg, ts, address=args.address)
    table = format_table(res)
    print(table)
    if any(r.get("interrupted") for r in res.values()):
        print("search interrupted; re-run the same command to resume it")
        return 130
    fs, root = fsspec.core.url_to_fs(_abs(cfg.run_dir()) + "/tune/results")
    fs.makedirs(root, exist_ok=True)
    with fs.open(root + "/summary.txt", "w") as f:
        f.write(table + "\n")
    return 0


def add_cli(sub) -> None:
    sp = sub.add_parser(
        "tune", help="search tag length and learning rate per task (Ray Tune + Optuna + ASHA)"
    )
    sp.add_argument("config", help="tune YAML: a pipeline YAML plus a tune: section, e.g. jobs/tune.yaml")
    sp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. tune.num_samples=4 or train.max_steps=20",
    )
    sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    sp.set_defaults(fn=cmd_tune)
