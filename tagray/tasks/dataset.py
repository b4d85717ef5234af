"""Rows of a task: load the source, compute derived labels, validate fields, split deterministically.

Splits are fixed by hashing each row's split key (e.g. the SMILES, or the English message id shared by
every language), so they never depend on row order, process or machine, and a test sentence stays in
the test split in every task that uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from ..core.errors import ConfigError, InputError
from ..core.template import template_tags
from .labels import compute
from .sources import load_source
from .spec import TaskSpec
from .validators import validate

log = logging.getLogger("tagray")
SPLITS = ("train", "valid", "test")


def _u(key: str, salt: str = "tagray-split-v1") -> float:
    h = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


@dataclass
class TaskData:
    spec: TaskSpec
    splits: dict[str, list[dict]]  # split -> rows (validated fields + "_target")
    dropped: int  # rows dropped for invalid fields or labels

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
    classes = tuple(sorted({str(r[col]) for r in rows if r.get(col) is not None}))
    from dataclasses import replace

    raw = dict(spec.raw)
    raw["target"] = {**raw["target"], "classes": list(classes)}
    return replace(spec, target=replace(spec.target, classes=classes), raw=raw)


_CACHE: dict[str, TaskData] = {}


def build_task_data(spec: TaskSpec) -> TaskData:
    """Rows of every split (cached per process by the task's content)."""
    key = json.dumps(spec.raw, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = _build(spec)
    return _CACHE[key]


def _build(spec: TaskSpec) -> TaskData:
    rows = load_source(spec.source)
    if not rows:
        raise ConfigError(f"task {spec.name}.source", "no rows")
    for col, allowed in spec.filter.items():
        if col not in rows[0]:
            raise ConfigError(f"task {spec.name}.filter.{col}", f"no such column; columns: {sorted(rows[0])}")
        allowed = set(allowed if isinstance(allowed, list) else [allowed])
        rows = [r for r in rows if r.get(col) in allowed]
    needed = set(spec.input_fields) | ({spec.target.field} - {None}) | set(spec.target.columns)
    needed |= {spec.target.column} - {None}
    needed -= set(spec.derive)
    missing = [c for c in sorted(needed) if c not in rows[0]]
    if missing:
        raise ConfigError(
            f"task {spec.name}.columns", f"column {missing[0]!r} not in the data; columns: {sorted(rows[0])}"
        )
    spec = _classes(spec, rows)
    key_col = spec.split.get("key") or (spec.input_fields[0] if spec.input_fields else None)
    # assign splits and a fixed order from the raw key alone, then validate and label rows in that order
    # only until each split's limit is reached (labels such as QED are the expensive part)
    splits: dict[str, list[tuple[float, dict]]] = {s: [] for s in SPLITS}
    seen = set()
    for r in rows:
        dedup = json.dumps({f: r.get(f) for f in spec.input_fields + [spec.target.field or ""]}, default=str)
        if dedup in seen:
            continue
        seen.add(dedup)
        k = str(r.get(key_col)) if key_col else dedup
        u = _u(k)
        name = (
            "test"
            if u < spec.split["test"]
            else "valid"
            if u < spec.split["test"] + spec.split["valid"]
            else "train"
        )
        splits[name].append((_u(k, "tagray-order-v1") + _u(dedup, "row") * 1e-9, r))
    out, dropped = {}, 0
    for s in SPLITS:
        limit = spec.limits.get(s)
        kept = []
        for _, r in sorted(splits[s], key=lambda x: x[0]):
            if limit and len(kept) >= limit:
                break
            try:
                kept.append(prepare_row(spec, r))
            except InputError:
                dropped += 1
        out[s] = kept
    if dropped:
        log.info("task %s: dropped %d rows with invalid fields or labels", spec.name, dropped)
    if not out["train"]:
        raise ConfigError(f"task {spec.name}", "no training rows after validation")
    return TaskData(spec, out, dropped)


def tag_kinds(spec: TaskSpec, tags: list[str]) -> dict[str, str]:
    """``domain`` for every tag except the task's function tag."""
    return {t: ("function" if t == spec.function_tag else "domain") for t in tags}
