"""Ray Train executor: every stage runs as a ``TorchTrainer`` (Train V2) over :func:`tagray.train.run_stage`.

- scaling from the stage config (workers, CPUs/GPUs per worker, placement);
- the base dtype is resolved from the trainer's own resources (``auto``: bf16 when ``use_gpu``), never in
  the process that happens to host the driver or the base owner;
- DDP over the tag and head tables only: the frozen base is excluded from DDP's parameter sync, so no
  gradient buckets or broadcasts for it (and it may be a read-only object-store view);
- the base comes from the cluster's shared object-store copy (:mod:`tagray.ray.shared`);
- rank 0 reports tags + heads + optimizer moments (kilobytes) at each evaluation; a restarted worker
  group resumes from the latest one (``FailureConfig(max_failures)``), and re-running a stage with the
  same run name and storage resumes the same way.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..config import StageConfig, stage_from_dict, to_dict
from ..train import Runtime, StageJob, resolve_dtype, run_stage
from ..util import abs_uri, worker_env
from .ingest import ingest_stage, shard_task_data
from .session import ensure_ray
from .shared import attach_base, base_info
from .storage import require_shared_storage


class RayTrainRuntime(Runtime):
    """Runtime inside a Ray Train worker."""

    def __init__(self, strategy: str = "ddp"):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.strategy = strategy
        super().__init__(device=ray.train.torch.get_device())

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model.to(self.device)
        if self.strategy == "fsdp":
            return ray.train.torch.prepare_model(
                model, parallel_strategy="fsdp", parallel_strategy_kwargs={"use_orig_params": True}
            )
        # DDP syncs only the tag and head tables; the frozen base is identical on every rank already.
        model._ddp_params_and_buffers_to_ignore = [
            n for n, _ in model.named_parameters() if n.startswith("base.")
        ] + [n for n, _ in model.named_buffers() if n.startswith("base.")]
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def latest_checkpoint(self) -> str | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return ckpt.to_directory(tempfile.mkdtemp(prefix="tagray-resume-"))


def train_loop_per_worker(config: dict) -> None:
    """Entry point of every Train worker: ``config = {"job": StageJob as dict, "base": shared-base info}``.

    ``config["worker_setup"]`` (optional) is called as ``fn(runtime, config)`` before the stage runs: an
    extension point for per-worker instrumentation (the tests use it to record nodes and shards and to
    kill workers); ``config["task_data"]`` holds this worker's ingested tasks (``scaling.ingest: ray_data``).
    """
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    tl = logging.getLogger("tagray")  # only tagray's own progress lines, not Ray's per-report INFO logs
    if not tl.handlers:
        tl.addHandler(logging.StreamHandler())
        tl.setLevel(logging.INFO)
        tl.propagate = False  # Ray's worker root logger would print every line a second time
    jd = dict(config["job"])
    job = StageJob(stage=stage_from_dict(jd.pop("stage")), **jd)
    rt = RayTrainRuntime(job.stage.scaling.strategy)
    base = attach_base(config["base"], rt.device) if config.get("base") else None
    tasks = None
    if config.get("ingest") is not None:  # scaling.ingest: ray_data: this worker's shard, from Ray Data
        tasks = shard_task_data(job.stage.tasks, config["ingest"], rt.rank, rt.world_size)
    if config.get("worker_setup") is not None:
        config["worker_setup"](rt, {**config, "task_data": tasks})
    run_stage(job, rt, base=base, config_hash=config.get("config_hash"), task_data=tasks)


def fit_stage(
    job: StageJob,
    storage: str,
    *,
    share_base: bool = True,
    config_hash: str | None = None,
    callbacks: list | None = None,
    worker_setup: Callable | None = None,
    extra: dict | None = None,
) -> ray.train.Result:
    """Run one stage on the cluster and return Ray's ``Result``; the artifact is at ``job.output``.

    Args:
        job: the stage job (``job.output`` is where the final tag set is written).
        storage: Ray Train storage path (local folder or ``s3://``) for checkpoints and run state.
        share_base: serve the base from the object store (else each worker reads it from disk/S3).
        config_hash: recorded in the artifact so a finished stage is not re-run for the same config.
        callbacks: Ray Train callbacks (e.g. Tune's ``TuneReportCallback`` when run inside a trial).
        worker_setup: ``fn(runtime, config)`` run on every worker first (see :func:`train_loop_per_worker`).
        extra: more entries of the worker config (read by ``worker_setup``).
    """
    st: StageConfig = job.stage
    sc = st.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    # refused before any worker starts: a node-local path would strand checkpoints on one node
    require_shared_storage({"output": job.output, "init_from": job.init_from, "storage": storage}, resources)
    dtype = resolve_dtype(job.dtype, sc.use_gpu)  # the workers' dtype, decided from their resources
    info = base_info(job.base, dtype) if share_base else None
    datasets, data_config, ingest = None, None, None
    if sc.ingest == "ray_data":  # read, split and label on the cluster; every worker gets its own shard
        datasets, to_split, ingest = ingest_stage(st.tasks, sc.num_workers)
        data_config = DataConfig(datasets_to_split=to_split)
    jd = {
        "stage": to_dict(st),
        "base": job.base,
        "dtype": dtype,
        "init_from": job.init_from,
        "output": job.output,
        "run_name": job.run_name,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": jd,
            "base": info,
            "config_hash": config_hash,
            "worker_setup": worker_setup,
            "ingest": ingest,
            **(extra or {}),
        },
        datasets=datasets,
        dataset_config=data_config,
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=sc.placement_strategy,
        ),
        run_config=RunConfig(
            name=f"{job.run_name}-{st.name}",
            storage_path=abs_uri(storage),
            failure_config=FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )
    return trainer.fit()


class RayExecutor:
    """The pipeline's stages as Ray Train jobs (local embedded Ray, or the cluster at ``address``)."""

    def __init__(self, address: str | None = None):
        ensure_ray(address)

    def run(self, job: StageJob, run_dir: str, config_hash: str) -> None:
        fit_stage(job, storage=f"{run_dir}/_ray", config_hash=config_hash)
