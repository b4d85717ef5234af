"""Run a pipeline: its stages in order, each starting from the previous stage's artifact.

Each stage runs through an :class:`Executor`: :class:`LocalExecutor` runs the stage recipe in this
process; :class:`tagray.ray.train.RayExecutor` runs it as a Ray Train job (the CLI picks one, so this
module never imports Ray). A stage whose artifact already exists for the same configuration is skipped,
and a stage interrupted mid-way resumes from its last checkpoint, so re-running a pipeline continues it.
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

import fsspec

from .config import PipelineConfig, initial_tags, stage_hash
from .core.artifacts import is_tagset, load_tagset
from .core.errors import ConfigError
from .train import Runtime, StageJob, run_stage
from .util import abs_uri, is_remote

log = logging.getLogger("tagray")


class Executor(Protocol):
    """Runs one stage job; the artifact lands at ``job.output``."""

    def run(self, job: StageJob, run_dir: str, config_hash: str) -> None: ...


class LocalExecutor:
    """The stage recipe in this process (``tagray pipeline --local``); checkpoints under ``_local/``."""

    def run(self, job: StageJob, run_dir: str, config_hash: str) -> None:
        ckpt = None if is_remote(run_dir) else f"{run_dir}/_local/{job.stage.name}-{config_hash}"
        run_stage(job, Runtime(checkpoint_dir=ckpt), config_hash=config_hash)


def check_tasks(cfg: PipelineConfig) -> None:
    """Parse every stage's task definitions now, so a bad task fails before any model or Ray starts."""
    from .tasks.spec import load_task

    for st in cfg.stages:
        for i, t in enumerate(list(st.tasks) + list(st.eval_tasks)):
            try:
                load_task(t)
            except ConfigError as e:
                raise ConfigError(e.field, e.message + f" (stage {st.name!r}, task {i})") from None


def plan(cfg: PipelineConfig, only: list[str] | None = None) -> list[tuple[StageJob, str, bool]]:
    """``[(job, config hash, already done)]`` for every stage to run, in order."""
    check_tasks(cfg)
    run_dir = abs_uri(cfg.run_dir())
    out = []
    for st in cfg.stages:
        init = initial_tags(cfg, st)
        h = stage_hash(cfg, st)
        dest = f"{run_dir}/{st.name}"
        done = _current(dest, h)
        job = StageJob(
            stage=st, base=cfg.base, dtype=cfg.dtype, init_from=init, output=dest, run_name=f"{cfg.name}-{h}"
        )
        if only is None or st.name in only:
            out.append((job, h, done))
    if only:
        unknown = set(only) - {s.name for s in cfg.stages}
        if unknown:
            raise ConfigError(
                "stage", f"unknown stage(s) {sorted(unknown)}; stages: {[s.name for s in cfg.stages]}"
            )
        for job, _, _ in out:
            if job.init_from and not is_tagset(job.init_from):
                raise ConfigError(
                    "stage", f"stage {job.stage.name} needs {job.init_from}: run the earlier stage first"
                )
    return out


def run_pipeline(
    cfg: PipelineConfig,
    executor: Executor | None = None,
    only: list[str] | None = None,
    force: bool = False,
) -> dict:
    """Run (or resume) the pipeline; returns ``{stage: {"path": ..., "test": metrics, ...}}``."""
    jobs = plan(cfg, only)
    run_dir = abs_uri(cfg.run_dir())
    executor = executor or LocalExecutor()
    results = {}
    for job, h, done in jobs:
        if done and not force:
            log.info("stage %s: done already (%s), skipping", job.stage.name, job.output)
            results[job.stage.name] = {**_stage_result(job), "skipped": True}
            continue
        executor.run(job, run_dir, h)
        results[job.stage.name] = _stage_result(job)
    _write_summary(run_dir, _with_current_stages(cfg, run_dir, results))
    _publish(cfg, run_dir)
    return results


