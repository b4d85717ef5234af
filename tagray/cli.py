"""``tagray`` command line: an explicit table of subcommands, each a typed function.

Bad configs and inputs exit with code 2 and one line ``error: <field>: <message>``; every import a
command needs is imported by that command (a missing dependency is an error, never a silently missing
subcommand).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .core.errors import TagrayError

log = logging.getLogger("tagray")


# ---- the commands ------------------------------------------------------------------------------------


def pipeline(
    config: str,
    overrides: list[str],
    local: bool,
    address: str | None,
    force: bool,
    stages: list[str] | None = None,
) -> int:
    """Run (or resume) the stages of a pipeline YAML, on Ray Train unless ``local``."""
    from .config import load_pipeline
    from .pipeline import format_results, run_pipeline

    cfg = load_pipeline(config, overrides)
    executor = None  # the stage recipe in this process
    if not local:
        from .ray.train import RayExecutor

        executor = RayExecutor(address)
    results = run_pipeline(cfg, executor=executor, only=stages, force=force)
    print(format_results(results))
    registry = cfg.registry_dir()
    if registry and cfg.stages[-1].name in results:
        print(
            f"\npublished as tag set {cfg.name!r} to {registry}; serve it: tagray serve --registry {registry}"
        )
    return 0


def tune(config: str, overrides: list[str], address: str | None) -> int:
    """Search tag length and learning rate per task (Ray Tune + Optuna + ASHA); trains missing earlier
    stages first."""
    from .pipeline import run_pipeline
    from .ray.train import RayExecutor
    from .ray.tune import run_search
    from .search import format_table, interrupted, load_tune, prerequisites, save_table

    cfg, ts = load_tune(config, overrides)  # bad settings exit 2 here, before Ray starts
    executor = RayExecutor(address)
    first = prerequisites(cfg, ts)
    if first is not None:  # the searched stage starts from tags that do not exist yet: train them
        log.info("tune: running stage(s) %s first", [s.name for s in first.stages])
        run_pipeline(first, executor=executor)
    res = run_search(cfg, ts, address=address)
    table = format_table(res)
    print(table)
    if interrupted(res):
        print("search interrupted; re-run the same command to resume it")
        return 130
    save_table(cfg, table)
    return 0


def _frozen_setup(tags: str, task: str, base: str | None):
    from .config import parse_pipeline
    from .core.artifacts import load_tagset
    from .train import StageJob, build_setup

    ts = load_tagset(tags)
    base = base or ts.meta.get("base") or "smollm2-135m"
    stage = {"name": "eval", "tasks": [task], "train_tags": [], "init_from": None}
    cfg = parse_pipeline({"name": "eval", "base": base, "stages": [stage]})
    return build_setup(StageJob(stage=cfg.stages[0], base=base, dtype="float32", init_from=tags)), ts


def evaluate(tags: str, task: str, split: str, limit: int | None, base: str | None, baselines: bool) -> int:
    """Metrics of a tag set on a task split, as JSON; with ``baselines`` the expert models' beside them."""
    import torch

    from .train import Runtime
    from .train.evaluate import evaluate as run_eval

    setup, _ = _frozen_setup(tags, task, base)
    res = run_eval(setup, setup.tasks, split, Runtime("cpu"), torch.device("cpu"), limit=limit, generate=True)
    if baselines:
        from .baselines import fit_baselines

        for td in setup.tasks:
            if td.spec.target.kind != "lm" and td.spec.name in res:
                res[td.spec.name]["baselines"] = fit_baselines(td.spec, data=td, limit=limit)
    print(json.dumps(res, indent=2))
    return 0


def baseline(task: str, output: str | None, seed: int, n_jobs: int, as_json: bool) -> int:
    """Fit scikit-learn expert models (fingerprints, descriptors, composition) on a task's own splits."""
    from .baselines import fit_baselines, format_baselines

    res = fit_baselines(task, seed=seed, n_jobs=n_jobs)
    print(json.dumps(res, indent=2) if as_json else format_baselines(res))
    if output:
        import fsspec

        with fsspec.open(output, "w") as f:
            f.write(json.dumps(res, indent=1, allow_nan=False))
    return 0


