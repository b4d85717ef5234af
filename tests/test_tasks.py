"""Tasks as data: builtin tasks on real packaged data, fixed splits, user tasks over CSV/JSONL/Parquet/S3."""

from __future__ import annotations

import json

import pytest

from tagray.core.errors import ConfigError, InputError
from tagray.tasks.dataset import build_task_data, prepare_row
from tagray.tasks.labels import logp, qed
from tagray.tasks.sources import moses
from tagray.tasks.spec import builtin_tasks, load_task, parse_task
from tagray.tasks.splits import assign, load_rows

USER_TASK = {
    "name": "my_assay",
    "source": {"path": None},
    "fields": {"smiles": {"type": "smiles"}},
    "template": "The molecule <SMILES> {smiles} has activity <Act>",
    "function_tag": "<Act>",
    "target": {"kind": "regression", "columns": ["activity"]},
    "split": {"key": "smiles", "valid": 0.2, "test": 0.2},
}
ROWS = [
    {"smiles": s, "activity": float(i)}
    for i, s in enumerate(
        [
            "CCO",
            "CCN",
            "CCC",
            "c1ccccc1",
            "CC(=O)O",
            "CCOC",
            "CCCl",
            "C1CCCCC1",
            "CC(C)O",
            "CCS",
            *(
                "CCCC CCCCC CCCCO CCCN c1ccncc1 c1ccoc1 c1ccsc1 CC(C)C CC(C)(C)C CCOCC CC(=O)N CC(=O)OC OCCO NCCN".split()
            ),
            *("C1CCNCC1 C1CCOCC1 Cc1ccccc1 Oc1ccccc1 Nc1ccccc1 ClCCl".split()),
            "not-a-smiles",
        ]
    )
]


def test_every_builtin_task_loads_real_rows_with_fixed_splits():
    names = builtin_tasks()
    assert {
        "smiles_lm",
        "protein_lm",
        "lang_lm",
        "qed",
        "logp",
        "descriptor",
        "translate",
        "tanimoto",
        "amp",
        "qed_moses",
        "logp_moses",
    } <= set(names)
    for n in ["qed", "descriptor", "lang_lm", "translate"]:
        td = build_task_data(load_task(n))
        assert all(len(td.splits[s]) > 0 for s in ("train", "valid", "test"))
        train = {json.dumps(r, sort_keys=True, default=str) for r in td.splits["train"]}
        test = {json.dumps(r, sort_keys=True, default=str) for r in td.splits["test"]}
        assert not train & test
    # labels are computed by RDKit, not stored
    td = build_task_data(load_task("qed"))
    r = td.splits["test"][0]
    assert r["_target"][0] == pytest.approx(qed(r["smiles"]))


def test_language_tags_and_translation_pairs_share_held_out_sentences():
    lang = build_task_data(load_task("lang_lm"))
    assert len(lang.tags()) >= 6
    tr = build_task_data(load_task("translate"))
    zs = build_task_data(load_task("translate_zeroshot"))
    # the <Translate> tag never sees PT, IT or NL, and never FR->DE
    seen_pairs = {(r["src_lang"], r["tgt_lang"]) for r in tr.splits["train"]}
    assert ("FR", "DE") not in seen_pairs and not any("PT" in p or "IT" in p for p in seen_pairs)
    assert {"<PT>", "<IT>", "<NL>"} <= set(zs.tags())
    # test sentences of translation are test sentences of the language-model stage too
    test_ids = {r["msgid"] for r in tr.splits["test"]}
    assert not test_ids & {r["msgid"] for r in lang.splits["train"]}


def test_splits_do_not_depend_on_row_order(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    header = "smiles,activity\n"
    a.write_text(header + "".join(f"{r['smiles']},{r['activity']}\n" for r in ROWS))
    b.write_text(header + "".join(f"{r['smiles']},{r['activity']}\n" for r in reversed(ROWS)))
    sa = build_task_data(parse_task({**USER_TASK, "source": {"path": str(a)}}))
    sb = build_task_data(parse_task({**USER_TASK, "source": {"path": str(b)}}))
    for s in ("train", "valid", "test"):
        assert sorted(r["smiles"] for r in sa.splits[s]) == sorted(r["smiles"] for r in sb.splits[s])
    assert sa.dropped == 1  # the invalid SMILES row is dropped and counted, never trained on


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_user_task_over_local_files(tmp_path, fmt):
    import pandas as pd

    path = tmp_path / f"assay.{fmt}"
    df = pd.DataFrame(ROWS)
    {
        "csv": lambda: df.to_csv(path, index=False),
        "jsonl": lambda: df.to_json(path, orient="records", lines=True),
        "parquet": lambda: df.to_parquet(path),
    }[fmt]()
    td = build_task_data(parse_task({**USER_TASK, "source": {"path": str(path)}}))
    assert sum(len(v) for v in td.splits.values()) == 30
    assert td.tags() == ["<SMILES>", "<Act>"]


def test_user_task_yaml_and_data_on_s3(s3_bucket, tmp_path):
    import fsspec
    import yaml

    fs = fsspec.filesystem("s3")
    fs.pipe(
        f"{s3_bucket}/data/assay.csv",
        ("smiles,activity\n" + "".join(f"{r['smiles']},{r['activity']}\n" for r in ROWS)).encode(),
    )
    task = {**USER_TASK, "source": {"path": f"s3://{s3_bucket}/data/assay.csv"}}
    fs.pipe(f"{s3_bucket}/tasks/assay.yaml", yaml.safe_dump(task).encode())
    spec = load_task(f"s3://{s3_bucket}/tasks/assay.yaml")
    td = build_task_data(spec)
    assert sum(len(v) for v in td.splits.values()) == 30


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"target": {"kind": "regression", "columns": ["nope"]}}, "columns"),
        ({"template": "no tags here {smiles}"}, "template"),
        ({"function_tag": "<Other>"}, "function_tag"),
        ({"target": {"kind": "magic"}}, "target.kind"),
        ({"typo_key": 1}, "typo_key"),
        ({"source": {"path": "/does/not/exist.csv"}}, "source.path"),
        ({"fields": {"smiles": {"type": "dna"}}}, "fields.smiles.type"),
    ],
)
def test_bad_task_configs_name_the_field(tmp_path, patch, field):
    path = tmp_path / "a.csv"
    path.write_text("smiles,activity\nCCO,1\nCCN,2\nCCC,3\n")
    d = {**USER_TASK, "source": {"path": str(path)}, **patch}
    with pytest.raises(ConfigError) as e:
        build_task_data(parse_task(d))
    assert field in e.value.field


