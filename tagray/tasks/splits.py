"""Train / valid / test splits of a task's rows, as its ``split:`` says (exactly one of four kinds)::

    split: {key: smiles, valid: 0.1, test: 0.1}      # hash of the key column (the default kind)
    split: {column: fold}                            # a column names each row's split
    split: {files: {train: a.csv, valid: b.csv, test: c.parquet}}   # one file per split
    split: {scaffold: smiles, valid: 0.1, test: 0.1} # Bemis-Murcko scaffold split (RDKit)

Every kind is deterministic and independent of row order: within a split, rows are ordered by a hash
of their key, so ``limits`` keep the same rows whatever order the file lists them in. The hash split's
assignments are frozen (``tagray-split-v1``): existing artifacts and held-out sets depend on them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from ..core.errors import ConfigError
from .sources import load_file, load_source

if TYPE_CHECKING:
    from .spec import TaskSpec

log = logging.getLogger("tagray")
SPLITS = ("train", "valid", "test")
KINDS = ("key", "column", "files", "scaffold")
FILE_COL = "__split_file__"  # where rows of split.files remember their file until they are assigned
# what a split column may say (compared lower-case, stripped); anything else is an error
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "dev": "valid",
    "test": "test",
    "testing": "test",
}
_ALLOWED = {
    "key": {"key", "valid", "test", "seed"},
    "column": {"column"},
    "files": {"files"},
    "scaffold": {"scaffold", "valid", "test", "seed"},
}


def split_kind(split: dict) -> str:
    """Which kind of split a parsed ``split:`` mapping is."""
    return next((k for k in ("column", "files", "scaffold") if k in split), "key")


def _fractions(split: dict, where: str) -> None:
    for s in ("valid", "test"):
        v = split[s]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}.{s}", f"must be a fraction in [0, 1), got {v!r}")
    if not (0 <= split["valid"] < 1 and 0 <= split["test"] < 1 and split["valid"] + split["test"] < 1):
        raise ConfigError(where, "valid and test fractions must be in [0, 1) and sum below 1")


def _files(files, where: str) -> None:
    if not isinstance(files, dict) or "train" not in files:
        raise ConfigError(
            f"{where}.files", "expected {train: path, valid: path, test: path} (train required)"
        )
    for name, ref in files.items():
        if name not in SPLITS:
            raise ConfigError(f"{where}.files.{name}", f"unknown split; use {list(SPLITS)}")
        path = ref.get("path") if isinstance(ref, dict) else ref
        if not isinstance(path, str) or not path:
            raise ConfigError(
                f"{where}.files.{name}", "expected a path or {path: ..., format: csv|json|parquet}"
            )


def parse_split(d, where: str) -> dict:
    """Validate a task's ``split:`` and fill its defaults; errors name the bad key (``<where>.<key>``)."""
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(where, "expected a mapping such as {key: smiles, valid: 0.1, test: 0.1}")
    kinds = [k for k in KINDS if k in d]
    if len(kinds) > 1:
        raise ConfigError(where, f"give one of {list(KINDS)}, not {kinds}")
    kind = kinds[0] if kinds else "key"
    unknown = sorted(set(d) - _ALLOWED[kind])
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}", f"not allowed in a {kind} split; allowed: {sorted(_ALLOWED[kind])}"
        )
    if kind in ("key", "scaffold"):
        split = {"valid": 0.1, "test": 0.1, **d}  # the key kind's historical normal form (keep it)
        _fractions(split, where)
        if not isinstance(split.get(kind, ""), str):
            raise ConfigError(f"{where}.{kind}", "must be a column name")
        seed = split.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{where}.seed", f"must be an integer >= 0, got {seed!r}")
        return split
    if kind == "column" and not isinstance(d["column"], str):
        raise ConfigError(f"{where}.column", "must be a column name")
    if kind == "files":
        _files(d["files"], where)
    return dict(d)


def load_rows(spec: TaskSpec) -> list[dict]:
    """Rows of the task's source, or of every ``split.files`` file (each row tagged with its split)."""
    if split_kind(spec.split) != "files":
        return load_source(spec.source)
    rows: list[dict] = []
    for name in SPLITS:
        ref = spec.split["files"].get(name)
        if ref is None:
            continue
        path, fmt = (ref["path"], ref.get("format")) if isinstance(ref, dict) else (ref, None)
        try:
            part = load_file(path, fmt)
        except ConfigError as e:
            raise ConfigError(f"task {spec.name}.split.files.{name}", e.message) from e
        if not part:
            raise ConfigError(f"task {spec.name}.split.files.{name}", f"{path} has no rows")
        rows += [{**r, FILE_COL: name} for r in part]
    return rows