def _read_inputs(pairs: list[str] | None, path: str | None) -> list[dict]:
    rows = []
    if pairs:
        row = {}
        for kv in pairs:
            if "=" not in kv:
                raise TagrayError("--input", f"expected field=value, got {kv!r}")
            k, v = kv.split("=", 1)
            row[k] = v
        rows.append(row)
    if path:
        from .tasks.sources import load_file

        rows += load_file(path)
    if not rows:
        raise TagrayError("--input", "give --input field=value ... or --input-file FILE")
    return rows


def predict(
    tags: str,
    task: str,
    inputs: list[str] | None,
    input_file: str | None,
    output: str | None,
    base: str | None,
) -> int:
    """Predictions (or generations) of a tag set's task for rows given inline or in a file."""
    from .core.artifacts import load_tagset
    from .core.base import load_base
    from .serving import Predictor

    rows = _read_inputs(inputs, input_file)
    ts = load_tagset(tags)
    pred = Predictor(load_base(base or ts.meta.get("base") or "smollm2-135m"), {"tags": ts})
    reqs = [{"task": task, "inputs": r} for r in rows]
    kind = pred.task_kind(task)
    try:
        out = pred.generate(reqs) if kind == "lm" else pred.predict(reqs)
    except TagrayError as e:  # the Predictor names JSON paths (inputs.smiles); the CLI names the column
        e.field = e.field.removeprefix("inputs.")
        raise
    lines = [json.dumps({**r, **o}, default=str) for r, o in zip(rows, out, strict=True)]
    if output:
        with open(output, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} predictions to {output}")
    else:
        print("\n".join(lines))
    return 0


def tasks() -> int:
    """The builtin tasks."""
    from .tasks.spec import builtin_tasks, load_task

    for name in builtin_tasks():
        t = load_task(name)
        print(f"{name:<20} {t.target.kind:<15} {t.raw.get('description', '')}")
    return 0


def show_tags(tags: str, as_json: bool) -> int:
    """The tags and heads of a tag set."""
    from .core.artifacts import load_tagset

    doc = load_tagset(tags).to_json()
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"base {doc['base_id']}  stage {doc['stage']}")
    for n, info in doc["tags"].items():
        print(f"  {n:<14} {info['kind']:<9} p={info['length']:<3} stage={info['stage']}")
    for n, h in doc["heads"].items():
        print(f"  head {n:<9} {h['kind']} out_dim={h['out_dim']}")
    return 0


