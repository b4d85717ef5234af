"""Expert features of task fields, for the scikit-learn baselines (:mod:`tagray.baselines`).

- SMILES: Morgan fingerprint (radius 2, 2048 bits, RDKit's generator) or RDKit's standard 2D descriptor
  set (``Descriptors._descList``). A descriptor that *is* the task's label (``qed`` for ``rdkit.qed``,
  ``MolLogP`` for ``rdkit.logp``, ``TPSA`` for ``rdkit.tpsa``) is left out: with it the baseline would
  read the answer.
- protein: amino-acid composition (20) + dipeptide composition (400), fractions of the sequence.

Every featuriser is cached per value (a molecule shared by many rows or pairs is computed once).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import product

import numpy as np

from ..core.errors import ConfigError
from .labels import mol
from .spec import TaskSpec
from .validators import AMINO_ACIDS

MORGAN_RADIUS, MORGAN_BITS = 2, 2048
AA = sorted(AMINO_ACIDS)
DIPEPTIDES = ["".join(p) for p in product(AA, AA)]
_DIPEPTIDE_INDEX = {d: i for i, d in enumerate(DIPEPTIDES)}
# label function -> RDKit descriptors equal to it (excluded from the descriptor baseline of that task)
LEAKY = {"rdkit.qed": ("qed",), "rdkit.logp": ("MolLogP",), "rdkit.tpsa": ("TPSA",)}
# per field type: the feature families it contributes to, in the order they are fitted
FAMILIES = {"smiles": ("morgan", "rdkit2d"), "protein": ("composition",)}
_CACHE = 200_000


@lru_cache(maxsize=1)
def _morgan_gen():
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=MORGAN_RADIUS, fpSize=MORGAN_BITS)


@lru_cache(maxsize=_CACHE)
def morgan(smiles: str) -> np.ndarray:
    """Morgan bits ``(2048,)`` as uint8."""
    m = mol(smiles)
    if m is None:
        raise ConfigError("features", f"invalid SMILES {smiles[:60]!r}")
    out = _morgan_gen().GetFingerprintAsNumPy(m).astype(np.uint8)
    out.flags.writeable = False  # shared by every caller through the cache
    return out


def descriptor_names(exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """RDKit's standard 2D descriptors (this RDKit version's ``Descriptors._descList``) minus ``exclude``."""
    from rdkit.Chem import Descriptors

    return tuple(n for n, _ in Descriptors._descList if n not in exclude)


@lru_cache(maxsize=1)
def _descriptor_fns() -> dict:
    from rdkit.Chem import Descriptors

    return dict(Descriptors._descList)


@lru_cache(maxsize=_CACHE)
def rdkit2d(smiles: str, names: tuple[str, ...]) -> np.ndarray:
    """Descriptors ``names`` of a molecule as float64; NaN where RDKit fails or gives a non-finite value."""
    m = mol(smiles)
    if m is None:
        raise ConfigError("features", f"invalid SMILES {smiles[:60]!r}")
    fns = _descriptor_fns()
    out = np.empty(len(names))
    for i, n in enumerate(names):
        try:
            out[i] = float(fns[n](m))
        except Exception:  # noqa: BLE001 - some descriptors raise on odd molecules; NaN is "missing"
            out[i] = np.nan
    out[~np.isfinite(out)] = np.nan
    out.flags.writeable = False
    return out


@lru_cache(maxsize=_CACHE)
def composition(seq: str) -> np.ndarray:
    """Amino-acid composition (20) + dipeptide composition (400), each summing to 1 (or 0 if too short)."""
    out = np.zeros(len(AA) + len(DIPEPTIDES))
    for c in seq:
        if c in AMINO_ACIDS:
            out[AA.index(c)] += 1
    if seq:
        out[: len(AA)] /= len(seq)
    pairs = [
        _DIPEPTIDE_INDEX[seq[i : i + 2]] for i in range(len(seq) - 1) if seq[i : i + 2] in _DIPEPTIDE_INDEX
    ]
    for j in pairs:
        out[len(AA) + j] += 1
    if pairs:
        out[len(AA) :] /= len(pairs)
    out.flags.writeable = False
    return out


def excluded_descriptors(spec: TaskSpec) -> tuple[str, ...]:
    """Descriptors equal to one of the task's derived target columns (see :data:`LEAKY`)."""
    targets = set(spec.target.columns) | ({spec.target.column} - {None})
    return tuple(n for col, d in spec.derive.items() if col in targets for n in LEAKY.get(d.get("fn"), ()))


def feature_fields(spec: TaskSpec) -> dict[str, str]:
    """Input fields that have expert features: ``{field: type}`` (text fields have none)."""
    return {
        f: spec.fields.get(f, {}).get("type", "text")
        for f in spec.input_fields
        if spec.fields.get(f, {}).get("type") in FAMILIES
    }


def families(spec: TaskSpec) -> list[str]:
    """Feature families to fit: each SMILES family (with protein composition beside it) or composition."""
    types = set(feature_fields(spec).values())
    return list(FAMILIES["smiles"]) if "smiles" in types else list(FAMILIES["protein"]) if types else []


def featurize(spec: TaskSpec, rows: list[dict], family: str) -> tuple[np.ndarray, np.ndarray]:
    """``X (N, D)`` of ``rows`` for ``family`` (per-field blocks concatenated in field order) and a
    ``(D,)`` mask of the columns to standardise (descriptors and compositions; fingerprint bits stay 0/1).
    """
    names = descriptor_names(excluded_descriptors(spec))
    blocks, scale = [], []
    for f, kind in feature_fields(spec).items():
        if kind == "protein":
            fn, s = composition, True
        elif family == "rdkit2d":
            fn, s = (lambda v: rdkit2d(v, names)), True
        else:
            fn, s = morgan, False
        block = np.stack([fn(r[f]) for r in rows]) if rows else np.zeros((0, len(fn(_probe(kind)))))
        blocks.append(block.astype(np.float64))
        scale.append(np.full(block.shape[1], s))
    if not blocks:
        raise ConfigError(f"task {spec.name}.fields", "no smiles or protein field to compute features from")
    return np.concatenate(blocks, 1), np.concatenate(scale)


def _probe(kind: str) -> str:
    return "C" if kind == "smiles" else "A"
