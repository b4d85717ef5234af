"""Per-worker test hooks for ``fit_stage(..., worker_setup=hook, extra={...})``: test code, not tagray's.

Each hook is ``fn(runtime, config)`` and reads its settings from the worker config (``extra``). The module
is registered for pickling by value, so Ray workers run the hooks without importing the ``tests`` package
(the simulated-cluster script and ``ray job submit`` workers do not have it on their path).
"""

from __future__ import annotations

import os
import sys
import time

import ray
import ray.cloudpickle


def node_log(rt, config: dict) -> None:
    """Write this rank's Ray node id to ``<config["node_log"]>/rank<N>`` (which node each rank ran on)."""
    os.makedirs(config["node_log"], exist_ok=True)
    with open(os.path.join(config["node_log"], f"rank{rt.rank}"), "w") as f:
        f.write(ray.get_runtime_context().get_node_id())


def shard_log(rt, config: dict) -> None:
    """Write this rank's training rows (``config["task_data"]``, Ray Data ingest) as JSON to
    ``<config["shard_log"]>/rank<N>.json``: ``{task: [row, ...]}``."""
    import json

    os.makedirs(config["shard_log"], exist_ok=True)
    rows = {td.spec.name: td.splits["train"] for td in config["task_data"]}
    with open(os.path.join(config["shard_log"], f"rank{rt.rank}.json"), "w") as f:
        json.dump(rows, f)


def node_and_shard_log(rt, config: dict) -> None:
    """:func:`node_log` and :func:`shard_log` together."""
    node_log(rt, config)
    shard_log(rt, config)


def fail_at_step(rt, config: dict) -> None:
    """Kill the last rank once, at its first report after ``config["fail_at_step"]``.

    ``config["fail_marker"]`` (a file) records the kill, so the restarted worker group runs through. The
    kill is a hard ``os._exit``: what a lost node or an OOM-killed worker looks like to Ray Train.
    """
    step, marker = config["fail_at_step"], config["fail_marker"]
    report = rt.report

    def dying_report(metrics: dict, checkpoint_dir: str | None) -> None:
        if metrics.get("step", 0) > step and rt.rank == rt.world_size - 1 and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(5)  # the controller polls workers: let it register the step checkpoint first
            os._exit(1)
        report(metrics, checkpoint_dir)

    rt.report = dying_report


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
