"""Expert baselines (scikit-learn) on a task's own splits, and the classification metrics they report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tagray.baselines import fit_baselines, format_baselines
from tagray.core.errors import ConfigError
from tagray.core.metrics import classification_metrics, f1, roc_auc
from tagray.tasks.dataset import build_task_data
from tagray.tasks.features import composition, descriptor_names, excluded_descriptors, featurize, morgan
from tagray.tasks.sources import modlamp_peptides, rdkit_nci
from tagray.tasks.spec import load_task, parse_task

from .factories import stage_dict, tiny_pipeline

SMALL = {"train": 240, "valid": 60, "test": 80}


def test_roc_auc_and_f1_match_scikit_learn():
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(y * 0.6 + rng.random(200), 1)  # rounded: many tied scores
    assert roc_auc(torch.tensor(s), torch.tensor(y)) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(roc_auc(torch.tensor(s), torch.zeros(200)))  # one class: undefined
    pred = (s > 0.7).astype(int)
    assert f1(torch.tensor(pred), torch.tensor(y), 2) == pytest.approx(f1_score(y, pred))
    assert f1(torch.tensor(pred), torch.tensor(y), 2, positive=0) == pytest.approx(
        f1_score(y, pred, pos_label=0)
    )
    y3 = rng.integers(0, 3, 300)
    p3 = rng.random((300, 3)) + np.eye(3)[y3] * 0.5
    p3 /= p3.sum(1, keepdims=True)
    m = classification_metrics(torch.tensor(p3), torch.tensor(y3))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr", average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y3, p3.argmax(1), average="macro"))
    assert m["accuracy"] == pytest.approx((p3.argmax(1) == y3).mean())
    b = classification_metrics(torch.tensor(np.stack([1 - s / 2, s / 2], 1)), torch.tensor(y))
    assert b["roc_auc"] == pytest.approx(roc_auc_score(y, s))


def test_features_are_cached_and_leave_out_the_label_descriptor():
    morgan.cache_clear()
    a, b = morgan("c1ccccc1O"), morgan("c1ccccc1O")
    assert a is b and a.shape == (2048,) and a.sum() > 0 and morgan.cache_info().hits == 1
    comp = composition("ACAC")
    assert (
        comp[:20].sum() == pytest.approx(1) and comp[20:].sum() == pytest.approx(1) and comp.shape == (420,)
    )
    spec = load_task("logp")
    assert excluded_descriptors(spec) == ("MolLogP",) and excluded_descriptors(load_task("tanimoto")) == ()
    x, scale = featurize(spec, [{"smiles": "CCO"}, {"smiles": "c1ccccc1"}], "rdkit2d")
    assert x.shape == (2, len(descriptor_names()) - 1) and scale.all()
    assert "MolLogP" not in descriptor_names(excluded_descriptors(spec))


def test_regression_baselines_fit_on_train_select_on_valid_score_test():
    spec = load_task({"task": "logp", "limits": SMALL})
    res = fit_baselines(spec, n_jobs=1)
    json.dumps(res, allow_nan=False)  # plain JSON, NaN -> null
    assert set(res["models"]) == {"mean", "morgan/ridge", "morgan/rf", "rdkit2d/ridge", "rdkit2d/rf"}
    td = build_task_data(spec)
    assert res["rows"] == {s: len(td.splits[s]) for s in ("train", "valid", "test")}
    # the mean baseline is the *training* mean, scored on test
    ytr = np.array([r["_target"][0] for r in td.splits["train"]])
    yte = np.array([r["_target"][0] for r in td.splits["test"]])
    assert res["models"]["mean"]["test"]["mse"] == pytest.approx(((yte - ytr.mean()) ** 2).mean())
    assert res["models"]["mean"]["test"]["pearson"] is None  # undefined for a constant
    for name, m in res["models"].items():
        if name != "mean":  # the kept candidate is the grid's best on valid
            assert m["valid"]["mse"] == pytest.approx(min(g["valid"]["mse"] for g in m["grid"]))
            assert m["test"]["mse"] < res["models"]["mean"]["test"]["mse"]
    assert res["best"] in res["models"] and res["models"]["rdkit2d/ridge"]["test"]["pearson"] > 0.8
    assert res["models"]["rdkit2d/ridge"]["dims"] == len(descriptor_names()) - 1  # MolLogP left out
    table = format_baselines(res)
    assert "morgan/ridge" in table and f"{res['best']} *" in table and "test spearman" in table


def test_classification_baselines_report_accuracy_roc_auc_f1():
    res = fit_baselines({"task": "amp", "limits": SMALL}, n_jobs=1)
    assert set(res["models"]) == {"mean", "composition/logreg", "composition/rf"}
    assert res["positive"] == "AMP" and res["select_metric"] == "roc_auc"
    mean = res["models"]["mean"]["test"]
    assert mean["roc_auc"] == pytest.approx(0.5)
    for m in ("composition/logreg", "composition/rf"):
        t = res["models"][m]["test"]
        assert t["roc_auc"] > 0.8 and t["accuracy"] > mean["accuracy"] and 0 < t["f1"] <= 1
    assert "test roc_auc" in format_baselines(res)


def test_multi_field_tasks_concatenate_per_field_features(tmp_path):
    res = fit_baselines({"task": "tanimoto", "limits": SMALL}, n_jobs=1, only=["mean", "morgan/ridge"])
    assert set(res["models"]) == {"mean", "morgan/ridge"} and res["models"]["morgan/ridge"]["dims"] == 4096
    seqs = [r["seq"] for r in modlamp_peptides()[:150]]
    mols = [r["smiles"] for r in rdkit_nci()[:150]]
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"seq": seqs, "smiles": mols, "y": np.arange(150) % 7}).to_csv(path, index=False)
    task = {
        "name": "bind",
        "source": {"path": str(path)},
        "fields": {"seq": {"type": "protein", "tokenize": "chars"}, "smiles": {"type": "smiles"}},
        "template": "The protein <Protein> {seq} and the drug <SMILES> {smiles} bind with <BA>",
        "function_tag": "<BA>",
        "target": {"kind": "regression", "columns": ["y"]},
        "split": {"scaffold": "smiles", "valid": 0.2, "test": 0.2},
    }
    res = fit_baselines(parse_task(task), n_jobs=1, only=["morgan/ridge", "rdkit2d/ridge"])
    assert res["models"]["morgan/ridge"]["dims"] == 420 + 2048
    assert res["models"]["rdkit2d/ridge"]["dims"] == 420 + len(descriptor_names())
    assert res["split"] == "scaffold" and res["fields"] == {"seq": "protein", "smiles": "smiles"}
    lim = fit_baselines(parse_task(task), n_jobs=1, only=["mean"], limit=5)
    assert lim["rows"]["test"] == 5 and lim["rows"]["train"] == res["rows"]["train"]


def test_lm_tasks_have_no_baselines():
    with pytest.raises(ConfigError) as e:
        fit_baselines("smiles_lm")
    assert e.value.field == "task smiles_lm.target.kind"


def test_stage_records_baselines_beside_the_tag_when_asked(tiny_llama, tmp_path):
    """#14.2: ``train.baselines: true`` fits the expert models on the stage's own split; the artifact, the
    pipeline summary and its printed table carry them."""
    from tagray.core.artifacts import load_tagset
    from tagray.pipeline import format_results, plan
    from tagray.train import Runtime, run_stage

    cfg = tiny_pipeline(
        output=str(tmp_path),
        name="b",
        train={"max_steps": 1, "eval_every": 1, "batch_size": 4, "tag_length": 2, "baselines": True},
        tiny_train=False,
        stages=[stage_dict("s", "qed", limits={"train": 40, "valid": 10, "test": 10})],
    )
    job, _, _ = plan(cfg)[0]
    run_stage(job, Runtime(), base=tiny_llama)
    b = load_tagset(job.output).metrics["qed"]["baselines"]
    assert {"mean", "morgan/ridge", "rdkit2d/ridge"} <= set(b), sorted(b)
    assert all(b[k]["mse"] > 0 for k in ("mean", "morgan/ridge"))
    from tagray.pipeline import _stage_result

    r = _stage_result(job)
    assert r["baselines"]["qed"] == b
    assert r["baselines_best"]["qed"] in b  # the model chosen on the validation split, named
    assert "baseline morgan/ridge MSE" in format_results({"s": r})