def _current(dest: str, h: str) -> bool:
    """Whether ``dest`` holds the artifact of the stage config hashed ``h`` (so the stage is done)."""
    return is_tagset(dest) and load_tagset(dest).meta.get("config_hash") == h


def _with_current_stages(cfg: PipelineConfig, run_dir: str, results: dict) -> dict:
    """``results`` plus, for a ``--stages`` subset, every other stage whose artifact matches the config, in
    pipeline order: the run folder's summary describes all of it, not only the stages run last."""
    out = {}
    for st in cfg.stages:
        dest = f"{run_dir}/{st.name}"
        if st.name in results:
            out[st.name] = results[st.name]
        elif _current(dest, stage_hash(cfg, st)):
            out[st.name] = {**_stage_result(StageJob(stage=st, output=dest)), "skipped": True}
    return out


def _stage_result(job: StageJob) -> dict:
    """Path, test metrics, and per task the kept step and step-0 metrics (what the summary shows)."""
    ts = load_tagset(job.output)
    names = set(ts.meta.get("tasks", [])) | {str(t) for t in job.stage.eval_tasks}
    mine = {t: m for t, m in ts.metrics.items() if t in names or m.get("stage") == job.stage.name}
    return {
        "path": job.output,
        "test": {t: m.get("test", {}) for t, m in mine.items()},
        "kept_step": {t: m.get("kept_step") for t, m in mine.items() if "kept_step" in m},
        "step0": {t: m.get("step0", {}) for t, m in mine.items() if "step0" in m},
        "baselines": {t: m["baselines"] for t, m in mine.items() if "baselines" in m},
        "baselines_best": {t: m["baselines_best"] for t, m in mine.items() if m.get("baselines_best")},
        "seconds": ts.meta.get("seconds"),
    }


def _publish(cfg: PipelineConfig, run_dir: str) -> None:
    """Put the last stage's artifact (it holds every earlier stage's tags too) in the tag registry."""
    registry, last = cfg.registry_dir(), f"{run_dir}/{cfg.stages[-1].name}"
    if not registry or not is_tagset(last):
        return
    from .registry import publish_tagset

    dest = publish_tagset(abs_uri(registry), cfg.name, last)
    log.info(
        "published %s to the tag registry as %r (%s): tagray serve --registry %s",
        last,
        cfg.name,
        dest,
        registry,
    )


def _write_summary(run_dir: str, results: dict) -> None:
    fs, root = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(root + "/summary.json", "w") as f:
        json.dump(results, f, indent=2, default=str)


def format_results(results: dict) -> str:
    """A plain-text table of the test metrics of every stage."""
    lines = [f"{'stage':<10} {'task':<20} {'metric':<28} value"]
    for stage, r in results.items():
        for task, m in r["test"].items():
            if not isinstance(m, dict):
                continue
            if "mse" in m:
                base = m.get("baseline_mse", float("nan"))
                lines.append(
                    f"{stage:<10} {task:<20} {'MSE (train-mean baseline)':<28} {m['mse']:.4f} "
                    f"({base:.4f}, {m['mse'] / base:.2f}x)"
                )
                lines.append(
                    f"{'':<10} {'':<20} {'Pearson / Spearman':<28} {m['pearson']:.3f} / {m['spearman']:.3f}"
                )
                for name, b in r.get("baselines", {}).get(task, {}).items():
                    if name != "mean" and "mse" in b:
                        lines.append(f"{'':<10} {'':<20} {'baseline ' + name + ' MSE':<28} {b['mse']:.4f}")
            elif "accuracy" in m:
                lines.append(f"{stage:<10} {task:<20} {'accuracy':<28} {m['accuracy']:.3f}")
            elif "loss" in m:
                extra = f"  BLEU {m['bleu']:.1f}" if "bleu" in m else ""
                lines.append(
                    f"{stage:<10} {task:<20} {'LM loss / perplexity':<28} {m['loss']:.3f} / "
                    f"{m.get('perplexity', float('nan')):.1f}{extra}"
                )
        lines.append(f"{'':<10} -> {r['path']}")
    return "\n".join(lines)
