"""A task's rows one block at a time: the same split, limits, validation and labels as
:func:`tagray.tasks.dataset.build_task_data`, without ever holding the whole source in one process.

Pure functions over lists of row dicts; :mod:`tagray.ray.ingest` maps them over Ray Data blocks.

- :func:`assign_rows` gives every row its split, its place in the split's fixed order (``_order``) and
  its dedup key, exactly as :func:`tagray.tasks.splits.assign` does for a whole file.
- A split with a limit keeps "the first ``limit`` valid rows in ``_order`` order". Each block offers its
  ``k`` first distinct rows (:func:`summarize`); the first ``k`` distinct rows of the whole split are
  among them, because every row before one of those in its block is also before it in the split.
  :func:`merge` keeps those ``k``, :func:`label_rows` validates and labels them, :func:`select` keeps the
  first ``limit`` valid ones. Too few valid among ``k`` while rows remain: the caller doubles ``k``.
  Memory: ``k`` rows per block, never the file.
- :func:`partial_stats` / :func:`combine_stats`: the training targets' count, mean, spread, range and
  input lengths, per block and combined exactly (Chan's parallel variance), for the regression head's
  standardisation when the training rows are sharded over workers.
"""

from __future__ import annotations

import heapq
import json
import math

from ..core.errors import ConfigError, InputError
from .spec import TaskSpec
from .splits import (
    FILE_COL,
    SPLIT_NAMES,
    SPLITS,
    dedup_key,
    hash_split,
    named_split,
    order_key,
    row_order,
    split_kind,
)


def check_columns(spec: TaskSpec, columns: list[str]) -> None:
    """The columns a task reads exist; errors name the config key (as for a whole file)."""
    cols = sorted(columns)
    for col in spec.filter:
        if col not in columns:
            raise ConfigError(f"task {spec.name}.filter.{col}", f"no such column; columns: {cols}")
    needed = set(spec.input_fields) | ({spec.target.field} - {None}) | set(spec.target.columns)
    needed |= {spec.target.column} - {None}
    needed -= set(spec.derive)
    missing = [c for c in sorted(needed) if c not in columns]
    if missing:
        raise ConfigError(
            f"task {spec.name}.columns", f"column {missing[0]!r} not in the data; columns: {cols}"
        )
    kind = split_kind(spec.split)
    col = spec.split.get(kind) if kind in ("key", "column", "scaffold") else None
    if col and col not in columns:
        raise ConfigError(
            f"task {spec.name}.split.{kind}", f"column {col!r} not in the data; columns: {cols}"
        )


def keep(spec: TaskSpec, row: dict) -> bool:
    """Whether a row passes the task's ``filter:`` (column -> allowed value or list of values)."""
    for col, allowed in spec.filter.items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        if row.get(col) not in allowed:
            return False
    return True


def assign_rows(spec: TaskSpec, rows: list[dict]) -> list[dict]:
    """Filtered rows of a block with ``_split`` (None when a split column names no split: its value is in
    ``_bad``), ``_order`` and ``_dedup``. Scaffold splits need every row at once and are refused."""
    kind = split_kind(spec.split)
    if kind == "scaffold":
        raise ConfigError(
            f"task {spec.name}.split.scaffold",
            "a scaffold split needs every row at once; use scaling.ingest: local for this task",
        )
    key_col, out = order_key(spec), []
    for r in rows:
        if not keep(spec, r):
            continue
        if kind == "key":
            d = dedup_key(spec, r)
            name = hash_split(spec, key_col, d, r)
        else:
            v = r.get(spec.split.get("column", FILE_COL))
            name = named_split(v)
            if name is None:
                out.append({"_split": None, "_bad": "<missing>" if v is None else repr(v)})
                continue
            r = {k: x for k, x in r.items() if k != FILE_COL}
            d = dedup_key(spec, r)
        out.append(
            {**r, "_split": name, "_order": row_order(key_col, d, r, spec.split.get("seed")), "_dedup": d}
        )
    return out


def _rank(r: dict) -> tuple:
    # equal dedup keys have equal orders; among such duplicates keep the same one in every block
    return r["_order"], json.dumps(r, sort_keys=True, default=str)


def distinct(rows) -> list[dict]:
    """One row per dedup key: the same one whichever blocks the duplicates came in (the least by order,
    then content)."""
    best: dict[str, dict] = {}
    for r in rows:
        prev = best.get(r["_dedup"])
        if prev is None or _rank(r) < _rank(prev):
            best[r["_dedup"]] = r
    return list(best.values())


def class_column(spec: TaskSpec) -> str | None:
    """The label column whose values make the classes (a classification task that names none)."""
    t = spec.target
    return t.column if t.kind == "classification" and not t.classes else None


def summarize(spec: TaskSpec, rows: list[dict], k: dict[str, int | None]) -> dict:
    """One block of assigned rows: rows per split (duplicates too), bad split values, class values, and each limited
    split's ``k[split]`` first distinct rows (``candidates``)."""
    n = dict.fromkeys(SPLITS, 0)
    bad: set[str] = set()
    classes: set[str] = set()
    limited: dict[str, list[dict]] = {s: [] for s in SPLITS}
    ccol = class_column(spec)
    for r in rows:
        s = r["_split"]
        if s is None:
            bad.add(r["_bad"])
            continue
        n[s] += 1
        if ccol and r.get(ccol) is not None:
            classes.add(str(r[ccol]))
        if k.get(s):
            limited[s].append(r)
    cand = {s: heapq.nsmallest(k[s], distinct(limited[s]), key=_rank) for s in SPLITS if k.get(s)}
    return {"n": n, "bad": sorted(bad)[:10], "classes": sorted(classes), "candidates": cand}


