"""Data sources: real data that ships inside registry packages, and user files (CSV / JSONL / Parquet).

Every builtin source returns a list of plain dict rows and reads files only (no network):
- ``rdkit_nci``: 4,999 NCI SMILES shipped with RDKit (``Data/NCI/first_5K.smi``).
- ``rdkit_nci_pairs``: deterministic pairs of those SMILES (multi-instance tasks).
- ``modlamp_peptides``: 5,200 peptides (AMP vs UniProt) shipped with modlamp, with their class.
- ``django_text``: monolingual UI strings per language from Django's translation catalogs.
- ``django_pairs``: human translations between languages, joined on Django's English message ids.
- ``moses``: the MOSES benchmark's molecules (``molsets``: 1.58 M train, 176 k test SMILES), sampled.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import heapq
import importlib.util
import os
import random
import tempfile
from collections.abc import Callable
from functools import cache

from ..core.errors import ConfigError

SOURCES: dict[str, Callable[..., list[dict]]] = {}

# language tag -> Django locale folder (EN is the message id itself)
LANGUAGES = {
    "EN": None,
    "FR": "fr",
    "DE": "de",
    "ES": "es",
    "PT": "pt_BR",
    "IT": "it",
    "NL": "nl",
    "PL": "pl",
    "SV": "sv",
    "CS": "cs",
}


def source(name: str):
    def deco(fn):
        SOURCES[name] = fn
        return fn

    return deco


def package_dir(pkg: str) -> str:
    """Folder of an installed package without importing it (some data packages cannot be imported)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("source", f"the data package {pkg!r} is not installed (see requirements-data.txt)")
    return list(spec.submodule_search_locations)[0]


