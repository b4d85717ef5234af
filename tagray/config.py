"""Typed configuration: YAML -> dict -> dataclasses, with dotted ``key=value`` overrides.

Every error names the offending key (``stages[1].train.lr``). A pipeline is a list of stages; a stage is
a list of tasks plus training and scaling settings. Stage defaults come from the pipeline's top-level
``train:`` and ``scaling:`` and are overridden per stage.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import get_type_hints

from .core.errors import ConfigError
from .util import abs_uri, load_yaml, stable_hash


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one stage."""

    tag_length: int = 10
    """p, vectors per new tag (the paper found 10 best; longer tags overfit)."""
    lr: float = 1e-3
    """AdamW learning rate (cosine schedule, ``warmup_ratio`` warm-up)."""
    head_lr: float | None = None
    """Learning rate of the heads (default ``lr / 10``): a head has d coherent inputs, a tag vector has one."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    batch_size: int = 8
    """Rows per step per worker."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum x workers)."""
    max_steps: int = 100
    epochs: float | None = None
    """If set, the run length in passes over the training rows (overrides ``max_steps``)."""
    eval_every: int = 50
    """Steps between validations (each one reports metrics and a checkpoint)."""
    eval_rows: int = 100
    """Validation rows per task per evaluation (the final test evaluation uses the whole test split)."""
    seed: int = 0
    bucketing: bool = True
    """Group rows of similar length into batches (less padding)."""
    isolate_spans: bool = False
    """Domain tags and their data spans do not attend to the prompt before the tag."""
    grad_clip: float = 1.0
    log_every: int = 10
    """Optimizer steps between progress lines (a line also comes when ``progress_s`` have passed)."""
    progress_s: float = 30.0
    """Seconds between progress lines (with an ETA) of every long loop of a stage: steps, the data and
    probe passes of the setup, varpro's passes over a step's rows, evaluations, generation. 0: every
    unit; a negative value: only the per-``log_every`` step lines. Not part of the stage's hash."""
    init_noise: float = 0.0
    """Relative noise added to the paper's mean-embedding init (0 = the paper's)."""
    head_init: str = "ridge"
    """``ridge``: start each new head from a least-squares fit on frozen features of ``probe_rows``
    training rows (linear-probe init, then tags and head train jointly); ``paper``: small weights along
    the mean token embedding."""
    probe_rows: int = 0
    """Training rows per new head used for its feature statistics and ridge init (0: all of them; the
    same pass fills the prefix cache, so it costs what the first epoch's prefixes would)."""
    head_mode: str = "refit"
    """How a new head follows its moving function tag. ``varpro``: the head is the ridge fit on every
    training row's current features and the tag descends that head's closed-form leave-one-out error (an
    estimate of its error on unseen rows; :mod:`tagray.train.varpro`); ``refit``: re-fitted in closed form (ridge on the
    current features of ``refit_rows`` training rows) before every optimizer step and evaluation, so the
    tag's gradient is that of the best linear read-out (variable projection); ``batch``: trained jointly,
    reading features centred on the batch mean (BatchNorm style), re-centred before evaluations;
    ``track``: trained jointly with a running feature mean; ``fixed``: trained jointly with the statistics
    of step 0. docs/training.md measures all four."""
    refit_rows: int = 0
    """Training rows per head for ``refit`` and for re-centring (0: all of them)."""
    track_feature_mean: float = 0.2
    """Momentum of the running feature mean with ``head_mode: track``."""
    optimizer: str = "adamw"
    """``adamw``, or ``ngd``: normalised gradient descent, each step moves every trainable table by ``lr``
    (RMS per coordinate) along its gradient. Adam's per-coordinate normalisation turns a noisy gradient
    into a sign vector that moves every coordinate by the same amount; the function tag's features are so
    sensitive (docs/training.md) that only steps along the gradient itself improve the read-out."""
    task_batches: bool = True
    """Every batch holds rows of one task (batches of different tasks interleave): each head then sees
    enough rows per batch to centre on, and bucketing by length works within a task."""
    select_metric: str = "val_loss"
    """Metric that picks the best checkpoint (lower is better). ``val_loss``: each group of tasks that
    share trainable parameters keeps the step where its own mean validation loss was lowest."""
    baselines: bool = False
    """Also fit the expert baselines (``tagray baseline``: fingerprint / descriptor / composition models
    with scikit-learn) on each head task's split after training; the artifact records them beside the
    tag's test metrics, so the stage summary, ``tagray tags`` and ``/v1/tags`` show them."""
    prefix: str = "auto"
    """``auto``: run each row's frozen prefix (everything before its first trainable tag) without grad and
    reuse its keys/values across steps and epochs (exact); ``off``: the full forward every step."""
    prefix_cache_gb: float = 4.0
    """RAM budget for cached prefix keys/values per worker (bytes per row: see the stage log)."""
    prefix_cache_dtype: str = "float32"
    """Storage dtype of cached keys/values: float32 (exact) or bfloat16 (half the memory, approximate)."""
    prefix_cache_spill: str | None = "auto"
    """Where rows over the RAM budget go: ``auto`` (a temporary folder), a folder, or null (recompute)."""
    prefix_cache_shared: str = "search"
    """Prefixes in a node-local folder that processes share (one file per row, memory-mapped by all):
    ``search`` (the trials of ``tagray tune`` share one per node, built once; a plain stage keeps its own
    store), ``auto`` (always; ``$TAGRAY_PREFIX_SHARED`` or ``/dev/shm/tagray-prefix``), ``off``, or a
    folder."""

    def __post_init__(self):
        for k in ("tag_length", "batch_size", "max_steps", "eval_every", "grad_accum", "eval_rows"):
            if getattr(self, k) < 1:
                raise ConfigError(k, "must be >= 1")
        if not self.lr > 0:
            raise ConfigError("lr", "must be > 0")
        if self.head_init not in ("ridge", "paper"):
            raise ConfigError("head_init", "use ridge or paper")
        if self.head_mode not in ("varpro", "refit", "batch", "track", "fixed"):
            raise ConfigError("head_mode", "use varpro, refit, batch, track or fixed")
        if self.refit_rows < 0:
            raise ConfigError("refit_rows", "must be >= 0 (0: all training rows)")
        if self.optimizer not in ("adamw", "ngd"):
            raise ConfigError("optimizer", "use adamw or ngd")
        if not 0 <= self.track_feature_mean <= 1:
            raise ConfigError("track_feature_mean", "must be in [0, 1]")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio", "must be in [0, 1)")
        if self.probe_rows < 0:
            raise ConfigError("probe_rows", "must be >= 0 (0: all training rows)")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError("epochs", "must be > 0 (or null to use max_steps)")
        if self.prefix not in ("auto", "off"):
            raise ConfigError("prefix", "use auto or off")
        if self.prefix_cache_dtype not in ("float32", "bfloat16"):
            raise ConfigError("prefix_cache_dtype", "use float32 or bfloat16")
        if not self.prefix_cache_gb >= 0:
            raise ConfigError("prefix_cache_gb", "must be >= 0")
        if isinstance(self.progress_s, bool) or not isinstance(self.progress_s, (int, float)):
            raise ConfigError("progress_s", "must be a number of seconds")
        if not self.prefix_cache_shared:
            raise ConfigError("prefix_cache_shared", "use search, auto, off or a folder")


