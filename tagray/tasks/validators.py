"""Field validators: catch bad inputs (invalid SMILES, non-amino-acid letters) with errors naming the field."""

from __future__ import annotations

from ..core.errors import ConfigError, InputError
from .labels import mol

AMINO_ACIDS = set("ACDEFGHIKLMNPQRSTVWY")
MAX_CHARS = 20_000


def check_smiles(field: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(field, "expected a non-empty SMILES string")
    value = value.strip()
    if len(value) > MAX_CHARS or mol(value) is None:
        raise InputError(field, f"invalid SMILES (RDKit cannot parse {value[:60]!r})")
    return value


def check_protein(field: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(field, "expected a non-empty amino-acid sequence")
    value = value.strip().upper()
    bad = sorted(set(value) - AMINO_ACIDS)
    if bad:
        raise InputError(
            field, f"not amino-acid letters: {''.join(bad)!r} (allowed: {''.join(sorted(AMINO_ACIDS))})"
        )
    return value


def check_text(field: str, value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        raise InputError(field, "missing")
    return str(value)


VALIDATORS = {"smiles": check_smiles, "protein": check_protein, "text": check_text}


def validate(field: str, kind: str, value) -> str:
    if kind not in VALIDATORS:
        raise ConfigError(f"fields.{field}.type", f"unknown type {kind!r}; use one of {sorted(VALIDATORS)}")
    return VALIDATORS[kind](field, value)
