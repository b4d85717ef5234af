"""A finished search's outputs: trial rows, ``trials.csv``, ``summary.json``, plots, the Optuna study.

The executor hands over one :class:`TrialRecord` per trial (plain data, no Ray objects); :func:`finish`
ranks them, writes everything into ``<output>/<name>/tune/results/<search>/`` (local or ``s3://``; built in
a local folder, then copied) and publishes the best trials (:mod:`tagray.search.publish`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import warnings
from dataclasses import dataclass, field

import fsspec

from ..config import PipelineConfig
from .plan import Search, tune_dir
from .settings import TuneSettings

log = logging.getLogger("tagray")
DONE = "tagray_done"  # marks a trial's final report (artifact written), as opposed to its evaluations


@dataclass
class TrialRecord:
    """What the report needs of one trial (the executor builds it from a ``ray.tune.Result``)."""

    dirname: str
    """Tune's trial folder name, ``<trainable>_<trial id>_<number>_<params>_<time>``."""
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    """The last report."""
    history: list[dict] = field(default_factory=list)
    """Every report, in order (evaluations, then the final one marked :data:`DONE`)."""
    error: bool = False


def _set(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def trial_rows(records: list[TrialRecord], s: Search, ts: TuneSettings) -> list[dict]:
    """One row per trial, by trial number: params, value, validation curve, status, artifact, test metrics.

    A finished trial's value is its kept (best) state's, as its final report says; a stopped trial's is
    the best of the evaluations it ran.
    """
    best = min if ts.mode == "min" else max
    rows = []
    for r in records:
        m = r.metrics
        evals = [h for h in r.history if not _set(h.get(DONE))]
        hist = [float(h[s.metric]) for h in evals if _set(h.get(s.metric))]
        status = "error" if r.error else "completed" if m.get(DONE) else "stopped"
        value = m.get(s.metric) if status == "completed" else best(hist, default=None)
        tid = m.get("trial_id") or r.dirname
        n = re.search(rf"_{re.escape(str(tid))}_(\d+)_", r.dirname)
        rows.append(
            {
                "number": int(n.group(1)) if n else len(rows) + 1,
                "trial": tid,
                "tag_length": r.config.get("tag_length"),
                "lr": r.config.get("lr"),
                "value": value,
                "evals": len(hist),
                "status": status,
                "artifact": m.get("artifact"),
                "history": hist,
                **{k: v for k, v in m.items() if k.startswith("test/")},
            }
        )
    return sorted(rows, key=lambda r: r["number"])


def history_figure(rows: list[dict], s: Search, ts: TuneSettings):
    """Every trial's value (ASHA-stopped ones too, unlike Optuna's plot) and its validation curve."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    used = sorted({r["tag_length"] for r in rows if r["tag_length"] is not None})
    colors = {p: plt.cm.viridis(i / max(1, len(used) - 1)) for i, p in enumerate(used)}
    best, curve = None, []
    for r in rows:
        color = colors.get(r["tag_length"], "grey")
        if r["value"] is not None and r["status"] == "completed":
            best = r["value"] if best is None else (min if ts.mode == "min" else max)(best, r["value"])
        curve.append(best)
        if r["value"] is not None:
            marker = "o" if r["status"] == "completed" else "x"
            a1.scatter(r["number"], r["value"], marker=marker, color=color)
        style = "-" if r["status"] == "completed" else "--"
        a2.plot(range(1, len(r["history"]) + 1), r["history"], style, marker=".", color=color)
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


def _study(rows: list[dict], s: Search, ts: TuneSettings, d: str):
    """An Optuna study (``d/study.db``) of the trials; ASHA-stopped ones recorded as pruned, with curves."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {"tag_length": CategoricalDistribution(ts.tag_length), "lr": FloatDistribution(*ts.lr, log=True)}
    dirs = ["minimize" if ts.mode == "min" else "maximize"] + (["minimize"] if ts.multi_objective else [])
    study = optuna.create_study(storage=f"sqlite:///{d}/study.db", study_name=s.name, directions=dirs)
    states = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED, "error": TrialState.FAIL}
    for r in rows:
        values = None
        if r["status"] == "completed":
            values = [r["value"], r["tag_length"]] if ts.multi_objective else [r["value"]]
        study.add_trial(
            optuna.trial.create_trial(
                state=states[r["status"]],
                values=values,
                params={"tag_length": r["tag_length"], "lr": r["lr"]},
                distributions=dists,
                user_attrs={"tune_trial": r["trial"]},
                intermediate_values=None if ts.multi_objective else dict(enumerate(r["history"], 1)),
            )
        )
    return study


def export_study(rows: list[dict], s: Search, ts: TuneSettings, d: str) -> dict:
    """``study.db`` and the plots (history, importance, pareto) in the local folder ``d``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    study = _study(rows, s, ts, d)
    target = (lambda t: t.values[0]) if ts.multi_objective else None
    plots = {
        "history": lambda: history_figure(rows, s, ts),
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
            except (RuntimeError, ValueError, ZeroDivisionError) as e:  # importance needs 2+ finished
                log.warning("tune %s: no %s plot: %s", s.task, name, e)
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax
        fig.savefig(f"{d}/{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        made[name] = f"{name}.png"
    pareto = [t.user_attrs["tune_trial"] for t in study.best_trials] if ts.multi_objective else []
    return {"plots": made, "pareto": pareto}


def finish(
    cfg: PipelineConfig, ts: TuneSettings, s: Search, records: list[TrialRecord], summary: dict
) -> dict:
    """Rank the trials, write the results folder, publish the best; returns ``summary`` completed."""
    import pandas as pd

    from .publish import publish_best

    rows = trial_rows(records, s, ts)
    counts = (("completed", "completed"), ("stopped_early", "stopped"), ("errors", "error"))
    summary.update({k: sum(r["status"] == v for r in rows) for k, v in counts})
    done = sorted(
        (r for r in rows if r["status"] == "completed" and r["value"] is not None),
        key=lambda r: r["value"],
        reverse=ts.mode == "max",
    )
    results = summary["results"] = f"{tune_dir(cfg)}/results/{s.name}"
    with tempfile.TemporaryDirectory(prefix="tagray-tune-") as d:
        table = [{k: v for k, v in r.items() if k != "history"} for r in rows]
        pd.DataFrame(table).to_csv(f"{d}/trials.csv", index=False)
        summary.update(export_study(rows, s, ts, d) if rows else {})
        if done:
            summary.update(best=done[0], ranked=[r["trial"] for r in done], **publish_best(cfg, ts, s, done))
        with open(f"{d}/summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=str)
        fs, root = fsspec.core.url_to_fs(results)
        fs.makedirs(root, exist_ok=True)
        fs.put(f"{d}/", root + "/", recursive=True)
    return summary


def format_table(res: dict[str, dict]) -> str:
    """The printed table: one line per searched task (plus its Pareto front when multi-objective)."""
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


def save_table(cfg: PipelineConfig, table: str) -> str:
    """Write the table to ``<output>/<name>/tune/results/summary.txt``; returns that path."""
    path = f"{tune_dir(cfg)}/results/summary.txt"
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(root, "w") as f:
        f.write(table + "\n")
    return path


def interrupted(res: dict[str, dict]) -> bool:
    """Whether a search stopped before all its trials ended (Ctrl-C): re-running resumes it."""
    return any(r.get("interrupted") for r in res.values())
