"""The stage recipe (Ray-free): setup, loop, evaluation, checkpoints, curves."""

from .job import Runtime, StageJob, resolve_dtype
from .recipe import run_stage
from .setup import Setup, build_setup

__all__ = ["Runtime", "Setup", "StageJob", "build_setup", "resolve_dtype", "run_stage"]
