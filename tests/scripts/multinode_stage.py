"""Run one two-worker stage on a simulated 3-node Ray cluster (ray.cluster_utils.Cluster).

Usage: python multinode_stage.py BASE_DIR OUT_DIR ; prints JSON {"nodes": {rank: node_id}, "path": artifact}.
Runs in its own process so it does not collide with the test session's shared local Ray.
"""

import json
import os
import sys

import ray
from ray.cluster_utils import Cluster

from tagray.config import parse_pipeline
from tagray.pipeline import plan
from tagray.ray.train import fit_stage

base_dir, out = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
for _ in range(2):
    cluster.add_node(num_cpus=1)
ray.init(
    address=cluster.address,
    runtime_env={
        "env_vars": {
            "TAGRAY_PROGRESS": "0",
            "HF_HUB_OFFLINE": "1",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        }
    },
)
try:
    cfg = parse_pipeline(
        {
            "name": "multinode",
            "base": base_dir,
            "output": out,
            "train": {
                "max_steps": 2,
                "eval_every": 2,
                "batch_size": 2,
                "eval_rows": 4,
                "tag_length": 2,
                "probe_rows": 8,
            },
            "scaling": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD"},
            "stages": [
                {"name": "single", "tasks": [{"task": "qed", "limits": {"train": 16, "valid": 4, "test": 4}}]}
            ],
        }
    )
    job, h, _ = plan(cfg)[0]
    fit_stage(
        job, storage=os.path.join(out, "_ray"), config_hash=h, extra={"node_log": os.path.join(out, "nodes")}
    )
    nodes = {
        f: open(os.path.join(out, "nodes", f)).read() for f in sorted(os.listdir(os.path.join(out, "nodes")))
    }
    print(json.dumps({"nodes": nodes, "path": job.output, "cluster_nodes": len(ray.nodes())}))
finally:
    ray.shutdown()
    cluster.shutdown()
