"""Run one two-worker stage on a simulated 3-node Ray cluster (ray.cluster_utils.Cluster).

Usage: python multinode_stage.py BASE_DIR OUTPUT LOCAL_DIR
  OUTPUT     shared storage for the stage (``s3://bucket/prefix``: the moto server of the calling test);
  LOCAL_DIR  a local folder, which the storage rules must refuse as ``output`` on this cluster.
Prints JSON {"nodes": {rank: node_id}, "path": artifact, "cluster_nodes": n, "refused": error or null,
"pipeline_refused": error or null, "ingest": {...}}: ``refused`` from the storage rule itself, ``pipeline_refused`` from
``run_pipeline`` with the Ray executor (the user's path; the trainer is stubbed out, so a run that is not
refused fails at once instead of training).
Runs in its own process so it does not collide with the test session's shared local Ray.
"""

import json
import os
import sys

import ray
from ray.cluster_utils import Cluster

# the repository root: tagray (when not installed) and the tests package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tagray.core.artifacts import load_tagset  # noqa: E402
from tagray.core.errors import ConfigError  # noqa: E402
from tagray.pipeline import plan, run_pipeline  # noqa: E402
from tagray.ray import train  # noqa: E402
from tagray.ray.storage import require_shared_storage  # noqa: E402
from tagray.ray.train import RayExecutor, fit_stage  # noqa: E402
from tagray.tasks.dataset import build_task_data  # noqa: E402
from tagray.tasks.spec import load_task  # noqa: E402
from tagray.util import worker_env  # noqa: E402
from tests.factories import stage_dict, tiny_pipeline  # noqa: E402

# pickled by value (tests.hooks registers itself): the workers need no tests package
from tests.hooks import node_and_shard_log, node_log  # noqa: E402

base_dir, out, local_dir = sys.argv[1], sys.argv[2], sys.argv[3]
nodes_dir = os.path.join(local_dir, "nodes")  # the hook's own record; every simulated node shares this disk


def pipeline(output: str):
    return tiny_pipeline(
        base_dir,
        output,
        name="multinode",
        scaling={"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD"},
        stages=[stage_dict("single", "qed")],
    )


class NotRefused(Exception):
    pass


def not_refused(*args, **kwargs):
    raise NotRefused("the stage reached the trainer with a node-local output")


cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
for _ in range(2):
    cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, runtime_env={"env_vars": worker_env()})
try:
    local_job, _, _ = plan(pipeline(local_dir))[0]
    try:
        require_shared_storage({"output": local_job.output}, {"CPU": 1})
        refused = None
    except ConfigError as e:
        refused = str(e)
    real_trainer = train.TorchTrainer
    train.TorchTrainer = not_refused
    try:
        run_pipeline(pipeline(local_dir), executor=RayExecutor())
        pipeline_refused = None
    except ConfigError as e:
        pipeline_refused = str(e)
    except NotRefused:
        pipeline_refused = None
    finally:
        train.TorchTrainer = real_trainer
    job, h, _ = plan(pipeline(out))[0]
    run_dir = job.output.rsplit("/", 1)[0]
    fit_stage(
        job, storage=f"{run_dir}/_ray", config_hash=h, worker_setup=node_log, extra={"node_log": nodes_dir}
    )
    nodes = {f: open(os.path.join(nodes_dir, f)).read() for f in sorted(os.listdir(nodes_dir))}
    doc = {"nodes": nodes, "path": job.output, "cluster_nodes": len(ray.nodes()), "refused": refused}
    doc["pipeline_refused"] = pipeline_refused
    # Ray Data ingest: three workers, one per node, each with its own shard of qed's 18 training rows
    ingest = tiny_pipeline(
        base_dir,
        out,
        name="multinode-ingest",
        scaling={
            "num_workers": 3,
            "cpus_per_worker": 0.5,
            "placement_strategy": "STRICT_SPREAD",
            "ingest": "ray_data",
        },
        stages=[stage_dict("single", "qed", limits={"train": 18, "valid": 4, "test": 4})],
    )
    job, h, _ = plan(ingest)[0]
    logs = os.path.join(local_dir, "ingest")
    fit_stage(
        job,
        storage=f"{job.output.rsplit('/', 1)[0]}/_ray",
        config_hash=h,
        worker_setup=node_and_shard_log,
        extra={"node_log": logs, "shard_log": logs},
    )
    shards = {}
    for r in range(3):
        with open(os.path.join(logs, f"rank{r}.json")) as f:
            shards[r] = [row["smiles"] for row in json.load(f)["qed"]]
    doc["ingest"] = {
        "shards": shards,
        "nodes": [open(os.path.join(logs, f"rank{r}")).read() for r in range(3)],
        "split": [row["smiles"] for row in build_task_data(load_task(job.stage.tasks[0])).splits["train"]],
        "meta": load_tagset(job.output).meta,
    }
    print(json.dumps(doc))
finally:
    ray.shutdown()
    cluster.shutdown()
