"""Task specifications: a task is data (YAML), never an ``if task ==`` branch.

A task says where rows come from, which columns to compute, how to check each field, the template that
places domain and function tags, and what the target is::

    name: qed
    source: {name: rdkit_nci}                 # builtin source, or {path: s3://bucket/x.csv}
    derive: {qed: {fn: rdkit.qed, args: [smiles]}}
    fields: {smiles: {type: smiles}}          # smiles | protein | text; tokenize: chars
    template: "The SMILES of the molecule is <SMILES> {smiles}. The QED is <QED>"
    function_tag: <QED>
    target: {kind: regression, columns: [qed]}   # or classification {column, classes, positive} or lm {field}
    metrics: [mse, mae, pearson, spearman]       # classification: accuracy, roc_auc, f1
    split: {key: smiles, valid: 0.1, test: 0.1}  # or {column: c}, {files: {...}}, {scaffold: smiles} (splits.py)
    limits: {train: 2000, valid: 200, test: 500}

Builtin tasks live in ``tagray/tasks/builtin/*.yaml``; users pass a path to their own YAML.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..core.errors import ConfigError
from ..core.template import parse_template, template_fields
from .splits import parse_split, split_kind

BUILTIN_DIR = Path(__file__).parent / "builtin"
TARGET_KINDS = ("regression", "classification", "lm")
METRICS = {
    "regression": ("mse", "mae", "pearson", "spearman"),
    "classification": ("accuracy", "roc_auc", "f1"),
    "lm": ("loss", "perplexity", "bleu"),
}
KEYS = {
    "name",
    "description",
    "source",
    "derive",
    "fields",
    "template",
    "function_tag",
    "target",
    "metrics",
    "split",
    "limits",
    "max_length",
    "generate",
    "filter",
}


@dataclass(frozen=True)
class Target:
    kind: str
    columns: tuple[str, ...] = ()  # regression: one or more numeric columns
    column: str | None = None  # classification label column
    classes: tuple[str, ...] = ()
    field: str | None = None  # lm: field whose tokens are predicted
    eos: bool = False
    positive: str | None = None  # classification: the class F1 / ROC-AUC score (binary); None: classes[1]
    range: tuple[float, float] | None = None  # regression: declared value range; predictions are clipped

    @property
    def positive_index(self) -> int:
        """Index of the positive class of a binary task (``classes[1]`` unless ``positive`` names one)."""
        return self.classes.index(self.positive) if self.positive in self.classes else 1


@dataclass(frozen=True)
class TaskSpec:
    name: str
    template: str
    source: dict
    target: Target
    fields: dict = field(default_factory=dict)
    derive: dict = field(default_factory=dict)
    function_tag: str | None = None
    metrics: tuple[str, ...] = ()
    split: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    max_length: int = 256
    generate: dict = field(default_factory=dict)
    filter: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def head_tag(self) -> str | None:
        return self.function_tag if self.target.kind != "lm" else None

    @property
    def char_fields(self) -> set[str]:
        return {f for f, s in self.fields.items() if s.get("tokenize") == "chars"}

    @property
    def input_fields(self) -> list[str]:
        """Fields a user must give to predict (the template's fields minus the LM target)."""
        return [f for f in sorted(template_fields(self.template)) if f != self.target.field]

    def input_chars(self, row: dict) -> int:
        """Characters of a row's input fields (the input-side out-of-distribution check of answers)."""
        return sum(len(str(row.get(f, ""))) for f in self.input_fields)

    def to_json(self) -> dict:
        return copy.deepcopy(self.raw)


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise ConfigError(f"{where}.{key}", "required")
    return d[key]


def parse_task(d: dict, where: str = "task") -> TaskSpec:
    """Validate a task dict (from YAML) and build a :class:`TaskSpec`; errors name the bad key."""
    if not isinstance(d, dict):
        raise ConfigError(where, f"expected a mapping, got {type(d).__name__}")
    unknown = set(d) - KEYS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", f"unknown key; allowed: {sorted(KEYS)}")
    name = _need(d, "name", where)
    where = f"task {name}"
    template = _need(d, "template", where)
    if not isinstance(template, str) or not any(p.kind == "tag" for p in parse_template(template)):
        raise ConfigError(f"{where}.template", "must be a string with at least one <Tag>")
    t = _need(d, "target", where)
    kind = t.get("kind")
    if kind not in TARGET_KINDS:
        raise ConfigError(f"{where}.target.kind", f"got {kind!r}; use one of {TARGET_KINDS}")
    cols = t.get("columns") or ([t["column"]] if kind == "regression" and "column" in t else [])
    classes = tuple(str(c) for c in t.get("classes", ()))
    target = Target(
        kind,
        tuple(cols),
        t.get("column"),
        classes,
        t.get("field"),
        bool(t.get("eos", False)),
        _positive(t, classes, where) if kind == "classification" else None,
        _range(t, kind, where),
    )
    fields_in_template = template_fields(template)
    if kind == "regression" and not target.columns:
        raise ConfigError(f"{where}.target.columns", "regression needs at least one target column")
    if kind == "classification" and not target.column:
        raise ConfigError(f"{where}.target.column", "classification needs a label column")
    if kind == "lm" and target.field not in fields_in_template:
        raise ConfigError(
            f"{where}.target.field", f"must be one of the template's fields {sorted(fields_in_template)}"
        )
    ftag = d.get("function_tag")
    tags = [p.value for p in parse_template(template) if p.kind == "tag" and not p.dynamic]
    if kind != "lm" and ftag is None:
        raise ConfigError(
            f"{where}.function_tag", "regression/classification tasks need a function tag for the head"
        )
    if ftag is not None and ftag not in tags:
        raise ConfigError(f"{where}.function_tag", f"{ftag} does not occur in the template")
    metrics = tuple(d.get("metrics") or METRICS[kind][: 4 if kind != "lm" else 1])
    bad = [m for m in metrics if m not in METRICS[kind]]
    if bad:
        raise ConfigError(f"{where}.metrics", f"{bad} not available for {kind}; use {METRICS[kind]}")
    fields = d.get("fields") or {}
    for f, s in fields.items():
        if not isinstance(s, dict):
            raise ConfigError(f"{where}.fields.{f}", "expected a mapping like {type: smiles}")
    split = parse_split(d.get("split"), f"{where}.split")
    source = _source(d, split, where)
    ml = d.get("max_length", 256)
    if not isinstance(ml, int) or ml < 8:
        raise ConfigError(f"{where}.max_length", "must be an integer >= 8")
    return TaskSpec(
        name=name,
        template=template,
        source=source,
        target=target,
        fields=fields,
        derive=d.get("derive") or {},
        function_tag=ftag,
        metrics=metrics,
        split=split,
        limits=d.get("limits") or {},
        max_length=ml,
        generate=d.get("generate") or {},
        filter=d.get("filter") or {},
        raw=copy.deepcopy(d),
    )


def _source(d: dict, split: dict, where: str) -> dict:
    """The task's source; optional (and then empty) when ``split.files`` names the data instead."""
    if split_kind(split) == "files":
        if d.get("source"):
            raise ConfigError(f"{where}.source", "give either source or split.files, not both")
        return {}
    source = _need(d, "source", where)
    if not isinstance(source, dict) or not ({"name", "path"} & set(source)):
        raise ConfigError(f"{where}.source", "give {name: <builtin source>} or {path: <csv/jsonl/parquet>}")
    return source


def _positive(t: dict, classes: tuple[str, ...], where: str) -> str | None:
    """The positive class of a binary task (F1 and ROC-AUC score it); default: the second class."""
    pos = t.get("positive")
    if pos is None:
        return None
    if classes and str(pos) not in classes:
        raise ConfigError(f"{where}.target.positive", f"{pos!r} is not one of the classes {list(classes)}")
    return str(pos)


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_task(ref, overrides: dict | None = None) -> TaskSpec:
    """A builtin task name, a path to a task YAML (local or s3://), or an inline dict, plus overrides."""
    if isinstance(ref, dict):
        d = copy.deepcopy(ref)
        if "task" in d:  # {task: qed, limits: {...}} = builtin + overrides
            base = load_task(d.pop("task")).to_json()
            base.update(d)
            d = base
    elif isinstance(ref, str) and (ref.endswith((".yaml", ".yml"))):
        import fsspec

        if not ref.startswith("s3://") and not os.path.exists(ref):
            raise ConfigError("task", f"task file {ref} does not exist")
        with fsspec.open(ref, "r") as f:
            try:
                d = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError("task", f"{ref} is not valid YAML: {e}") from e
    elif isinstance(ref, str) and (BUILTIN_DIR / f"{ref}.yaml").exists():
        d = yaml.safe_load((BUILTIN_DIR / f"{ref}.yaml").read_text())
    else:
        raise ConfigError(
            "task", f"unknown task {ref!r}; builtin: {builtin_tasks()}, or a path to a task YAML"
        )
    if overrides:
        d = {**d, **overrides}
    return parse_task(d)


def _range(t: dict, kind: str, where: str) -> tuple[float, float] | None:
    """``target.range: [lo, hi]`` of a regression task (e.g. QED ``[0, 1]``)."""
    r = t.get("range")
    if r is None:
        return None
    ok = kind == "regression" and isinstance(r, (list, tuple)) and len(r) == 2
    if ok:
        try:
            lo, hi = float(r[0]), float(r[1])
        except (TypeError, ValueError):
            ok = False
    if not ok or not lo < hi:
        raise ConfigError(
            f"{where}.target.range", f"expected [low, high] with low < high on a regression task, got {r!r}"
        )
    return lo, hi
