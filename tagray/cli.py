"""``tagray`` command line: run the pipeline or one stage, evaluate, predict, list tasks and tags.

Bad configs and inputs exit with code 2 and one line ``error: <field>: <message>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .core.errors import TagrayError

log = logging.getLogger("tagray")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("transformers", "datasets", "filelock", "urllib3", "botocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def cmd_pipeline(args) -> int:
    from .config import load_pipeline
    from .pipeline import format_results, run_pipeline

    cfg = load_pipeline(args.config, args.set)
    only = args.stages.split(",") if getattr(args, "stages", None) else None
    if args.local:
        executor = None  # the stage recipe in this process
    else:
        from .ray.train import RayExecutor

        executor = RayExecutor(args.address)
    results = run_pipeline(cfg, executor=executor, only=only, force=args.force)
    print(format_results(results))
    registry = cfg.registry_dir()
    if registry and cfg.stages[-1].name in results:
        print(
            f"\npublished as tag set {cfg.name!r} to {registry}; serve it: tagray serve --registry {registry}"
        )
    return 0


def cmd_stage(args) -> int:
    args.stages = args.stage
    return cmd_pipeline(args)


def _frozen_setup(tags: str, task: str, base: str | None):
    from .config import parse_pipeline
    from .core.artifacts import load_tagset
    from .train import StageJob, build_setup

    ts = load_tagset(tags)
    base = base or ts.meta.get("base") or "smollm2-135m"
    cfg = parse_pipeline(
        {
            "name": "eval",
            "base": base,
            "stages": [{"name": "eval", "tasks": [task], "train_tags": [], "init_from": None}],
        }
    )
    job = StageJob(stage=cfg.stages[0], base=base, dtype="float32", init_from=tags)
    return build_setup(job), ts


def cmd_eval(args) -> int:
    import torch

    from .train import Runtime
    from .train.evaluate import evaluate

    setup, _ = _frozen_setup(args.tags, args.task, args.base)
    res = evaluate(
        setup, setup.tasks, args.split, Runtime("cpu"), torch.device("cpu"), limit=args.limit, generate=True
    )
    print(json.dumps(res, indent=2))
    return 0


def _read_inputs(args) -> list[dict]:
    rows = []
    if args.input:
        row = {}
        for kv in args.input:
            if "=" not in kv:
                raise TagrayError("--input", f"expected field=value, got {kv!r}")
            k, v = kv.split("=", 1)
            row[k] = v
        rows.append(row)
    if args.input_file:
        from .tasks.sources import load_file

        rows += load_file(args.input_file)
    if not rows:
        raise TagrayError("--input", "give --input field=value ... or --input-file FILE")
    return rows


def cmd_predict(args) -> int:
    from .core.artifacts import load_tagset
    from .core.base import load_base
    from .predict import Predictor

    ts = load_tagset(args.tags)
    base = load_base(args.base or ts.meta.get("base") or "smollm2-135m")
    pred = Predictor(base, {"tags": ts})
    rows = _read_inputs(args)
    reqs = [{"task": args.task, "inputs": r} for r in rows]
    kind = pred.task_kind(args.task)
    try:
        out = pred.generate(reqs) if kind == "lm" else pred.predict(reqs)
    except TagrayError as e:  # the Predictor names JSON paths (inputs.smiles); the CLI names the column
        e.field = e.field.removeprefix("inputs.")
        raise
    lines = [json.dumps({**r, **o}, default=str) for r, o in zip(rows, out, strict=True)]
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} predictions to {args.output}")
    else:
        print("\n".join(lines))
    return 0


def cmd_tasks(args) -> int:
    from .tasks.spec import builtin_tasks, load_task

    for name in builtin_tasks():
        t = load_task(name)
        print(f"{name:<20} {t.target.kind:<15} {t.raw.get('description', '')}")
    return 0


def cmd_tags(args) -> int:
    from .core.artifacts import load_tagset

    ts = load_tagset(args.tags)
    doc = ts.to_json()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"base {doc['base_id']}  stage {doc['stage']}")
    for n, info in doc["tags"].items():
        print(f"  {n:<14} {info['kind']:<9} p={info['length']:<3} stage={info['stage']}")
    for n, h in doc["heads"].items():
        print(f"  head {n:<9} {h['kind']} out_dim={h['out_dim']}")
    return 0


def cmd_validate_cluster(args) -> int:
    from .cluster import validate_cluster_yaml

    try:
        validate_cluster_yaml(args.path)
    except ValueError as e:
        raise TagrayError(args.path, str(e)) from e
    print(f"{args.path}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tagray",
        description="Tag-LLM on Ray: learn, search and serve input tags for frozen Hugging Face LMs.",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def run_opts(sp):
        sp.add_argument("config", help="pipeline YAML (local or s3://), e.g. jobs/pipeline.yaml")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. train.max_steps=20 or stages.1.train.lr=1e-3",
        )
        sp.add_argument("--local", action="store_true", help="run in this process instead of on Ray Train")
        sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
        sp.add_argument("--force", action="store_true", help="re-run stages whose artifacts already exist")

    sp = sub.add_parser("pipeline", help="run (or resume) every stage of a pipeline")
    run_opts(sp)
    sp.add_argument("--stages", help="comma-separated subset of stages to run")
    sp.set_defaults(fn=cmd_pipeline)

    sp = sub.add_parser("stage", help="run one stage of a pipeline (earlier stages must have run)")
    run_opts(sp)
    sp.add_argument("--stage", required=True)
    sp.set_defaults(fn=cmd_stage)

    sp = sub.add_parser("eval", help="evaluate a tag set on a task split")
    sp.add_argument("tags", help="tag-set folder (local or s3://)")
    sp.add_argument("--task", required=True, help="builtin task name or task YAML")
    sp.add_argument("--split", default="test", choices=["train", "valid", "test"])
    sp.add_argument("--limit", type=int, default=None, help="at most this many rows")
    sp.add_argument("--base", help="base model (default: the one recorded in the tag set)")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("predict", help="predict with a tag set")
    sp.add_argument("tags", help="tag-set folder (local or s3://)")
    sp.add_argument("--task", required=True, help="task name stored in the tag set, e.g. qed")
    sp.add_argument("--input", action="append", metavar="FIELD=VALUE", help="one input row, e.g. smiles=CCO")
    sp.add_argument("--input-file", help="CSV / JSONL / Parquet of input rows")
    sp.add_argument("--output", help="write JSON lines here instead of stdout")
    sp.add_argument("--base", help="base model (default: the one recorded in the tag set)")
    sp.set_defaults(fn=cmd_predict)

    sp = sub.add_parser("tasks", help="list builtin tasks")
    sp.set_defaults(fn=cmd_tasks)

    sp = sub.add_parser("tags", help="show the tags and heads of a tag set")
    sp.add_argument("tags")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_tags)

    sp = sub.add_parser("validate-cluster", help="validate a cluster.yaml offline")
    sp.add_argument("path", nargs="?", default="cluster.yaml")
    sp.set_defaults(fn=cmd_validate_cluster)

    for mod in ("tagray.ray.tune", "tagray.ray.serve", "tagray.bench"):
        try:
            m = __import__(mod, fromlist=["add_cli"])
        except ImportError:
            continue
        if hasattr(m, "add_cli"):
            m.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