def _u(key: str, salt: str = "tagray-split-v1") -> float:
    h = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


@lru_cache(maxsize=65536)
def scaffold(smiles: str) -> str | None:
    """Bemis-Murcko scaffold (canonical SMILES, no chirality); ``""`` for acyclic, None if unparsable."""
    from rdkit.Chem.Scaffolds import MurckoScaffold

    from .labels import mol

    m = mol(smiles.strip()) if isinstance(smiles, str) else None
    return None if m is None else MurckoScaffold.MurckoScaffoldSmiles(mol=m, includeChirality=False)


@dataclass
class Assigned:
    """Rows per split in their fixed order (before validation), plus what the split itself dropped."""

    splits: dict[str, list[dict]]
    dropped: int = 0
    info: dict = field(default_factory=dict)


def dedup_key(spec: TaskSpec, r: dict) -> str:
    return json.dumps({f: r.get(f) for f in spec.input_fields + [spec.target.field or ""]}, default=str)


def order_key(spec: TaskSpec) -> str | None:
    return (
        spec.split.get("key")
        or spec.split.get("scaffold")
        or (spec.input_fields[0] if spec.input_fields else None)
    )


def _need_column(spec: TaskSpec, rows: list[dict], col: str, what: str) -> None:
    if col not in rows[0]:
        raise ConfigError(
            f"task {spec.name}.split.{what}", f"column {col!r} not in the data; columns: {sorted(rows[0])}"
        )


def assign(spec: TaskSpec, rows: list[dict]) -> Assigned:
    """Assign every (deduplicated) row to a split and order each split by a hash of its key."""
    kind = split_kind(spec.split)
    key_col = order_key(spec)
    if kind == "key" and spec.split.get("key"):
        _need_column(spec, rows, spec.split["key"], "key")
    if kind == "column":
        _need_column(spec, rows, spec.split["column"], "column")
    if kind == "scaffold":
        _need_column(spec, rows, spec.split["scaffold"], "scaffold")
    fn = {"key": _by_hash, "column": _by_column, "files": _by_column, "scaffold": _by_scaffold}[kind]
    out = fn(spec, rows)
    for s in SPLITS:
        out.splits[s] = [
            r
            for _, r in sorted(
                ((row_order(key_col, d, r, spec.split.get("seed")), r) for d, r in out.splits[s]),
                key=lambda x: x[0],
            )
        ]
    out.info["kind"] = kind
    return out


def _salted(salt: str, seed: int | None) -> str:
    """``split.seed`` 0 (or absent) keeps the frozen salts, so existing splits never move."""
    return f"{salt}:{seed}" if seed else salt


def row_order(key_col: str | None, d: str, r: dict, seed: int | None = 0) -> float:
    """A row's place within its split (``d``: its dedup key). The order fixes which rows a limit keeps;
    the tiny row term breaks ties between equal keys. ``seed``: ``split.seed`` (another random order)."""
    return _u(str(r.get(key_col)) if key_col else d, _salted("tagray-order-v1", seed)) + _u(d, "row") * 1e-9


def hash_split(spec: TaskSpec, key_col: str | None, d: str, r: dict) -> str:
    """The split of one row under a hash split (``tagray-split-v1``, frozen; ``split.seed`` > 0 draws
    another random split, e.g. the seeds of a reproduction)."""
    u = _u(str(r.get(key_col)) if key_col else d, _salted("tagray-split-v1", spec.split.get("seed")))
    te, va = spec.split["test"], spec.split["valid"]
    return "test" if u < te else "valid" if u < te + va else "train"


def named_split(value) -> str | None:
    """The split a split column's (or ``split.files``') value names, or None."""
    return SPLIT_NAMES.get(str(value).strip().lower()) if value is not None else None


def _unique(spec: TaskSpec, rows: list[dict]):
    """``(dedup key, row)`` for the first row of each distinct input (+ LM target)."""
    seen: set[str] = set()
    for r in rows:
        d = dedup_key(spec, r)
        if d not in seen:
            seen.add(d)
            yield d, r