def merge(parts: list[dict], k: dict[str, int | None]) -> dict:
    """Blocks' summaries -> the same for the whole source, plus ``complete[split]``: the candidates are
    every distinct row of the split (no block had ``k`` of them, nor all blocks together)."""
    out = {"n": dict.fromkeys(SPLITS, 0), "bad": set(), "classes": set(), "candidates": {}, "complete": {}}
    for p in parts:
        for s in SPLITS:
            out["n"][s] += p["n"][s]
        out["bad"] |= set(p["bad"])
        out["classes"] |= set(p["classes"])
    for s in SPLITS:
        if not k.get(s):
            continue
        best = distinct(r for p in parts for r in p["candidates"].get(s, []))
        out["candidates"][s] = heapq.nsmallest(k[s], best, key=_rank)
        blocks_whole = all(len(p["candidates"].get(s, [])) < k[s] for p in parts)
        out["complete"][s] = blocks_whole and len(best) <= k[s]
    out["bad"], out["classes"] = sorted(out["bad"])[:10], sorted(out["classes"])
    return out


def label_rows(spec: TaskSpec, rows: list[dict]) -> list[dict]:
    """Validate and label rows (:func:`~tagray.tasks.dataset.prepare_row`): ``{"_order", "_ok", "_row"}``
    each, ``_row`` the prepared row as JSON (``""`` when invalid)."""
    from .dataset import prepare_row

    out = []
    for r in rows:
        clean = {k: v for k, v in r.items() if k not in ("_split", "_order", "_dedup")}
        try:
            out.append({"_order": r["_order"], "_ok": True, "_row": json.dumps(prepare_row(spec, clean))})
        except InputError:
            out.append({"_order": r["_order"], "_ok": False, "_row": ""})
    return out


def select(labelled: list[dict], limit: int) -> tuple[list[dict], int, bool]:
    """The first ``limit`` valid rows in ``_order`` order, the invalid rows passed on the way, and whether
    the limit was reached (the same rows and count as the whole-file path)."""
    kept, dropped = [], 0
    for r in sorted(labelled, key=lambda r: r["_order"]):
        if len(kept) >= limit:
            break
        if r["_ok"]:
            kept.append(r)
        else:
            dropped += 1
    return kept, dropped, len(kept) >= limit


def partial_stats(spec: TaskSpec, rows: list[dict]) -> dict:
    """Count, mean and sum of squared deviations per target column, range, and input lengths of prepared
    training rows (one block)."""
    ys = [r["_target"] for r in rows if r.get("_target") is not None]
    chars = [spec.input_chars(r) for r in rows]
    out: dict = {"n": len(ys), "chars": [min(chars), max(chars)] if chars else None}
    if ys:
        cols = list(zip(*ys, strict=True))
        out["mean"] = [sum(c) / len(c) for c in cols]
        out["m2"] = [sum((v - m) ** 2 for v in c) for c, m in zip(cols, out["mean"], strict=True)]
        out["min"], out["max"] = [min(c) for c in cols], [max(c) for c in cols]
    return out


def combine_stats(parts: list[dict]) -> dict:
    """Blocks' :func:`partial_stats` -> the whole split's, with ``std`` (unbiased, as ``torch.std``)."""
    parts = [p for p in parts if p["n"]]
    chars = [p["chars"] for p in parts if p.get("chars")]
    if not parts:
        return {"n": 0, "chars": None}
    n, mean, m2 = parts[0]["n"], list(parts[0]["mean"]), list(parts[0]["m2"])
    lo, hi = list(parts[0]["min"]), list(parts[0]["max"])
    for p in parts[1:]:
        tot = n + p["n"]
        for j in range(len(mean)):
            delta = p["mean"][j] - mean[j]
            m2[j] += p["m2"][j] + delta * delta * n * p["n"] / tot
            mean[j] += delta * p["n"] / tot
            lo[j], hi[j] = min(lo[j], p["min"][j]), max(hi[j], p["max"][j])
        n = tot
    std = [math.sqrt(v / (n - 1)) if n > 1 else 1.0 for v in m2]
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "min": lo,
        "max": hi,
        "chars": [min(c[0] for c in chars), max(c[1] for c in chars)] if chars else None,
    }


def check_summary(spec: TaskSpec, m: dict) -> TaskSpec:
    """The whole-file path's errors, from a merged summary; returns the spec with the classes found."""
    if m["bad"]:
        col = spec.split.get("column", FILE_COL)
        raise ConfigError(
            f"task {spec.name}.split.column",
            f"column {col!r} has values that name no split: {m['bad']}; use one of {sorted(SPLIT_NAMES)}",
        )
    if not sum(m["n"].values()):
        if spec.filter:
            raise ConfigError(
                f"task {spec.name}.filter.{next(iter(spec.filter))}", "no row passes the filter"
            )
        raise ConfigError(f"task {spec.name}.source", "no rows")
    from .dataset import with_classes

    return with_classes(spec, m["classes"]) if class_column(spec) else spec


def count_labelled(spec: TaskSpec, rows: list[dict], train: bool) -> dict:
    """Valid and invalid rows among :func:`label_rows` output, and (training rows) their statistics."""
    ok = [json.loads(r["_row"]) for r in rows if r["_ok"]]
    return {"ok": len(ok), "bad": len(rows) - len(ok), "stats": partial_stats(spec, ok) if train else None}