@dataclass(frozen=True)
class ScalingConfig:
    """How many Ray Train workers, and their resources."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    strategy: str = "ddp"
    """``ddp`` (tags and heads are tiny; the frozen base is replicated) or ``fsdp`` for bases too big for one GPU."""
    placement_strategy: str = "PACK"
    max_failures: int = 2
    """Worker failures survived per stage (restart from the last checkpoint)."""
    ingest: str = "local"
    """``local``: every worker reads every row of its tasks (small data). ``ray_data``: the sources are read,
    split, validated and labelled as Ray Data transforms, and each worker gets only its shard of the
    training rows (``get_dataset_shard``): for sources larger than one worker's memory, or read once."""

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError("num_workers", "must be >= 1")
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError("strategy", "use ddp or fsdp")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError("placement_strategy", "use PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
        if self.ingest not in ("local", "ray_data"):
            raise ConfigError("ingest", f"use local or ray_data, got {self.ingest!r}")


@dataclass(frozen=True)
class StageConfig:
    name: str
    tasks: list
    """Task names, task YAML paths, or ``{task: name, ...overrides}``."""
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    train_tags: list | None = None
    """Tags to train; default: the tags these tasks use that earlier stages did not create."""
    untrained_tags: list = field(default_factory=list)
    """New tags kept at their initial value (ablations, e.g. a head reading an untrained function tag)."""
    init_from: str | None = "previous"
    """``previous`` (the stage before), a stage name, a tag-set path (local or s3://), or null."""
    eval_tasks: list = field(default_factory=list)
    """Evaluation-only tasks (e.g. zero-shot language pairs), scored on their test split at the end."""


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    stages: list[StageConfig]
    base: str = "smollm2-135m"
    """Packaged alias, local folder, ``s3://`` prefix or hub id."""
    output: str = "runs"
    """Where runs go: a local folder or ``s3://bucket/prefix``; stage artifacts land in ``output/name/stage``."""
    dtype: str = "auto"
    """Base weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."""
    registry: str | None = "auto"
    """Tag registry the last stage's artifact is published to as tag set ``name`` (what ``tagray serve``
    loads): ``auto`` = ``output/registry``, a folder or ``s3://`` prefix, or null to skip."""

    def registry_dir(self) -> str | None:
        if self.registry == "auto":
            return self.output.rstrip("/") + "/registry"
        return self.registry

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError("stage", f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def run_dir(self) -> str:
        return self.output.rstrip("/") + "/" + self.name


def _build(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ConfigError(where, f"expected a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(
            f"{where}.{sorted(unknown)[0]}" if where else sorted(unknown)[0],
            f"unknown key; allowed: {sorted(names)}",
        )
    hints = get_type_hints(cls)
    kw = {}
    for k, v in d.items():
        t = hints[k]
        key = f"{where}.{k}" if where else k
        args = [a for a in getattr(t, "__args__", ()) if a is not type(None)]
        if args and type(None) in getattr(t, "__args__", ()):
            if v is None:
                kw[k] = v
                continue
            t = args[0]  # Optional[X] -> X
        if t in (int, float) and not isinstance(v, bool) and isinstance(v, (int, float, str)):
            try:
                v = t(v) if t is float or isinstance(v, int) or str(v).lstrip("-").isdigit() else v
            except ValueError as e:
                raise ConfigError(key, f"expected {t.__name__}, got {v!r}") from e
            if t is int and not isinstance(v, int):
                raise ConfigError(key, f"expected an integer, got {v!r}")
        elif t is bool and not isinstance(v, bool):
            raise ConfigError(key, f"expected true/false, got {v!r}")
        elif t is str and not isinstance(v, str):
            raise ConfigError(key, f"expected a string, got {v!r}")
        kw[k] = v
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e.field}".lstrip(".") if where else e.field, e.message) from None
    except TypeError as e:
        raise ConfigError(where or cls.__name__, str(e)) from None


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_pipeline(d: dict) -> PipelineConfig:
    if not isinstance(d, dict):
        raise ConfigError("config", "expected a YAML mapping at the top level")
    d = copy.deepcopy(d)
    train_defaults = d.pop("train", {}) or {}
    scaling_defaults = d.pop("scaling", {}) or {}
    raw_stages = d.pop("stages", None)
    if not raw_stages or not isinstance(raw_stages, list):
        raise ConfigError("stages", "a non-empty list of stages is required")
    d.setdefault("name", "tagray")
    stages, seen = [], set()
    for i, s in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(s, dict) or "name" not in s or "tasks" not in s:
            raise ConfigError(where, "each stage needs a name and a list of tasks")
        if s["name"] in seen:
            raise ConfigError(f"{where}.name", f"duplicate stage name {s['name']!r}")
        seen.add(s["name"])
        if not isinstance(s["tasks"], list) or not s["tasks"]:
            raise ConfigError(f"{where}.tasks", "a non-empty list of tasks is required")
        s = dict(s)
        s["train"] = _build(TrainConfig, _merge(train_defaults, s.get("train")), f"{where}.train")
        s["scaling"] = _build(ScalingConfig, _merge(scaling_defaults, s.get("scaling")), f"{where}.scaling")
        if i == 0 and s.get("init_from", "previous") == "previous":
            s["init_from"] = None
        stages.append(_build(StageConfig, s, where))
    return _build(PipelineConfig, {**d, "stages": stages}, "")


def load_pipeline(path: str, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML (local or s3://) and apply ``key=value`` overrides (values parsed as YAML)."""
    return parse_pipeline(load_yaml(path, overrides))


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def stage_from_dict(d: dict) -> StageConfig:
    """Inverse of :func:`to_dict` for a stage (how the Ray adapter ships a stage to its workers)."""
    d = dict(d)
    d["train"] = _build(TrainConfig, d.get("train", {}), "train")
    d["scaling"] = _build(ScalingConfig, d.get("scaling", {}), "scaling")
    return _build(StageConfig, d, "stage")


def init_ref(cfg: PipelineConfig, stage: StageConfig) -> str | None:
    """``stage.init_from`` with ``previous`` replaced by the earlier stage's name."""
    if stage.init_from != "previous":
        return stage.init_from
    names = [s.name for s in cfg.stages]  # parse_pipeline turns the first stage's "previous" into None
    return names[names.index(stage.name) - 1]


def initial_tags(cfg: PipelineConfig, stage: StageConfig) -> str | None:
    """The tag set ``stage`` starts from: an earlier stage's artifact folder, a tag-set path, or None."""
    from .core.artifacts import is_tagset

    ref = init_ref(cfg, stage)
    if ref is None:
        return None
    if ref in [s.name for s in cfg.stages]:
        return abs_uri(cfg.run_dir()) + "/" + ref
    if not is_tagset(ref):
        raise ConfigError(
            f"stages.{stage.name}.init_from", f"{ref!r} is neither a stage name nor a tag-set folder"
        )
    return ref


# Train keys that cannot change an artifact, left out of its hash so that setting them (or a release adding
# one) does not re-run finished stages: a shared prefix store holds the same keys/values as a private one.
NOT_HASHED = ("prefix_cache_shared", "progress_s")  # how a stage runs or logs, not what it learns


def stage_hash(cfg: PipelineConfig, stage: StageConfig) -> str:
    """What a stage's artifact depends on: its config, the base, the dtype and its initial tags."""
    st = to_dict(stage)
    st["train"] = {k: v for k, v in st["train"].items() if k not in NOT_HASHED}
    if st["scaling"].get("ingest") == "local":  # the default since before the key existed: same hashes
        del st["scaling"]["ingest"]
    doc = {"stage": st, "base": cfg.base, "dtype": cfg.dtype, "init": initial_tags(cfg, stage)}
    return stable_hash(doc)
