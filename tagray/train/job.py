"""What a stage run needs (:class:`StageJob`) and where it runs (:class:`Runtime`).

A job is plain data, so it ships to Ray workers as a dict. A runtime is the process's view of the run:
its rank in the data-parallel group, its device, how it reports metrics and checkpoints and how it
finds the last one. :class:`Runtime` is the local, single-process one; the Ray Train executor subclasses
it (:mod:`tagray.ray.train`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

import torch

from ..config import StageConfig

log = logging.getLogger("tagray")


@dataclass
class StageJob:
    """Everything a worker needs to run a stage."""

    stage: StageConfig
    base: str = "smollm2-135m"
    dtype: str = "auto"
    """Base weights dtype; ``auto`` is resolved where the weights are used (:func:`resolve_dtype`)."""
    init_from: str | None = None  # resolved tag-set path (local or s3://)
    output: str | None = None  # where the stage's final artifact is written
    run_name: str = "tagray"


def resolve_dtype(dtype: str, use_gpu: bool) -> str:
    """``auto`` -> ``bfloat16`` for GPU workers, ``float32`` for CPU ones; explicit dtypes pass through.

    Decided from the trainer's own resources, never from the machine that happens to run the driver or
    the base-owner actor (a CPU head would hand GPU workers an fp32 base).
    """
    if dtype != "auto":
        return dtype
    return "bfloat16" if use_gpu else "float32"


class Runtime:
    """Local, single-process runtime: rank 0 of 1, reports kept in memory, checkpoints copied to a folder."""

    rank = 0
    world_size = 1

    def __init__(self, device: str | torch.device | None = None, checkpoint_dir: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint_dir = checkpoint_dir
        self.reports: list[dict] = []

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and self.checkpoint_dir:
            shutil.copytree(checkpoint_dir, self.checkpoint_dir, dirs_exist_ok=True)

    def latest_checkpoint(self) -> str | None:
        d = self.checkpoint_dir
        return d if d and os.path.exists(os.path.join(d, "trainer_state.json")) else None

    def log(self, msg: str) -> None:
        if self.rank == 0:
            log.info(msg)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity here; torch.distributed when a process group is up)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return t

    def all_gather(self, obj):
        """Every rank's ``obj`` as a list in rank order (``[obj]`` here)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            out = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]