def _by_hash(spec: TaskSpec, rows: list[dict]) -> Assigned:
    key_col = order_key(spec)
    splits: dict[str, list] = {s: [] for s in SPLITS}
    for d, r in _unique(spec, rows):
        splits[hash_split(spec, key_col, d, r)].append((d, r))
    return Assigned(splits)


def _by_column(spec: TaskSpec, rows: list[dict]) -> Assigned:
    """Split named per row: by ``split.column`` or by the file it came from (``split.files``)."""
    col = spec.split.get("column", FILE_COL)
    splits: dict[str, list] = {s: [] for s in SPLITS}
    seen: dict[str, set[str]] = {s: set() for s in SPLITS}
    bad: set[str] = set()
    for r in rows:
        v = r.get(col)
        name = named_split(v)
        if name is None:
            bad.add("<missing>" if v is None else repr(v))
            continue
        if col == FILE_COL:
            r = {k: x for k, x in r.items() if k != FILE_COL}
        d = dedup_key(spec, r)
        if d not in seen[name]:  # duplicates within a split only; the user's split is kept as given
            seen[name].add(d)
            splits[name].append((d, r))
    if bad:
        raise ConfigError(
            f"task {spec.name}.split.column",
            f"column {col!r} has values that name no split: {sorted(bad)[:10]}; use one of {sorted(SPLIT_NAMES)}",
        )
    leaked = {s: len(seen[s] & seen["train"]) for s in ("valid", "test")}
    if any(leaked.values()):
        log.warning("task %s: rows also in train (same inputs): %s", spec.name, leaked)
    return Assigned(splits, info={"in_train": leaked})


def _by_scaffold(spec: TaskSpec, rows: list[dict]) -> Assigned:
    """Whole Bemis-Murcko scaffolds per split, largest groups to train first (DeepChem's convention).

    Ties between equally large groups break by a hash of the scaffold, not by row order. Rows whose
    SMILES RDKit cannot parse have no scaffold: they are dropped and counted.
    """
    col = spec.split["scaffold"]
    groups: dict[str, list] = {}
    dropped = 0
    for d, r in _unique(spec, rows):
        sc = scaffold(r.get(col))
        if sc is None:
            dropped += 1
        else:
            groups.setdefault(sc, []).append((d, r))
    n = sum(len(g) for g in groups.values())
    train_cut = (1 - spec.split["valid"] - spec.split["test"]) * n
    valid_cut = (1 - spec.split["test"]) * n
    splits: dict[str, list] = {s: [] for s in SPLITS}
    count = dict.fromkeys(SPLITS, 0)
    for sc in sorted(groups, key=lambda s: (-len(groups[s]), _u(s, "tagray-scaffold-v1"))):
        g = groups[sc]
        if len(splits["train"]) + len(g) <= train_cut:
            name = "train"
        elif len(splits["train"]) + len(splits["valid"]) + len(g) <= valid_cut:
            name = "valid"
        else:
            name = "test"
        splits[name] += g
        count[name] += 1
    return Assigned(splits, dropped, {"scaffolds": count})


def check_nonempty(spec: TaskSpec, splits: dict[str, list]) -> None:
    """Train must have rows; so must valid / test where the config asks for them.

    Asked for: a fraction above 0 (hash and scaffold splits) or a file (``split.files``). A split column
    decides itself: an empty valid / test split there is only a warning (the data has none).
    """
    kind = split_kind(spec.split)
    sizes = {s: len(splits[s]) for s in SPLITS}
    if not sizes["train"]:
        raise ConfigError(f"task {spec.name}.split", f"no training rows after validation ({sizes})")
    for s in ("valid", "test"):
        if sizes[s]:
            continue
        asked = (
            spec.split[s] > 0 if kind in ("key", "scaffold") else kind == "files" and s in spec.split["files"]
        )
        if asked:
            hint = f"give more rows, a larger split.{s}, or split.{s}: 0 to have none"
            if kind == "files":
                hint = f"split.files.{s} has no valid rows"
            raise ConfigError(
                f"task {spec.name}.split", f"the {s} split is empty after validation ({sizes}); {hint}"
            )
        if kind == "column":
            log.warning("task %s: no %s rows in split column %r", spec.name, s, spec.split["column"])
