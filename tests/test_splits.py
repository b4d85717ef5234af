"""Task splits: frozen hash assignments, split columns, one file per split, Bemis-Murcko scaffolds."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import pandas as pd
import pytest

from tagray.core.errors import ConfigError
from tagray.tasks.dataset import build_task_data
from tagray.tasks.sources import rdkit_nci
from tagray.tasks.spec import load_task, parse_task
from tagray.tasks.splits import SPLIT_NAMES, parse_split, scaffold

from . import factories

ROOT = Path(__file__).resolve().parent.parent

TASK = factories.ASSAY_TASK  # a user task over a SMILES file (the source is added per test)


def _digest(rows: list[dict], col: str) -> str:
    return hashlib.sha1("\n".join(str(r[col]) for r in rows).encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    "name,col,want",
    [
        ("qed", "smiles", ("02d186e8919eb499", "387717fabafe8713", "e386abb74c711776")),
        ("tanimoto", "pair_id", ("0a09131719f55599", "e49f808d2b8e56d5", "33d881b20d77cb8b")),
    ],
)
def test_hash_split_assignments_and_order_are_frozen(name, col, want):
    # digests of the rows (in order, limits applied) taken before split kinds existed: artifacts and
    # held-out sets trained so far depend on exactly these assignments
    td = build_task_data(load_task(name))
    assert tuple(_digest(td.splits[s], col) for s in ("train", "valid", "test")) == want


def _nci_csv(tmp_path, n=400, shuffle_seed=None, extra=None):
    smiles = [r["smiles"] for r in rdkit_nci()[:n]] + ["C1CC((", "not-a-smiles"]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(smiles)
    df = pd.DataFrame({"smiles": smiles, **(extra(smiles) if extra else {})})
    path = tmp_path / f"mols{shuffle_seed}.csv"
    df.to_csv(path, index=False)
    return path


def test_scaffold_split_keeps_whole_scaffolds_apart_and_ignores_row_order(tmp_path):
    runs = []
    for seed in (None, 1):
        path = _nci_csv(tmp_path, shuffle_seed=seed)
        spec = parse_task(
            {
                **TASK,
                "source": {"path": str(path)},
                "split": {"scaffold": "smiles", "valid": 0.1, "test": 0.2},
            }
        )
        runs.append(build_task_data(spec))
    td = runs[0]
    scaf = {s: {scaffold(r["smiles"]) for r in td.splits[s]} for s in ("train", "valid", "test")}
    assert (
        not scaf["train"] & scaf["valid"]
        and not scaf["train"] & scaf["test"]
        and not scaf["valid"] & scaf["test"]
    )
    sizes = {s: len(td.splits[s]) for s in ("train", "valid", "test")}
    total = sum(sizes.values())
    assert sizes["train"] / total == pytest.approx(0.7, abs=0.05)
    assert sizes["test"] / total == pytest.approx(0.2, abs=0.05)
    # the largest scaffold group (acyclic molecules share scaffold "") goes to train
    counts: dict[str, int] = {}
    for s in td.splits.values():
        for r in s:
            counts[scaffold(r["smiles"])] = counts.get(scaffold(r["smiles"]), 0) + 1
    assert max(counts, key=counts.get) in scaf["train"]
    assert td.dropped == 2 and td.split_info["kind"] == "scaffold"  # the two unparsable SMILES
    assert td.split_info["scaffolds"]["test"] > 0
    for s in ("train", "valid", "test"):  # same rows, same order, whatever order the file lists them in
        assert [r["smiles"] for r in runs[1].splits[s]] == [r["smiles"] for r in td.splits[s]]


def test_scaffold_of_acyclic_and_invalid_molecules():
    assert scaffold("CCO") == ""
    assert scaffold("Cc1ccccc1CC(=O)O") == "c1ccccc1"
    assert scaffold("C1CC((") is None


def test_split_column_accepts_common_spellings_and_names_bad_values(tmp_path):
    names = ["train", "Training", "val", "VALID", "dev", "validation", "test", " testing "]

    def extra(smiles):
        return {"fold": [names[i % len(names)] for i in range(len(smiles))]}

    path = _nci_csv(tmp_path, n=80, extra=extra)
    spec = parse_task({**TASK, "source": {"path": str(path)}, "split": {"column": "fold"}})
    td = build_task_data(spec)
    df = pd.read_csv(path)
    want = {s: set() for s in ("train", "valid", "test")}
    for smi, f in zip(df.smiles, df.fold, strict=True):
        want[SPLIT_NAMES[f.strip().lower()]].add(smi)
    for s, rows in td.splits.items():
        assert {r["smiles"] for r in rows} <= want[s] and len(rows) >= len(want[s]) - 2
    df.loc[3, "fold"] = "holdout"
    df.loc[5, "fold"] = "trian"
    df.to_csv(path, index=False)
    with pytest.raises(ConfigError) as e:
        build_task_data(
            parse_task({**TASK, "name": "assay2", "source": {"path": str(path)}, "split": {"column": "fold"}})
        )
    assert e.value.field == "task assay2.split.column"
    assert "fold" in e.value.message and "'holdout'" in e.value.message and "'trian'" in e.value.message


def test_split_column_without_test_rows_warns(tmp_path, caplog):
    path = _nci_csv(tmp_path, n=40, extra=lambda s: {"fold": ["train", "valid"] * (len(s) // 2)})
    spec = parse_task({**TASK, "name": "notest", "source": {"path": str(path)}, "split": {"column": "fold"}})
    with caplog.at_level(logging.WARNING, logger="tagray"):
        td = build_task_data(spec)
    assert td.splits["test"] == [] and "no test rows" in caplog.text


def test_one_file_per_split_in_any_format(tmp_path):
    smiles = [r["smiles"] for r in rdkit_nci()[:60]]
    paths = {"train": tmp_path / "tr.csv", "valid": tmp_path / "va.jsonl", "test": tmp_path / "te.parquet"}
    parts = {"train": smiles[:40], "valid": smiles[40:50], "test": smiles[50:] + ["C1CC(("]}
    pd.DataFrame({"smiles": parts["train"]}).to_csv(paths["train"], index=False)
    pd.DataFrame({"smiles": parts["valid"]}).to_json(paths["valid"], orient="records", lines=True)
    pd.DataFrame({"smiles": parts["test"]}).to_parquet(paths["test"])
    task = {**TASK, "name": "files", "split": {"files": {s: str(p) for s, p in paths.items()}}}
    td = build_task_data(parse_task(task))
    for s in ("train", "valid", "test"):
        assert {r["smiles"] for r in td.splits[s]} == {x for x in parts[s] if x != "C1CC(("}
        assert all("__split_file__" not in r for r in td.splits[s])
    assert td.dropped == 1
    with pytest.raises(ConfigError) as e:  # a missing file is named by its split
        build_task_data(
            parse_task(
                {
                    **task,
                    "name": "f2",
                    "split": {"files": {**task["split"]["files"], "valid": "/no/such.csv"}},
                }
            )
        )
    assert e.value.field == "task f2.split.files.valid"
    with pytest.raises(ConfigError) as e:
        parse_task({**task, "source": {"path": str(paths["train"])}})
    assert e.value.field.endswith(".source")


@pytest.mark.parametrize(
    "split,field",
    [
        ({"key": "smiles", "column": "fold"}, "split"),
        ({"column": "fold", "valid": 0.1}, "split.valid"),
        ({"scaffold": "smiles", "test": "a lot"}, "split.test"),
        ({"key": "smiles", "valid": 0.6, "test": 0.5}, "split"),
        ({"files": {"valid": "a.csv"}}, "split.files"),
        ({"files": {"train": "a.csv", "holdout": "b.csv"}}, "split.files.holdout"),
        ({"scaffold": 3}, "split.scaffold"),
        ({"key": "smiles", "seed": -1}, "split.seed"),
        ({"key": "smiles", "seed": "one"}, "split.seed"),
        ({"column": "fold", "seed": 1}, "split.seed"),
        ("smiles", "split"),
    ],
)
def test_bad_split_configs_name_the_field(split, field):
    with pytest.raises(ConfigError) as e:
        parse_split(split, "task x.split")
    assert e.value.field == f"task x.{field}"


def test_hash_split_normal_form_is_unchanged():
    # artifacts record the parsed task; the hash kind's normal form must stay what it always was
    assert parse_split({"key": "smiles"}, "s") == {"valid": 0.1, "test": 0.1, "key": "smiles"}
    assert parse_split(None, "s") == {"valid": 0.1, "test": 0.1}


def test_split_seed_draws_another_random_split_and_seed_0_is_the_frozen_one():
    """``split.seed`` (the seeds of a reproduction): another hash split and row order per seed, each as
    deterministic as the frozen one; seed 0 is exactly the frozen split."""
    spec = load_task("qed")
    frozen = build_task_data(spec)
    zero = build_task_data(parse_task({**spec.raw, "split": {**spec.raw["split"], "seed": 0}}))
    assert all(_digest(zero.splits[s], "smiles") == _digest(frozen.splits[s], "smiles") for s in SPLITS3)
    one, again = (
        build_task_data(parse_task({**spec.raw, "name": n, "split": {**spec.raw["split"], "seed": 1}}))
        for n in ("qed_s1", "qed_s1b")
    )
    test0 = {r["smiles"] for r in frozen.splits["test"]}
    test1 = {r["smiles"] for r in one.splits["test"]}
    assert test1 != test0 and len(test1 & test0) < 0.5 * len(test1)  # another draw, not a shuffle
    assert [r["smiles"] for r in again.splits["train"]] == [r["smiles"] for r in one.splits["train"]]
    for s in SPLITS3:  # the three splits of one seed stay disjoint
        others = {r["smiles"] for t in SPLITS3 if t != s for r in one.splits[t]}
        assert not others & {r["smiles"] for r in one.splits[s]}


SPLITS3 = ("train", "valid", "test")


def test_empty_splits_fail_unless_turned_off(tmp_path, caplog):
    path = tmp_path / "tiny.csv"
    path.write_text("smiles\nCCO\nCCN\nCCC\n")
    base = {**TASK, "source": {"path": str(path)}}
    with pytest.raises(ConfigError) as e:
        build_task_data(
            parse_task({**base, "name": "tiny1", "split": {"key": "smiles", "valid": 0.01, "test": 0.01}})
        )
    assert e.value.field == "task tiny1.split" and "valid split is empty" in e.value.message
    td = build_task_data(parse_task({**base, "name": "tiny2", "split": {"valid": 0, "test": 0}}))
    assert len(td.splits["train"]) == 3
    path.write_text("smiles\nC1CC((\n")
    with pytest.raises(ConfigError) as e:
        build_task_data(parse_task({**base, "name": "tiny3", "split": {"valid": 0, "test": 0}}))
    assert e.value.field == "task tiny3.split" and "no training rows" in e.value.message


def test_missing_split_key_column_is_an_error(tmp_path):
    path = _nci_csv(tmp_path, n=20)
    with pytest.raises(ConfigError) as e:
        build_task_data(parse_task({**TASK, "source": {"path": str(path)}, "split": {"key": "inchikey"}}))
    assert e.value.field == "task assay.split.key" and "inchikey" in e.value.message


def test_your_data_doc_example_task_and_markers(tmp_path, monkeypatch):
    """docs/your_data_example.py: its task parses as a scaffold split and every doc block is rendered."""
    import importlib.util
    import shutil

    import yaml

    path = ROOT / "docs" / "your_data_example.py"
    mod_spec = importlib.util.spec_from_file_location("your_data_example", path)
    ex = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(ex)
    spec = parse_task(yaml.safe_load(ex.TASK_YAML))
    assert spec.split == {"scaffold": "smiles", "valid": 0.1, "test": 0.2}
    assert yaml.safe_load(ex.PIPELINE_YAML)["stages"][0]["tasks"] == [f"{ex.WORK}/pic50.yaml"]
    doc = tmp_path / "your-data.md"
    shutil.copy(ROOT / "docs" / "your-data.md", doc)
    monkeypatch.setattr(ex, "DOC", doc)
    ex.render(
        {"data": {"rows": 2, "csv": "x.csv", "head": [{"smiles": "CCO", "chembl_id": "C1", "pic50": "5"}]}}
    )
    text = doc.read_text()
    assert "CCO,C1,5" in text and "name: pic50" in text and "name: your-data" in text
    assert "Not run yet" in text  # baselines / Tag-LLM blocks without results say so
