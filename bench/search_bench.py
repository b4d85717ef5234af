"""An 8-trial search with and without the node's shared prefix cache, side by side in one process.

    .venv/bin/python bench/search_bench.py            # SmolLM2-135M, QED, 8 trials per variant (~20 min, 2 cores)
    .venv/bin/python bench/search_bench.py --smoke    # tiny random Llama: code paths only

The trials of one task differ only in the function tag (its length ``p`` and learning rate): everything
before it is frozen, so its keys/values are the same for every trial. ``tagray tune`` therefore gives the
trials of a node one shared prefix folder (``prefix_cache_shared: search``): the first trial computes
each row's prefix, the others map the files. Each variant runs the same 8 trials (same rows, same
``(p, lr)`` grid, the stage-2 recipe) through :func:`tagray.train.run_stage` on one loaded base, the
variants alternating trial by trial so that load from other processes hits them alike:

- ``shared``: one shared folder for all 8 trials (what a search does now);
- ``own``: every trial fills its own prefix store (what a search did before);
- ``off`` (``--with-off``): no prefix cache, the full forward every pass (PEFT's position).

Ray's own per-trial overheads (starting a worker group, reporting) are the same in every variant and left
out: this measures the trials' compute. Results: ``bench/results/search_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is a package

from bench.harness import RESULTS, add_options, machine, peak_rss_bytes, quiet  # noqa: E402
from tagray.config import parse_pipeline  # noqa: E402
from tagray.tasks.spec import load_task  # noqa: E402
from tagray.train import Runtime, StageJob, run_stage  # noqa: E402

GRID = [(p, lr) for p in (1, 2, 5, 10) for lr in (1e-4, 3e-4)]  # 8 trials, as a search samples them


def stage_for(args, variant: str, shared: str, p: int, lr: float):
    """The trial's one-task stage: the demo's stage-2 recipe at this ``(p, lr)``."""
    cache = {"shared": {"prefix_cache_shared": shared}, "own": {"prefix_cache_shared": "off"}}
    train = {
        "tag_length": p,
        "lr": lr,
        "head_mode": "varpro",
        "optimizer": "ngd",
        "batch_size": args.rows,
        "epochs": args.epochs,
        "eval_every": 1,
        "eval_rows": args.valid,
        "prefix_cache_gb": 8,
        **cache.get(variant, {"prefix": "off"}),
    }
    limits = {"train": args.rows, "valid": args.valid, "test": args.test}
    cfg = parse_pipeline(
        {
            "name": "search-bench",
            "base": args.base,
            "dtype": "float32",
            "stages": [
                {
                    "name": "single",
                    "tasks": [{"task": args.task, "limits": limits}],
                    "train_tags": [load_task(args.task).function_tag],  # the domain tag stays frozen
                }
            ],
            "train": train,
        }
    )
    return cfg.stages[0]


def domain_tags(args, base, work: Path) -> str:
    """The frozen ``<SMILES>`` the trials start from: ``--init-from``, the demo's stage 1 when it ran, or a
    one-step stage 1 (the tag near its mean-embedding start: the trials' cost does not depend on it)."""
    if args.init_from:
        return args.init_from
    demo = Path("runs/demo/domain")
    if not args.smoke and (demo / "tagset.json").exists():
        return str(demo)
    cfg = parse_pipeline(
        {
            "name": "search-bench",
            "base": args.base,
            "stages": [
                {
                    "name": "domain",
                    "tasks": [{"task": "smiles_lm", "limits": {"train": 8, "valid": 4, "test": 4}}],
                }
            ],
            "train": {"max_steps": 1, "batch_size": 4, "eval_every": 1, "eval_rows": 4},
        }
    )
    out = str(work / "domain")
    run_stage(StageJob(cfg.stages[0], args.base, "float32", None, out, "domain"), Runtime(), base=base)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(ap, base="smollm2-135m", task="qed", rows=128, valid=32, test=32, epochs=1.0, threads=2)
    ap.add_argument("--init-from", default=None, help="tag set with <SMILES> (default: its initial value)")
    ap.add_argument("--with-off", action="store_true", help="also run every trial without a prefix cache")
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, few rows: code paths only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    if args.smoke:
        from tagray.core.tiny import tiny_base, tiny_tokenizer

        base = tiny_base("llama", tiny_tokenizer())
        args.rows, args.valid, args.test = 16, 8, 8
    else:
        from tagray.core.base import load_base

        base = load_base(args.base)
    variants = ["shared", "own"] + (["off"] if args.with_off else [])
    work = Path(tempfile.mkdtemp(prefix="tagray-search-bench-"))
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    stats: dict[str, list[dict]] = {v: [] for v in variants}
    vals: dict[str, list[float]] = {v: [] for v in variants}
    t0 = time.time()
    try:
        init = domain_tags(args, base, work)
        for i, (p, lr) in enumerate(GRID):
            order = variants[i % len(variants) :] + variants[: i % len(variants)]  # rotating order
            for v in order:
                st = stage_for(args, v, str(work / "shared"), p, lr)
                job = StageJob(st, args.base, "float32", init, str(work / f"{v}-{i}"), f"{v}-{i}")
                t = time.perf_counter()
                ts, test = run_stage(job, Runtime(), base=base)
                seconds[v].append(time.perf_counter() - t)
                vals[v].append(test[args.task]["loss"])  # the kept state's test loss: same in every variant
                stats[v].append(ts.meta.get("prefix_cache") or {})
                print(f"trial {i} p={p} lr={lr:g} {v}: {seconds[v][-1]:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = {v: sum(s) for v, s in seconds.items()}
    res = {
        "benchmark": "search_bench",
        "config": {
            **vars(args),
            "grid": GRID,
            "trials": len(GRID),
            "base_params": base.model.num_parameters(),
        },
        "machine": machine(torch.device("cpu")),
        "seconds_per_trial": seconds,
        "total_s": total,
        "speedup_shared_vs_own": total["own"] / total["shared"],
        "prefix_cache": stats,
        "test_loss": vals,
        "same_results": all(
            abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(vals["shared"], vals["own"], strict=True)
        ),
        "peak_rss_bytes": peak_rss_bytes(),
        "wall_s": time.time() - t0,
    }
    if "off" in total:
        res["speedup_shared_vs_off"] = total["off"] / total["shared"]
    out = Path(args.out or RESULTS / ("search_bench_smoke.json" if args.smoke else "search_bench.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: res[k] for k in ("total_s", "speedup_shared_vs_own", "same_results")}, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