def test_field_validators_reject_bad_inputs():
    spec = load_task("qed")
    with pytest.raises(InputError) as e:
        prepare_row(spec, {"smiles": "C1CC(("}, with_target=False)
    assert e.value.field == "smiles" and "SMILES" in e.value.message
    spec = load_task("descriptor")
    with pytest.raises(InputError) as e:
        prepare_row(spec, {"seq": "MKLVB1"}, with_target=False)
    assert e.value.field == "seq" and "amino" in e.value.message
    assert prepare_row(spec, {"seq": "mklv"}, with_target=False)["seq"] == "MKLV"
    with pytest.raises(InputError) as e:
        prepare_row(load_task("qed"), {"smi": "CCO"}, with_target=False)
    assert e.value.field == "smiles"


def test_moses_source_samples_deterministically_in_bounded_memory():
    import subprocess
    import sys

    # the 1.58 M-row train file, streamed in a fresh interpreter so its peak memory is its own
    code = (
        # VmHWM is this process image's own peak (ru_maxrss would carry pytest's over the exec)
        "import re, time; t = time.process_time(); from tagray.tasks.sources import moses; "
        "rows = moses(n=300, seed=7); "
        "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024; "
        "print(len(rows), hwm, time.process_time() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    n, peak_mib, cpu_s = out.stdout.split()
    assert int(n) == 300 and int(peak_mib) < 300 and float(cpu_s) < 60, out.stdout
    a = moses(file="test", n=300, seed=7)  # 176 k rows: the same properties, quicker
    assert len(a) == 300 and len({r["smiles"] for r in a}) == 300 and a[0]["moses_file"] == "test"
    assert moses(file="test", n=300, seed=7) == a  # same rows, same order
    bigger = {r["smiles"] for r in moses(file="test", n=1000, seed=7)}
    assert {r["smiles"] for r in a} <= bigger  # bottom-k: a larger sample keeps the smaller one
    assert {r["smiles"] for r in moses(file="test", n=300, seed=8)} != {r["smiles"] for r in a}
    assert len(moses(file="test_scaffolds", n=20)) == 20
    for params, field in [({"file": "valid"}, "source.file"), ({"n": 0}, "source.n")]:
        with pytest.raises(ConfigError) as e:
            moses(**params)
        assert e.value.field == field


@pytest.mark.slow  # reads the real MOSES training set (1.58 M SMILES)
def test_moses_tasks_train_on_real_data_sizes():
    for name, fn in [("qed_moses", qed), ("logp_moses", logp)]:
        spec = load_task(name)
        sizes = {s: len(v) for s, v in assign(spec, load_rows(spec)).splits.items()}  # before labelling
        assert sizes["train"] >= spec.limits["train"] >= 20000 and sizes["test"] >= spec.limits["test"]
        small = load_task({"task": name, "limits": {"train": 20, "valid": 5, "test": 5}})
        td = build_task_data(small)
        r = td.splits["train"][0]
        assert r["_target"][0] == pytest.approx(fn(r["smiles"]))
        assert td.tags() == ["<SMILES>", spec.function_tag]


def test_classification_positive_class_and_metrics():
    spec = load_task("amp")
    assert spec.target.positive == "AMP" and spec.target.positive_index == 0
    assert (
        load_task(
            {"task": "amp", "target": {"kind": "classification", "column": "amp"}}
        ).target.positive_index
        == 1
    )
    assert parse_task({**USER_TASK, "source": {"path": "x.csv"}, "metrics": None}).metrics == (
        "mse",
        "mae",
        "pearson",
        "spearman",
    )
    cls = {**USER_TASK, "source": {"path": "x.csv"}, "target": {"kind": "classification", "column": "c"}}
    assert parse_task(cls).metrics == ("accuracy", "roc_auc", "f1")
    with pytest.raises(ConfigError) as e:
        parse_task({**cls, "target": {**cls["target"], "classes": ["a", "b"], "positive": "c"}})
    assert e.value.field.endswith("target.positive")
