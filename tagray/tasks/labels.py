"""Label functions: real targets computed from the data itself (RDKit, peptides), by name from YAML."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from ..core.errors import ConfigError

LABELS: dict[str, Callable[..., float | None]] = {}


def label(name: str):
    def deco(fn):
        LABELS[name] = fn
        return fn

    return deco


@lru_cache(maxsize=8192)
def mol(smiles: str):
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # parse failures are reported by tagray, not spammed by RDKit
    return Chem.MolFromSmiles(smiles) if smiles else None


@label("rdkit.qed")
def qed(smiles: str) -> float | None:
    from rdkit.Chem import QED

    m = mol(smiles)
    return None if m is None else float(QED.qed(m))


@label("rdkit.logp")
def logp(smiles: str) -> float | None:
    from rdkit.Chem import Crippen

    m = mol(smiles)
    return None if m is None else float(Crippen.MolLogP(m))


@label("rdkit.tpsa")
def tpsa(smiles: str) -> float | None:
    from rdkit.Chem import rdMolDescriptors

    m = mol(smiles)
    return None if m is None else float(rdMolDescriptors.CalcTPSA(m))


@label("rdkit.tanimoto")
def tanimoto(smiles_a: str, smiles_b: str) -> float | None:
    """Tanimoto similarity of Morgan fingerprints (radius 2, 2048 bits)."""
    from rdkit import DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    a, b = mol(smiles_a), mol(smiles_b)
    if a is None or b is None:
        return None
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    return float(DataStructs.TanimotoSimilarity(gen.GetFingerprint(a), gen.GetFingerprint(b)))


@label("peptides.blosum1")
def blosum1(seq: str) -> float | None:
    """BLOSUM1 index of a peptide (the descriptor the Tag-LLM paper regresses)."""
    import peptides

    try:
        return float(peptides.Peptide(seq).blosum_indices()[0])
    except (KeyError, ValueError, ZeroDivisionError):
        return None


@label("format.decimal")
def decimal(value) -> str | None:
    """A number written as text with three decimals (targets an LM writes out, e.g. the no-head ablation)."""
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return None


def compute(name: str, *args):
    if name not in LABELS:
        raise ConfigError("derive.fn", f"unknown label function {name!r}; available: {sorted(LABELS)}")
    return LABELS[name](*args)