def validate_cluster(path: str) -> int:
    """Validate a cluster.yaml offline (Ray's schema plus tagray's rules)."""
    from .cluster import validate_cluster_yaml

    try:
        validate_cluster_yaml(path)
    except ValueError as e:
        raise TagrayError(path, str(e)) from e
    print(f"{path}: OK")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Serve a tag registry over HTTP (Ray Serve) until SIGINT / SIGTERM."""
    from .ray.serve import cmd_serve

    return cmd_serve(args)


# ---- the table ---------------------------------------------------------------------------------------


def _run_opts(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", help="pipeline YAML (local or s3://), e.g. jobs/pipeline.yaml")
    _set_opt(sp, "train.max_steps=20 or stages.1.train.lr=1e-3")
    sp.add_argument("--local", action="store_true", help="run in this process instead of on Ray Train")
    sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    sp.add_argument("--force", action="store_true", help="re-run stages whose artifacts already exist")


def _set_opt(sp: argparse.ArgumentParser, example: str) -> None:
    sp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. {example}",
    )


def _pipeline_args(sp):
    _run_opts(sp)
    sp.add_argument("--stages", help="comma-separated subset of stages to run")


def _stage_args(sp):
    _run_opts(sp)
    sp.add_argument("--stage", required=True)


def _tune_args(sp):
    sp.add_argument("config", help="tune YAML: a pipeline YAML plus a tune: section, e.g. jobs/tune.yaml")
    _set_opt(sp, "tune.num_samples=4 or train.max_steps=20")
    sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


def _eval_args(sp):
    sp.add_argument("tags", help="tag-set folder (local or s3://)")
    sp.add_argument("--task", required=True, help="builtin task name or task YAML")
    sp.add_argument("--split", default="test", choices=["train", "valid", "test"])
    sp.add_argument("--limit", type=int, default=None, help="at most this many rows")
    sp.add_argument("--base", help="base model (default: the one recorded in the tag set)")
    sp.add_argument(
        "--baselines", action="store_true", help="also fit the expert baselines on the same split"
    )


def _baseline_args(sp):
    sp.add_argument("task", help="builtin task name or task YAML (local or s3://)")
    sp.add_argument("--output", help="write the results as JSON here (local or s3://)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--n-jobs", type=int, default=-1, help="parallel jobs for random forests (-1: all cores)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _predict_args(sp):
    sp.add_argument("tags", help="tag-set folder (local or s3://)")
    sp.add_argument("--task", required=True, help="task name stored in the tag set, e.g. qed")
    sp.add_argument("--input", action="append", metavar="FIELD=VALUE", help="one input row, e.g. smiles=CCO")
    sp.add_argument("--input-file", help="CSV / JSONL / Parquet of input rows")
    sp.add_argument("--output", help="write JSON lines here instead of stdout")
    sp.add_argument("--base", help="base model (default: the one recorded in the tag set)")


def _tags_args(sp):
    sp.add_argument("tags")
    sp.add_argument("--json", action="store_true")


def _serve_args(sp):
    from .serving.deploy import add_parser

    add_parser(sp)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = [
    Command(
        "pipeline",
        "run (or resume) every stage of a pipeline",
        _pipeline_args,
        lambda a: pipeline(
            a.config, a.set, a.local, a.address, a.force, a.stages.split(",") if a.stages else None
        ),
    ),
    Command(
        "stage",
        "run one stage of a pipeline (earlier stages must have run)",
        _stage_args,
        lambda a: pipeline(a.config, a.set, a.local, a.address, a.force, [a.stage]),
    ),
    Command(
        "tune",
        "search tag length and learning rate per task (Ray Tune + Optuna + ASHA)",
        _tune_args,
        lambda a: tune(a.config, a.set, a.address),
    ),
    Command(
        "eval",
        "evaluate a tag set on a task split",
        _eval_args,
        lambda a: evaluate(a.tags, a.task, a.split, a.limit, a.base, a.baselines),
    ),
    Command(
        "baseline",
        "fit scikit-learn expert baselines on a task's own splits",
        _baseline_args,
        lambda a: baseline(a.task, a.output, a.seed, a.n_jobs, a.json),
    ),
    Command(
        "predict",
        "predict with a tag set",
        _predict_args,
        lambda a: predict(a.tags, a.task, a.input, a.input_file, a.output, a.base),
    ),
    Command("serve", "serve a tag registry over HTTP (Ray Serve)", _serve_args, serve),
    Command("tasks", "list builtin tasks", lambda sp: None, lambda a: tasks()),
    Command("tags", "show the tags and heads of a tag set", _tags_args, lambda a: show_tags(a.tags, a.json)),
    Command(
        "validate-cluster",
        "validate a cluster.yaml offline",
        lambda sp: sp.add_argument("path", nargs="?", default="cluster.yaml"),
        lambda a: validate_cluster(a.path),
    ),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tagray",
        description="Tag-LLM on Ray: learn, search and serve input tags for frozen Hugging Face LMs.",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    for c in COMMANDS:
        sp = sub.add_parser(c.name, help=c.help, description=c.help)
        c.add_args(sp)
        sp.set_defaults(fn=c.run)
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("transformers", "datasets", "filelock", "urllib3", "botocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args) or 0
    except TagrayError as e:
        print(f"error: {e.field}: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
