"""Ray Data ingest (``scaling.ingest: ray_data``): sources as Ray Datasets, each worker its own shard.

Each task's source (a builtin, or CSV / JSONL / Parquet, local or ``s3://``) is read in blocks. The split,
the limits, validation and labelling are Ray Data transforms over the pure functions of
:mod:`tagray.tasks.stream`, so they keep exactly the rows the whole-file path keeps. The training split
reaches the Train workers through ``datasets=`` / ``get_dataset_shard`` (``DataConfig`` splits it into
equal, disjoint shards); valid and test reach every worker whole. With the shards come the statistics that
need every training row: row counts and the regression targets' mean, spread and range.

Memory: no process holds the source. A limited split costs the driver ``k`` candidate rows per block
(about the limit); an unlimited one is deduplicated by a hash shuffle and stays in the object store.
"""

from __future__ import annotations

import json
import logging
import os

import psutil
import pyarrow as pa
import ray
import ray.data
import ray.train

from ..core.errors import ConfigError
from ..tasks.dataset import TaskData, with_classes
from ..tasks.sources import file_format, load_source
from ..tasks.spec import TaskSpec, load_task
from ..tasks.splits import FILE_COL, SPLITS, check_nonempty, split_kind
from ..tasks.stream import (
    assign_rows,
    check_columns,
    check_summary,
    combine_stats,
    count_labelled,
    distinct,
    label_rows,
    merge,
    partial_stats,
    select,
    summarize,
)

log = logging.getLogger("tagray")
BLOCK_BYTES = 8 << 20  # small blocks: a read or map task holds a few MB of the source, never all of it
ROWS_PER_SHUFFLED_BLOCK = 50_000


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _read(path: str, fmt: str | None, where: str) -> ray.data.Dataset:
    fmt = file_format(path, fmt)
    fs, p = None, path
    if path.startswith("s3://"):
        # tagray's own S3 access (s3fs: the same credentials and endpoint as tags, tasks and storage)
        import s3fs
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, p = PyFileSystem(FSSpecHandler(s3fs.S3FileSystem())), path[len("s3://") :]
    elif "://" not in path and not os.path.exists(path):
        raise ConfigError(f"{where}.path", f"{path} does not exist")
    if fmt == "csv":
        kw = {}
        if path.endswith(".tsv"):
            from pyarrow import csv

            kw["parse_options"] = csv.ParseOptions(delimiter="\t")
        return ray.data.read_csv(p, filesystem=fs, **kw)
    return (ray.data.read_json if fmt == "json" else ray.data.read_parquet)(p, filesystem=fs)


def read_source(spec: TaskSpec) -> ray.data.Dataset:
    """The task's raw rows as a Dataset (``split.files``: every file, each row naming its split)."""
    if split_kind(spec.split) == "files":
        parts = []
        for name, ref in spec.split["files"].items():
            path, fmt = (ref["path"], ref.get("format")) if isinstance(ref, dict) else (ref, None)
            ds = _read(path, fmt, f"task {spec.name}.split.files.{name}")
            parts.append(ds.map_batches(lambda t, n=name: t.append_column(FILE_COL, pa.array([n] * len(t)))))
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if "path" in spec.source:
        return _read(spec.source["path"], spec.source.get("format"), f"task {spec.name}.source")
    return ray.data.from_items(load_source(spec.source))  # builtin: rows that ship in a package


def _table(rows: list[dict], col: str) -> pa.Table:
    return pa.table({col: [json.dumps(r, default=str) for r in rows]})


def _summaries(src: ray.data.Dataset, spec: TaskSpec, k: dict) -> list[dict]:
    def fn(t: pa.Table) -> pa.Table:
        s = summarize(spec, assign_rows(spec, t.to_pylist()), k)
        return _table([{**s, "rss_mb": _rss_mb()}], "summary")

    return [json.loads(r["summary"]) for r in src.map_batches(fn, batch_format="pyarrow").take_all()]


