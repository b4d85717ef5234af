"""Ray Tune + Optuna search (issue #4): config parsing and errors (fast), and real searches on the tiny base.

The slow tests share one search of 4 trials on real QED data: it is interrupted (SIGUSR1, Tune's Ctrl-C path)
after 2 trials have finished, then resumed through the CLI. They check that ASHA stopped some trials, that
the finished trials were not re-run, and that the published best tag set and ensemble load and predict.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal

import pytest
import yaml

from tagray.core.errors import ConfigError
from tagray.ray import tune as tt

LIMITS = {"train": 32, "valid": 8, "test": 8}


def raw_config(tmp, base="/nonexistent-base", **tune) -> dict:
    return {
        "name": "tt",
        "base": base,
        "output": str(tmp / "runs"),
        "train": {"max_steps": 8, "eval_every": 2, "batch_size": 4, "eval_rows": 8},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.9},
        "stages": [
            {
                "name": "single",
                "tasks": [{"task": "qed", "limits": LIMITS}, {"task": "logp", "limits": LIMITS}],
            }
        ],
        "tune": tune,
    }


# ---- fast: parsing and errors -----------------------------------------------------------------------


def test_defaults_one_search_per_task(tmp_path):
    cfg, ts = tt.parse_tune(raw_config(tmp_path))
    assert ts.tag_length == [1, 2, 5, 10, 20] and ts.lr == [1e-4, 3e-2] and ts.metric == "val_loss"
    assert ts.asha == {"grace_period": 1, "reduction_factor": 2, "max_t": None}
    searches = tt.plan_searches(cfg, ts)
    assert [s.task for s in searches] == ["qed", "logp"]
    for s in searches:
        assert s.name.startswith(f"single-{s.task}-") and len(s.stage.tasks) == 1
        assert s.evals == 4 and s.init_from is None and s.stage.train.select_metric == "val_loss"


def test_task_subset_metric_placeholder_and_asha_budget(tmp_path):
    cfg, ts = tt.parse_tune(
        raw_config(tmp_path, tasks=["logp"], metric="val/{task}/mse", lr=["1e-4", "1e-2"], asha={"max_t": 3})
    )
    (s,) = tt.plan_searches(cfg, ts)
    assert s.task == "logp" and s.metric == "val/logp/mse"
    assert s.stage.train.select_metric == "val/logp/mse"  # the artifact keeps the best state by this metric
    assert s.stage.train.max_steps == 6 and s.evals == 3  # max_t evaluations of eval_every steps
    assert ts.lr == [1e-4, 1e-2]  # YAML reads 1e-4 as a string


def test_experiment_name_follows_the_search_settings(tmp_path):
    def name(**kw):
        return tt.plan_searches(*tt.parse_tune(raw_config(tmp_path, tasks=["qed"], **kw)))[0].name

    assert name() == name(top_k=1, max_concurrent=1, registry="/x")  # do not change the trials: resume
    assert name() != name(num_samples=4) and name() != name(lr=[1e-3, 1e-2]) and name() != name(seed=1)


@pytest.mark.parametrize(
    "tune,field",
    [
        ({"tag_length": []}, "tune.tag_length"),
        ({"tag_length": [0, 5]}, "tune.tag_length"),
        ({"tag_length": [5, 5]}, "tune.tag_length"),
        ({"tag_length": [1.5, 2]}, "tune.tag_length"),
        ({"tag_length": 10}, "tune.tag_length"),
        ({"lr": [1e-2, 1e-4]}, "tune.lr"),
        ({"lr": [0, 1e-3]}, "tune.lr"),
        ({"lr": [1e-3]}, "tune.lr"),
        ({"lr": "fast"}, "tune.lr"),
        ({"num_samples": 0}, "tune.num_samples"),
        ({"mode": "best"}, "tune.mode"),
        ({"bogus": 1}, "tune.bogus"),
        ({"asha": {"grace": 1}}, "tune.asha.grace"),
        ({"asha": {"reduction_factor": 1}}, "tune.asha.reduction_factor"),
        ({"asha": {"grace_period": 4}}, "tune.asha.grace_period"),  # a trial makes only 4 evaluations
        ({"multi_objective": True, "asha": {"grace_period": 1}}, "tune.asha"),
        ({"stage": "nope"}, "tune.stage"),
        ({"tasks": ["qed", "tanimoto"]}, "tune.tasks"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, tune, field):
    with pytest.raises(ConfigError) as e:
        tt.parse_tune(raw_config(tmp_path, **tune))
    assert e.value.field == field, e.value


def test_cli_reports_bad_lr_as_a_config_error(tmp_path, capsys):
    from tagray.cli import main

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw_config(tmp_path)))
    assert main(["tune", str(path), "--set", "tune.lr=[0.1, 0.001]"]) == 2
    assert "error: tune.lr: expected 0 < low < high" in capsys.readouterr().err


def test_concurrency_follows_cluster_resources(tmp_path, monkeypatch):
    import dataclasses

    import ray

    cfg, ts = tt.parse_tune(raw_config(tmp_path, num_samples=8))
    st = cfg.stages[0]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    assert tt.concurrency(st, ts) == 4  # 0.1 (trial) + 0.9 (worker) per trial
    assert tt.concurrency(st, dataclasses.replace(ts, max_concurrent=2)) == 2
    two = dataclasses.replace(st, scaling=dataclasses.replace(st.scaling, num_workers=2, cpus_per_worker=1.0))
    assert tt.concurrency(two, ts) == 1
    gpu = dataclasses.replace(st, scaling=dataclasses.replace(st.scaling, use_gpu=True, gpus_per_worker=1.0))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 3.0})
    assert tt.concurrency(gpu, ts) == 3


def test_jobs_tune_yaml_parses():
    cfg, ts = tt.load_tune("jobs/tune.yaml")
    assert [s.task for s in tt.plan_searches(cfg, ts)] == ts.tasks
    assert cfg.stage("single").scaling.cpus_per_worker + tt.TRIAL_CPU == pytest.approx(1.0)


# ---- slow: real searches on the tiny base --------------------------------------------------------------


class InterruptAfter:
    """A Tune callback that interrupts the search once (as Ctrl-C would) after ``n`` trials have finished."""

    def __new__(cls, n: int, marker: str):
        from ray import tune

        class _Interrupt(tune.Callback):
            def __init__(self):
                self.done: list[str] = []

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.done.append(trial.trial_id)
                if len(self.done) >= n and not os.path.exists(marker):  # the restored run must not fire
                    with open(marker, "w") as f:
                        json.dump(self.done, f)
                    os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler: stop, save state, return

        return _Interrupt()


def _trial_dir(exp: str, tid: str) -> str:
    (d,) = glob.glob(f"{exp}/*_{tid}_*")
    return d


@pytest.fixture(scope="module")
def search(ray_local, tiny_base_dir, tmp_path_factory):
    from tagray.cli import main

    tmp = tmp_path_factory.mktemp("tune")
    # seed 0 draws lr 0.038, 0.013, 0.21, 0.13 from this range: trials 3 and 4 diverge at their first evaluation
    # (val_loss 12.5 and 27.5 vs 1.08 and 1.06), and whatever the arrival order, a trial's slot frees only after
    # one of trials 1-2 passed rung 1, so ASHA stops at least trial 3 (measured with local run_stage)
    raw = raw_config(
        tmp,
        base=tiny_base_dir,
        tasks=["qed"],
        num_samples=4,
        max_concurrent=2,
        seed=0,
        top_k=2,
        lr=[1e-4, 1.0],
    )
    path = tmp / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg, ts = tt.load_tune(str(path))
    marker = str(tmp / "interrupted.json")
    first = tt.run_tune(cfg, ts, callbacks=[InterruptAfter(2, marker)])["qed"]
    finished = json.load(open(marker))
    exp = first["experiment"]
    before = {t: open(f"{_trial_dir(exp, t)}/result.json").read() for t in finished}
    art = {
        t: os.path.getmtime(p + "/tagset.json")
        for t in finished
        if os.path.exists(p := f"{tmp}/runs/tt/tune/_artifacts/{os.path.basename(exp)}/{t}")
    }
    rc = main(["tune", str(path)])  # the same command again: resumes
    final = json.load(open(f"{tmp}/runs/tt/tune/results/{os.path.basename(exp)}/summary.json"))
    return {
        "cfg": cfg,
        "ts": ts,
        "first": first,
        "finished": finished,
        "before": before,
        "art": art,
        "rc": rc,
        "final": final,
        "tmp": tmp,
    }


@pytest.mark.slow
def test_search_is_interrupted_then_resumed_without_rerunning_finished_trials(search):
    first, final, exp = search["first"], search["final"], search["first"]["experiment"]
    assert first.get("interrupted") and search["rc"] == 0
    assert len(search["finished"]) >= 2 and final["trials"] == 4  # 4 trials in all: none was duplicated
    for tid in search["finished"]:  # no new result line, no rewritten artifact
        assert open(f"{_trial_dir(exp, tid)}/result.json").read() == search["before"][tid]
    for tid, mtime in search["art"].items():
        assert (
            os.path.getmtime(
                f"{search['tmp']}/runs/tt/tune/_artifacts/{os.path.basename(exp)}/{tid}/tagset.json"
            )
            == mtime
        )
    train_runs = glob.glob(f"{search['tmp']}/runs/tt/tune/_train/{os.path.basename(exp)}-*")
    assert len(train_runs) == 4  # one Ray Train run per trial, named by its trial id


@pytest.mark.slow
def test_asha_stops_some_trials_early(search):
    import csv

    final = search["final"]
    rows = list(csv.DictReader(open(f"{final['results']}/trials.csv")))
    assert final["stopped_early"] >= 1 and final["completed"] >= 1 and final["errors"] == 0, rows
    # the diverging trials (lr > 0.1, see the fixture) are stopped even when they ran after the resume:
    # ASHA's rung records survive Tuner.restore
    assert [r["status"] for r in rows if float(r["lr"]) > 0.1] == ["stopped", "stopped"], rows
    rungs = json.load(
        open(f"{search['tmp']}/runs/tt/tune/_asha/{os.path.basename(final['experiment'])}.json")
    )
    assert len(rungs["1"]) == 4  # every trial's first evaluation, from both runs, is on record
    full = tt.plan_searches(search["cfg"], search["ts"])[0].evals
    for r in rows:
        if r["status"] == "stopped":
            assert int(r["evals"]) < full and not r["artifact"]
        else:
            assert int(r["evals"]) == full and os.path.exists(r["artifact"] + "/tagset.json")


@pytest.mark.slow
def test_outputs_table_plots_and_study(search):
    import optuna

    final, results = search["final"], search["final"]["results"]
    for f in ("trials.csv", "summary.json", "study.db", "history.png"):
        assert os.path.getsize(f"{results}/{f}") > 0
    if final["completed"] >= 2:
        assert os.path.exists(f"{results}/importance.png")
    study = optuna.load_study(
        study_name=os.path.basename(final["experiment"]), storage=f"sqlite:///{results}/study.db"
    )
    states = [t.state.name for t in study.trials]
    assert len(states) == 4 and states.count("PRUNED") == final["stopped_early"]
    best = final["best"]
    assert study.best_value == pytest.approx(best["value"]) and best["tag_length"] in search["ts"].tag_length
    table = open(f"{search['tmp']}/runs/tt/tune/results/summary.txt").read()
    assert "qed" in table and f"{best['value']:.4f}" in table


@pytest.mark.slow
def test_published_best_tags_and_ensemble_predict(search, tiny_base_dir):
    from tagray.core.artifacts import load_tagset
    from tagray.core.base import load_base
    from tagray.predict import Predictor

    final = search["final"]
    reg = final["registry"]
    best = load_tagset(f"{reg}/tagsets/{final['tagset']}")
    assert best.tags["<QED>"].shape[0] == final["best"]["tag_length"]
    ens = json.load(open(f"{reg}/ensembles/{final['ensemble']}.json"))
    assert ens["members"][0] == f"tt-qed-{final['best']['trial']}" and len(ens["members"]) == min(
        2, final["completed"]
    )
    pred = Predictor.from_registry(load_base(tiny_base_dir, dtype="float32"), reg)
    out = pred.predict(
        [
            {"tag": "<QED>", "tagset": final["tagset"], "inputs": {"smiles": "CCO"}},
            {"tag": "<QED>", "ensemble": final["ensemble"], "inputs": {"smiles": "c1ccccc1O"}},
        ]
    )
    assert all(math.isfinite(o["prediction"]) for o in out), out
    assert len(out[1]["members"]) == len(ens["members"]) and out[0]["tagset"] == final["tagset"]


@pytest.mark.slow
def test_multi_objective_search_reports_a_pareto_front(ray_local, tiny_base_dir, tmp_path):
    # runs after the ASHA search in the same Ray: without tagray's placement-group reaper it waited forever
    # for the CPUs still reserved by the stopped trials' Train workers
    raw = raw_config(
        tmp_path,
        base=tiny_base_dir,
        tasks=["qed"],
        num_samples=2,
        max_concurrent=2,
        multi_objective=True,
        tag_length=[1, 5],
    )
    raw["train"]["max_steps"] = 4
    res = tt.run_tune(*tt.parse_tune(raw))["qed"]
    assert res["completed"] == 2 and res["stopped_early"] == 0  # FIFO: ASHA needs a scalar
    assert res["pareto"] and set(res["pareto"]) <= {r for r in res["ranked"]}
    assert os.path.exists(f"{res['results']}/pareto.png")
    assert "Pareto front" in tt.format_table({"qed": res})
