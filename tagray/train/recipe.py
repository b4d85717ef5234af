"""One stage as a recipe: setup -> step-0 evaluation -> loop -> restore the best state -> test -> artifact.

``run_stage(job, runtime)`` is what a Ray Train worker (or a test, or ``--local``) calls. The three
stages differ only in their data (:class:`~tagray.config.StageConfig`), never in code.
"""

from __future__ import annotations

import random
import resource
import time
from dataclasses import asdict

import torch

from ..core.artifacts import TagSet, save_tagset
from ..core.base import Base
from .batches import Example
from .checkpoint import current_tagset, load_checkpoint
from .curves import write_curves
from .evaluate import evaluate, lm_references
from .job import Runtime, StageJob
from .loop import Trainer
from .setup import Setup, build_setup


def _train_rows(setup: Setup) -> list[Example]:
    return [
        Example(e.enc, e.target, i) for i, td in enumerate(setup.tasks) for e in setup.examples(td, "train")
    ]


def _step0(tr: Trainer, rt, device, autocast) -> dict:
    """Validation (competing for the best state) and test metrics of the initial state, plus the LM
    references (untagged prompt, unigram) on the test split."""
    setup = tr.setup
    tr.validate(report=False)
    test0 = evaluate(setup, setup.tasks, "test", rt, device, autocast=autocast)
    for td in setup.tasks:
        if td.spec.target.kind == "lm" and td.spec.name in test0:
            test0[td.spec.name].update(lm_references(setup, td, "test", rt, device))
    return test0


def _meta(job: StageJob, setup: Setup, tr: Trainer, kept: dict, config_hash, t0: float) -> dict:
    """What the artifact records about the run besides tags, heads and metrics."""
    store = setup.model.prefix_store
    return {
        "run": job.run_name,
        "base": job.base,
        "kept_steps": kept,
        "steps": tr.state.step,
        "train_config": asdict(setup.cfg),
        "tasks": [td.spec.name for td in setup.tasks],
        "config_hash": config_hash,
        "resumed_from_step": tr.state.resumed_from_step,
        # this worker's wall time: setup, training, test (a resumed run: since resuming)
        "seconds": round(time.time() - t0, 1),
        "probe": setup.probe,
        # rows of each task's whole training split; sharded: each worker held only its share (Ray Data
        # ingest), and baselines, fitted on rank 0, saw rank 0's shard
        "train_rows": {
            td.spec.name: td.shard["rows"]["train"] if td.shard else len(td.splits["train"])
            for td in setup.tasks
        },
        "sharded": setup.sharded,
        "ingest": {
            td.spec.name: {k: td.shard[k] for k in ("rows", "blocks", "peak_rss_mb")} for td in setup.tasks
        }
        if setup.sharded
        else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # rank 0's
        "feature_memo": {"hits": setup.memo.hits, "misses": setup.memo.misses},  # rows read, not recomputed
        "prefix_cache": {"rows": len(store), "bytes_per_row": store.bytes_per_row(), **store.stats}
        if store
        else None,
    }


def run_stage(
    job: StageJob,
    runtime: Runtime | None = None,
    base: Base | None = None,
    config_hash: str | None = None,
    task_data: list | None = None,
) -> tuple[TagSet, dict]:
    """Train one stage; returns the final tag set (each group's best validation state) and test metrics.

    ``task_data``: the stage's tasks as the executor ingested them (default: read here)."""
    t0 = time.time()
    rt = runtime or Runtime()
    cfg = job.stage.train
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = rt.device
    setup = build_setup(job, base, device, rt=rt, task_data=task_data)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    wrapped = rt.wrap(setup.model)
    tr = Trainer(setup, job.stage.name, rt, wrapped, _train_rows(setup), device, autocast)
    n_trainable = sum(p.numel() for p in tr.params)
    rt.log(
        f"stage {job.stage.name}: training {sorted(setup.train_tags)} + heads {sorted(setup.train_heads)} "
        f"({n_trainable:,} parameters, {len(tr.train)} rows, {tr.total} steps); groups "
        f"{[g.name for g in setup.groups]}; frozen tags {sorted(set(setup.tag_info) - setup.train_tags)}"
    )
    step0 = {}
    ckpt = rt.latest_checkpoint()
    if ckpt:
        tr.state = load_checkpoint(ckpt, setup, tr.opt, tr.best)
        tr.sched.last_epoch = tr.state.step
        tr.state.resumed_from_step = tr.state.step
        step0 = dict(tr.state.history[0].get("step0_test", {})) if tr.state.history else {}
        rt.log(f"stage {job.stage.name}: resumed from step {tr.state.step}")
    else:
        step0 = _step0(tr, rt, device, autocast)
        tr.state.history[0]["step0_test"] = step0
    tr.run()
    tr.best.restore(setup)
    test = evaluate(
        setup, setup.tasks + setup.eval_tasks, "test", rt, device, generate=True, autocast=autocast
    )
    kept = tr.best.steps()
    metrics = {}
    for i, td in enumerate(setup.tasks):
        name = td.spec.name
        group = next((g.name for g in setup.groups if i in g.tasks), None)
        refs = {k: v for k, v in step0.get(name, {}).items() if k.endswith("_loss") and k != "loss"}
        metrics[name] = {
            "test": {**test.get(name, {}), **refs},
            "stage": job.stage.name,
            "step0": step0.get(name, {}),
            "kept_step": kept.get(group),
        }
        if cfg.baselines and td.spec.head_tag and rt.rank == 0:
            from ..baselines import fit_baselines  # scikit-learn, only when asked

            b = fit_baselines(td.spec, data=td, seed=cfg.seed)
            metrics[name]["baselines"] = {k: m.get("test", {}) for k, m in b["models"].items()}
            metrics[name]["baselines_best"] = b.get("best")  # chosen on the validation split
            rt.log(f"stage {job.stage.name}: {name} baselines (best: {b.get('best')}) fitted")
    for td in setup.eval_tasks:
        metrics[td.spec.name] = {"test": test.get(td.spec.name, {}), "stage": job.stage.name}
    final = current_tagset(setup, metrics, stage=job.stage.name)
    final.meta = _meta(job, setup, tr, kept, config_hash, t0)
    if rt.rank == 0 and job.output:
        save_tagset(final, job.output)
        write_curves(tr.state.history, job.output, f"stage {job.stage.name} ({job.run_name})")
        rt.log(f"stage {job.stage.name}: artifact written to {job.output} (kept steps {kept})")
    return final, test
