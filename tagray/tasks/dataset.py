"""Rows of a task: load the source, compute derived labels, validate fields, split deterministically.

The split itself lives in :mod:`tagray.tasks.splits`. The default hashes each row's split key (e.g. the
SMILES, or the English message id shared by every language), so splits never depend on row order,
process or machine, and a test sentence stays in the test split in every task that uses it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from ..core.errors import ConfigError, InputError
from ..core.progress import Progress
from ..core.template import template_tags
from .labels import compute
from .spec import TaskSpec
from .splits import SPLITS, assign, check_nonempty, load_rows
from .stream import check_columns
from .validators import validate

log = logging.getLogger("tagray")


@dataclass
class TaskData:
    spec: TaskSpec
    splits: dict[str, list[dict]]  # split -> rows (validated fields + "_target")
    dropped: int  # rows dropped for invalid fields or labels (or, in a scaffold split, unparsable SMILES)
    split_info: dict = field(default_factory=dict)  # kind of split; scaffold counts; inputs also in train
    # set when the training rows are this worker's shard only (Ray Data ingest): {"rank", "world",
    # "rows": {split: rows in the whole split}, "stats": the whole training split's target statistics}
    shard: dict | None = None

    def tags(self) -> list[str]:
        """Every tag name the rows use (dynamic tags resolved), in first-seen order."""
        seen: dict[str, None] = {}
        for rows in self.splits.values():
            for r in rows:
                for t in template_tags(self.spec.template, r):
                    seen.setdefault(t, None)
        return list(seen)


def row_target(spec: TaskSpec, row: dict) -> list[float] | None:
    """The numeric target of a row: regression values, or the class index for classification."""
    t = spec.target
    if t.kind == "regression":
        vals = []
        for c in t.columns:
            if c not in row:
                raise InputError(c, "missing target column")
            try:
                v = float(row[c])
            except (TypeError, ValueError) as e:
                raise InputError(c, f"not a number: {row[c]!r}") from e
            if v != v:
                raise InputError(c, "missing value (NaN)")
            vals.append(v)
        return vals
    if t.kind == "classification":
        if t.column not in row:
            raise InputError(t.column, "missing label column")
        label = str(row[t.column])
        if label not in t.classes:
            raise InputError(t.column, f"unknown class {label!r}; classes: {list(t.classes)}")
        return [float(t.classes.index(label))]
    return None


def prepare_row(spec: TaskSpec, row: dict, with_target: bool = True) -> dict:
    """Derive, validate and return a clean row; raises :class:`InputError` naming the bad field."""
    out = dict(row)
    for f, s in spec.fields.items():  # inputs first: a bad SMILES is reported as such, not as a bad label
        if f == spec.target.field and not with_target:
            continue
        if f not in out or out[f] is None:
            raise InputError(f, "missing")
        out[f] = validate(f, s.get("type", "text"), out[f])
    for col, d in spec.derive.items():
        if not with_target and col not in spec.input_fields:
            continue  # derived labels are not needed to predict
        args = [out.get(a) for a in d.get("args", [])]
        if any(a is None for a in args):
            missing = [a for a in d.get("args", []) if out.get(a) is None][0]
            raise InputError(missing, "missing (needed to compute " + col + ")")
        if col not in out or out[col] is None:
            v = compute(d["fn"], *args)
            if v is None:
                raise InputError(d.get("args", [col])[0], f"cannot compute {col} ({d['fn']})")
            out[col] = v
    if with_target and spec.target.kind != "lm":
        out["_target"] = row_target(spec, out)
    return out


def _classes(spec: TaskSpec, rows: list[dict]) -> TaskSpec:
    if spec.target.kind != "classification" or spec.target.classes:
        return spec
    col = spec.target.column
    if not rows or col not in rows[0]:
        raise ConfigError(f"task {spec.name}.target.column", f"column {col!r} not in the data")
    return with_classes(spec, {str(r[col]) for r in rows if r.get(col) is not None})


def with_classes(spec: TaskSpec, values) -> TaskSpec:
    """A classification task whose config names no classes, with the label values found in its data."""
    if spec.target.kind != "classification" or spec.target.classes:
        return spec
    classes = tuple(sorted(values))
    from dataclasses import replace

    raw = dict(spec.raw)
    raw["target"] = {**raw["target"], "classes": list(classes)}
    return replace(spec, target=replace(spec.target, classes=classes), raw=raw)


_CACHE: dict[str, TaskData] = {}


def build_task_data(spec: TaskSpec, progress_s: float | None = None) -> TaskData:
    """Rows of every split (cached per process by the task's content); a progress line every
    ``progress_s`` seconds while rows are validated and labelled (None: silent)."""
    key = json.dumps(spec.raw, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = _build(spec, progress_s)
    return _CACHE[key]


def _build(spec: TaskSpec, progress_s: float | None = None) -> TaskData:
    rows = load_rows(spec)
    if not rows:
        raise ConfigError(f"task {spec.name}.source", "no rows")
    check_columns(spec, list(rows[0]))
    for col, allowed in spec.filter.items():
        allowed = set(allowed if isinstance(allowed, list) else [allowed])
        rows = [r for r in rows if r.get(col) in allowed]
        if not rows:
            raise ConfigError(f"task {spec.name}.filter.{col}", f"no row has a value in {sorted(allowed)}")
    spec = _classes(spec, rows)
    # assign splits and a fixed order from the raw rows alone, then validate and label rows in that order
    # only until each split's limit is reached (labels such as QED are the expensive part)
    assigned = assign(spec, rows)
    out, dropped = {}, assigned.dropped
    for s in SPLITS:
        limit = spec.limits.get(s)
        kept = []
        total = min(limit, len(assigned.splits[s])) if limit else len(assigned.splits[s])
        p = Progress(f"task {spec.name}: labelling {s} rows", total, progress_s, "rows")
        for r in assigned.splits[s]:
            if limit and len(kept) >= limit:
                break
            try:
                kept.append(prepare_row(spec, r))
            except InputError:
                dropped += 1
            p.update()
        p.close()
        out[s] = kept
    if dropped:
        log.info("task %s: dropped %d rows with invalid fields or labels", spec.name, dropped)
    check_nonempty(spec, out)
    return TaskData(spec, out, dropped, assigned.info)


def tag_kinds(spec: TaskSpec, tags: list[str]) -> dict[str, str]:
    """``domain`` for every tag except the task's function tag."""
    return {t: ("function" if t == spec.function_tag else "domain") for t in tags}