def _labelled(spec: TaskSpec, rows: list[dict]) -> list[dict]:
    """Candidates validated and labelled as a Ray Data transform (labels such as QED cost the most)."""
    if not rows:
        return []
    ds = ray.data.from_items([{"r": json.dumps(r, default=str)} for r in rows])
    out = ds.map_batches(
        lambda t: _table(label_rows(spec, [json.loads(x) for x in t.column("r").to_pylist()]), "l"),
        batch_format="pyarrow",
    )
    return [json.loads(r["l"]) for r in out.take_all()]


def _unlimited(src: ray.data.Dataset, spec: TaskSpec, split: str, n: int) -> ray.data.Dataset:
    """Every valid row of ``split``: deduplicated by a hash shuffle on the dedup key, labelled, in the
    object store; columns ``_order``, ``_ok``, ``_row``."""

    def mine(t: pa.Table) -> pa.Table:
        rows = [r for r in assign_rows(spec, t.to_pylist()) if r["_split"] == split]
        return pa.table(
            {"_dedup": [r["_dedup"] for r in rows], "r": [json.dumps(r, default=str) for r in rows]}
        )

    def first(t: pa.Table) -> pa.Table:  # duplicates share a block now: keep the one every path keeps
        rows = label_rows(spec, distinct(json.loads(x) for x in t.column("r").to_pylist()))
        return pa.table({c: [r[c] for r in rows] for c in ("_order", "_ok", "_row")})

    ds = src.map_batches(mine, batch_format="pyarrow")
    ds = ds.repartition(max(1, n // ROWS_PER_SHUFFLED_BLOCK), keys=["_dedup"])
    return ds.map_batches(first, batch_format="pyarrow").materialize()


def _limited(src: ray.data.Dataset, spec: TaskSpec):
    """Summary passes over the source: every split's counts, and each limited split's first ``limit``
    valid rows (widening the candidates while too few are valid). Returns the spec (classes found), the
    limited splits' rows, the first pass's summary, rows dropped as invalid, and the peak data-task RSS."""
    limits = {s: spec.limits.get(s) for s in SPLITS}
    k = {s: lim + lim // 4 + 16 if lim else None for s, lim in limits.items()}
    out: dict[str, list[dict]] = {}
    dropped, rss, first = 0, 0.0, None
    while any(k.values()) or first is None:
        parts = _summaries(src, spec, k)
        m = merge(parts, k)
        rss = max([rss] + [p["rss_mb"] for p in parts])
        if first is None:
            first, spec = {**m, "blocks": len(parts)}, check_summary(spec, m)
        for s in [s for s in SPLITS if k.get(s)]:
            kept, drop, reached = select(_labelled(spec, m["candidates"][s]), limits[s])
            if reached or m["complete"][s]:
                out[s], k[s] = kept, None
                dropped += drop
            else:  # too many invalid or duplicate rows among the candidates: look further
                k[s] *= 2
    return spec, out, first, dropped, rss


def ingest_task(spec: TaskSpec) -> tuple[TaskSpec, dict[str, ray.data.Dataset], dict]:
    """One task's splits as Datasets of ``{"_order", "_row"}`` (the prepared row as JSON) and what the
    workers need besides their shard: counts, dropped rows, the training targets' statistics."""
    if split_kind(spec.split) == "scaffold":
        assign_rows(spec, [])  # raises: scaffold splits need every row at once
    ray.data.DataContext.get_current().target_max_block_size = BLOCK_BYTES
    src = read_source(spec)
    try:
        cols = [c for c in (src.columns() or []) if c != FILE_COL]
    except Exception as e:  # noqa: BLE001 - Ray Data raises many types for unreadable files
        raise ConfigError(f"task {spec.name}.source", f"cannot read: {type(e).__name__}: {e}") from e
    if not cols:
        raise ConfigError(f"task {spec.name}.source", "no rows")
    check_columns(spec, cols)
    spec, out, first, dropped, rss = _limited(src, spec)
    meta: dict = {
        "rows": {},
        "stats": None,
        "blocks": first["blocks"],
        "peak_rss_mb": {"data_tasks": round(rss, 1)},
    }
    datasets: dict[str, ray.data.Dataset] = {}
    stats = []
    for s in SPLITS:
        if s in out:
            rows = out[s]
            meta["rows"][s] = len(rows)
            if s == "train":
                stats = [partial_stats(spec, [json.loads(r["_row"]) for r in rows])]
            if rows:
                datasets[s] = ray.data.from_items([{"_order": r["_order"], "_row": r["_row"]} for r in rows])
            continue
        ds = _unlimited(src, spec, s, first["n"][s])
        counts = ds.map_batches(
            lambda t, s=s: _table([count_labelled(spec, t.to_pylist(), s == "train")], "c"),
            batch_format="pyarrow",
        )
        parts = [json.loads(r["c"]) for r in counts.take_all()]
        meta["rows"][s] = sum(p["ok"] for p in parts)
        dropped += sum(p["bad"] for p in parts)
        stats += [p["stats"] for p in parts if p["stats"]]
        if meta["rows"][s]:
            datasets[s] = ds.map_batches(
                lambda t: t.filter(t["_ok"]).select(["_order", "_row"]), batch_format="pyarrow"
            ).materialize()  # before training: the workers' CPUs are then theirs, not Ray Data's
    check_nonempty(spec, {s: range(meta["rows"][s]) for s in SPLITS})
    if spec.target.kind == "regression":
        meta["stats"] = combine_stats(stats)
    meta.update(
        dropped=dropped, classes=list(spec.target.classes) or None, info={"kind": split_kind(spec.split)}
    )
    log.info("task %s: ingested with Ray Data, rows %s, dropped %d", spec.name, meta["rows"], dropped)
    return spec, datasets, meta


def ingest_stage(tasks: list, world: int) -> tuple[dict[str, ray.data.Dataset], list[str], list[dict]]:
    """Every task of a stage for ``world`` workers: ``{"<task index>.<split>": Dataset}``, the names to
    shard (the training splits), and per task what :func:`shard_task_data` needs on the workers."""
    datasets, to_split, metas = {}, [], []
    for i, t in enumerate(tasks):
        spec, ds, meta = ingest_task(load_task(t) if not isinstance(t, TaskSpec) else t)
        if meta["rows"]["train"] < world:
            raise ConfigError(
                "scaling.num_workers",
                f"{world} workers, but task {spec.name} has {meta['rows']['train']} training rows",
            )
        datasets.update({f"{i}.{s}": d for s, d in ds.items()})
        to_split.append(f"{i}.train")
        metas.append(meta)
    return datasets, to_split, metas


def shard_task_data(tasks: list, metas: list[dict], rank: int, world: int) -> list[TaskData]:
    """On a Train worker: its shard of every task's training rows, and every valid / test row."""
    out = []
    for i, (t, meta) in enumerate(zip(tasks, metas, strict=True)):
        spec = with_classes(load_task(t) if not isinstance(t, TaskSpec) else t, meta["classes"] or ())
        splits = {}
        for s in SPLITS:
            it = ray.train.get_dataset_shard(f"{i}.{s}") if meta["rows"][s] else None
            rows = sorted((r["_order"], r["_row"]) for r in it.iter_rows()) if it is not None else []
            splits[s] = [json.loads(x) for _, x in rows]  # the split's fixed order (limits, batches)
        shard = {
            "rank": rank,
            "world": world,
            **{k: meta[k] for k in ("rows", "stats", "blocks", "peak_rss_mb")},
        }
        out.append(TaskData(spec, splits, meta["dropped"], meta["info"], shard=shard))
    return out