@source("rdkit_nci")
def rdkit_nci() -> list[dict]:
    from rdkit import RDConfig

    rows = []
    with open(os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")) as f:
        for line in f:
            parts = line.split()
            if parts:
                rows.append({"smiles": parts[0], "nci_id": parts[1] if len(parts) > 1 else ""})
    return rows


@source("rdkit_nci_pairs")
def rdkit_nci_pairs(seed: int = 0, n: int = 4000) -> list[dict]:
    """Pairs ``(smiles_a, smiles_b)`` drawn with a fixed seed from the NCI set."""
    mols = [r["smiles"] for r in rdkit_nci()]
    rng = random.Random(seed)
    return [
        {"smiles_a": a, "smiles_b": b, "pair_id": f"{i}"}
        for i, (a, b) in enumerate(zip(rng.choices(mols, k=n), rng.choices(mols, k=n), strict=True))
    ]


@source("modlamp_peptides")
def modlamp_peptides() -> list[dict]:
    path = os.path.join(package_dir("modlamp"), "data", "AMPvsUniProt.csv")
    rows = []
    with open(path) as f:
        next(f)  # header: count,1,UniProt,AMP
        for line in f:
            seq, _, label = line.strip().partition(",")
            if seq:
                rows.append({"seq": seq.strip().upper(), "amp": "AMP" if label.strip() == "1" else "UniProt"})
    return rows


MOSES_FILES = ("train", "test", "test_scaffolds")


@source("moses")
def moses(file: str = "train", n: int | None = 20000, seed: int = 0) -> list[dict]:
    """``n`` SMILES of a MOSES file (``molsets``), the same ones on every machine for a given ``seed``.

    The gzip file is streamed and the ``n`` rows with the smallest ``blake2b(seed, SMILES)`` are kept
    (bottom-k hash sampling): memory stays O(n), the sample does not depend on the file's order, and a
    larger ``n`` keeps every row of a smaller one. ``n: null`` reads the whole file.
    """
    if file not in MOSES_FILES:
        raise ConfigError("source.file", f"unknown MOSES file {file!r}; use one of {list(MOSES_FILES)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError("source.n", f"must be a positive integer or null (all rows), got {n!r}")
    path = os.path.join(package_dir("moses"), "dataset", "data", f"{file}.csv.gz")
    if not os.path.exists(path):
        raise ConfigError(
            "source", f"{path} is missing; reinstall molsets==0.3.1 (see requirements-data.txt)"
        )
    return [dict(r) for r in _moses_sample(path, n, seed)]


@cache
def _moses_sample(path: str, n: int | None, seed: int) -> tuple[dict, ...]:
    salt = f"tagray-moses-{seed}:".encode()
    heap: list[tuple[int, str]] = []  # max-heap of the n smallest hashes, as negated values
    with gzip.open(path, "rt") as f:
        header = f.readline().strip()
        if header != "SMILES":
            raise ConfigError("source", f"{path}: expected a SMILES header, got {header[:40]!r}")
        for line in f:
            smi = line.strip()
            if not smi:
                continue
            h = -int.from_bytes(hashlib.blake2b(salt + smi.encode(), digest_size=8).digest(), "big")
            if n is None:
                heap.append((h, smi))
            elif len(heap) < n:
                heapq.heappush(heap, (h, smi))
            elif h > heap[0][0]:
                heapq.heapreplace(heap, (h, smi))
    return tuple(
        {"smiles": smi, "moses_file": os.path.basename(path).removesuffix(".csv.gz")}
        for _, smi in sorted(heap, reverse=True)
    )


@cache
def _catalog(locale: str) -> dict[str, str]:
    """English message id -> translation, from every Django catalog of ``locale`` (non-fuzzy, singular)."""
    import polib

    root = package_dir("django")
    files = sorted(
        glob.glob(os.path.join(root, "conf", "locale", locale, "LC_MESSAGES", "django.po"))
        + glob.glob(os.path.join(root, "contrib", "*", "locale", locale, "LC_MESSAGES", "django.po"))
    )
    if not files:
        raise ConfigError("languages", f"no Django catalog for locale {locale!r}")
    out: dict[str, str] = {}
    for path in files:
        for e in polib.pofile(path):
            if e.msgid and e.msgstr and not e.fuzzy and not e.msgid_plural and not e.obsolete:
                out.setdefault(e.msgid.strip(), e.msgstr.strip())
    return out


def _text(lang: str, msgid: str) -> str | None:
    loc = LANGUAGES[lang]
    return msgid if loc is None else _catalog(loc).get(msgid)


def _check_langs(langs) -> list[str]:
    bad = [x for x in langs if x not in LANGUAGES]
    if bad:
        raise ConfigError("languages", f"unsupported {bad}; available: {sorted(LANGUAGES)}")
    return list(langs)


def _all_msgids() -> list[str]:
    ids: set[str] = set()
    for lang, loc in LANGUAGES.items():
        if loc is not None and lang in ("FR", "DE", "ES"):
            ids |= set(_catalog(loc))
    return sorted(ids)


@source("django_text")
def django_text(languages=("EN", "FR", "DE", "ES", "PT", "IT", "NL")) -> list[dict]:
    """Monolingual rows ``{lang, text, msgid}``; ``msgid`` is the split key shared with translation pairs."""
    rows = []
    for msgid in _all_msgids():
        for lang in _check_langs(languages):
            t = _text(lang, msgid)
            if t:
                rows.append({"lang": lang, "text": t, "msgid": msgid})
    return rows


@source("django_pairs")
def django_pairs(pairs=(("EN", "FR"), ("FR", "EN"))) -> list[dict]:
    """Parallel rows ``{src_lang, tgt_lang, src, tgt, msgid}`` for each listed direction."""
    rows = []
    pairs = [tuple(p) for p in pairs]
    for p in pairs:
        _check_langs(p)
    for msgid in _all_msgids():
        for s, t in pairs:
            a, b = _text(s, msgid), _text(t, msgid)
            if a and b and a != b:
                rows.append({"src_lang": s, "tgt_lang": t, "src": a, "tgt": b, "msgid": msgid})
    return rows


def file_format(path: str, fmt: str | None = None) -> str:
    """``csv``, ``json`` (JSON lines) or ``parquet``: as given, else from the file's extension."""
    fmt = fmt or {"csv": "csv", "tsv": "csv", "jsonl": "json", "json": "json", "parquet": "parquet"}.get(
        path.rsplit(".", 1)[-1].lower()
    )
    if fmt not in ("csv", "json", "parquet"):
        raise ConfigError(
            "source.format", f"cannot tell the format of {path!r}; set format: csv|json|parquet"
        )
    return fmt


def load_file(path: str, fmt: str | None = None) -> list[dict]:
    """Rows of a CSV / JSONL / Parquet file, local or ``s3://``, loaded with Hugging Face ``datasets``."""
    import datasets

    fmt = file_format(path, fmt)
    kwargs = {"delimiter": "\t"} if path.endswith(".tsv") else {}
    local = path
    with tempfile.TemporaryDirectory(prefix="tagray-data-") as tmp:
        if "://" in path:
            # fetch remote files with fsspec first: datasets' own remote access is disabled offline
            import fsspec

            local = os.path.join(tmp, os.path.basename(path))
            try:
                with fsspec.open(path, "rb") as src, open(local, "wb") as dst:
                    dst.write(src.read())
            except (FileNotFoundError, OSError) as e:
                raise ConfigError("source.path", f"cannot read {path}: {e}") from e
        elif not os.path.exists(path):
            raise ConfigError("source.path", f"{path} does not exist")
        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(
                fmt, data_files=local, split="train", cache_dir=os.path.join(tmp, "cache"), **kwargs
            )
        except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
            raise ConfigError("source.path", f"cannot read {path} as {fmt}: {type(e).__name__}: {e}") from e
        return [dict(r) for r in ds]


def load_source(spec: dict) -> list[dict]:
    """``{name: builtin, ...params}`` or ``{path: file, format: ...}`` -> rows."""
    if "path" in spec:
        return load_file(spec["path"], spec.get("format"))
    name = spec.get("name")
    if name not in SOURCES:
        raise ConfigError(
            "source.name", f"unknown source {name!r}; builtin: {sorted(SOURCES)}; or give a path"
        )
    params = {k: v for k, v in spec.items() if k != "name"}
    try:
        return SOURCES[name](**params)
    except TypeError as e:
        raise ConfigError("source", f"bad parameters for {name}: {e}") from e
