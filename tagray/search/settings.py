"""The ``tune:`` section of a tune YAML (a pipeline YAML plus that section), parsed into :class:`TuneSettings`.

Every error names its key (``tune.lr``, ``tune.asha.grace_period``) and is raised before Ray starts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from ..config import PipelineConfig, _build, parse_pipeline
from ..core.errors import ConfigError
from ..util import load_yaml

ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 2, "max_t": None}
# A trial only drives a Ray Train run (its workers get their own resources): a whole CPU would idle.
DEFAULT_TRIAL_RESOURCES = {"CPU": 0.1}


@dataclass(frozen=True)
class TuneSettings:
    """The ``tune:`` section of a tune YAML (docs/tune.md)."""

    stage: str | None = None
    """Stage to search (default: the last); earlier stages run first when their artifacts are missing."""
    tasks: list | None = None
    """Task names of that stage, each searched on its own (default: all of them)."""
    num_samples: int = 8
    tag_length: list = field(default_factory=lambda: [1, 2, 5, 10, 20])
    """Choices for p (vectors per tag)."""
    lr: list = field(default_factory=lambda: [1e-4, 3e-2])
    """``[low, high]``, sampled log-uniformly."""
    metric: str = "val_loss"
    """Validation metric reported by the stage; ``{task}`` is replaced, e.g. ``val/{task}/mse``."""
    mode: str = "min"
    asha: dict | bool | None = None
    """``{grace_period, reduction_factor, max_t}`` (max_t in evaluations), or false for FIFO."""
    seed: int = 0
    max_concurrent: int | None = None
    """Cap on trials at once (default ``num_samples``). Trials beyond what the cluster holds now wait:
    their pending resource requests are what the autoscaler scales on."""
    trial_resources: dict = field(default_factory=lambda: dict(DEFAULT_TRIAL_RESOURCES))
    """Resources of one trial's driver (its Train workers come from ``scaling:``), e.g.
    ``{CPU: 0.1, TRAIN_DRIVER_RESOURCE: 1}`` to keep drivers on the nodes that declare that resource."""
    registry: str | None = None
    """Where the best tag set and the top-k ensemble are published (default ``<output>/<name>/registry``)."""
    top_k: int = 3
    multi_objective: bool = False
    """Optimise (metric, tag_length) jointly and report the Pareto front."""

    def __post_init__(self):
        _check_tag_length(self.tag_length)
        object.__setattr__(self, "lr", _check_lr(self.lr))
        for k in ("num_samples", "top_k", "max_concurrent"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ConfigError(k, "must be >= 1")
        if self.mode not in ("min", "max"):
            raise ConfigError("mode", f"use min or max, got {self.mode!r}")
        if not self.metric:
            raise ConfigError("metric", "a metric name is required, e.g. val_loss")
        object.__setattr__(self, "asha", _check_asha(self.asha, self.multi_objective))
        object.__setattr__(self, "trial_resources", _check_resources(self.trial_resources))

    @property
    def concurrent_trials(self) -> int:
        """Trials Tune runs at once: ``max_concurrent``, else every sample (never what the cluster holds at
        start-up: an autoscaling cluster grows while the first trials wait)."""
        return min(self.max_concurrent or self.num_samples, self.num_samples)


def _check_tag_length(tl) -> None:
    if (
        not isinstance(tl, list)
        or not tl
        or len(set(tl)) != len(tl)
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in tl)
    ):
        raise ConfigError(
            "tag_length", f"expected a list of distinct integers >= 1, e.g. [1, 2, 5, 10, 20]; got {tl!r}"
        )


def _check_lr(lr) -> list[float]:
    try:
        lo, hi = (float(v) for v in lr)  # YAML reads 1e-4 (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError("lr", f"expected [low, high] (log-uniform), got {lr!r}") from None
    if not 0 < lo < hi:
        raise ConfigError("lr", f"expected 0 < low < high, got [{lo:g}, {hi:g}]")
    return [lo, hi]


def _check_asha(asha, multi_objective: bool) -> dict | None:
    """The full ASHA settings, or None for FIFO (``false``, or multi-objective: ASHA needs a scalar)."""
    if multi_objective and asha not in (None, False):
        raise ConfigError("asha", "ASHA needs a scalar metric: drop it (or set false) with multi_objective")
    if asha is True or (asha is None and not multi_objective):
        return dict(ASHA_DEFAULTS)
    if asha in (None, False):
        return None
    if not isinstance(asha, dict):
        raise ConfigError("asha", f"expected a mapping or false, got {asha!r}")
    unknown = set(asha) - set(ASHA_DEFAULTS)
    if unknown:
        raise ConfigError(f"asha.{sorted(unknown)[0]}", f"unknown key; allowed: {sorted(ASHA_DEFAULTS)}")
    out = {**ASHA_DEFAULTS, **asha}
    for k, lowest in (("grace_period", 1), ("reduction_factor", 2), ("max_t", 2)):
        v = out[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lowest):
            raise ConfigError(f"asha.{k}", f"expected an integer >= {lowest}, got {v!r}")
    return out


def _check_resources(res) -> dict[str, float]:
    """A Ray resource request: ``{name: amount >= 0}`` with some amount > 0 (Tune refuses an empty one)."""
    if not isinstance(res, dict) or not res:
        raise ConfigError("trial_resources", f"expected a mapping such as {{CPU: 0.1}}, got {res!r}")
    out = {}
    for k, v in res.items():
        if not isinstance(k, str) or not k:
            raise ConfigError("trial_resources", f"resource names are strings, got {k!r}")
        k = {"cpu": "CPU", "gpu": "GPU"}.get(k, k)  # Tune accepts both spellings; one key each here
        try:
            amount = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            amount = math.nan
        if not amount >= 0:  # also catches NaN
            raise ConfigError(f"trial_resources.{k}", f"expected an amount >= 0, got {v!r}")
        out[k] = amount
    if not any(out.values()):
        raise ConfigError("trial_resources", "at least one amount must be > 0, e.g. {CPU: 0.1}")
    return out


def parse_tune(raw: dict) -> tuple[PipelineConfig, TuneSettings]:
    """A raw tune YAML mapping -> (pipeline, settings); the stage, tasks and ASHA budget are checked too."""
    from .plan import plan_searches  # plan needs these settings; imported here to keep the modules acyclic

    if not isinstance(raw, dict):
        raise ConfigError("config", "expected a YAML mapping at the top level")
    raw = copy.deepcopy(raw)
    section = raw.pop("tune", None) or {}
    cfg = parse_pipeline(raw)
    ts = _build(TuneSettings, section, "tune")
    plan_searches(cfg, ts)  # validates stage, tasks and the ASHA budget now, not after Ray started
    return cfg, ts


def load_tune(path: str, overrides: list[str] | None = None) -> tuple[PipelineConfig, TuneSettings]:
    """Read a tune YAML (local or s3://) and apply ``key=value`` overrides (e.g. ``tune.num_samples=4``)."""
    return parse_tune(load_yaml(path, overrides))
