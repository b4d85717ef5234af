"""Tag-length x learning-rate search (issues #4, #12.2, #13): settings, plans, reports and Tuner wiring
(fast), and real searches on the tiny base (slow).

The slow tests share one search of 4 trials on real QED data: it is interrupted (SIGUSR1, Tune's Ctrl-C path)
after 2 trials have finished, then resumed through the CLI. They check that ASHA stopped some trials, that
the finished trials were not re-run, and that the published best tag set and ensemble load and predict.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import signal
import subprocess
import sys

import pytest
import yaml

from tagray.core.errors import ConfigError
from tagray.search import plan, report
from tagray.search import settings as st

from .factories import stage_dict, tiny_pipeline_dict

LIMITS = {"train": 32, "valid": 8, "test": 8}


def raw_config(tmp, base="/nonexistent-base", **tune) -> dict:
    return tiny_pipeline_dict(
        base,
        str(tmp / "runs"),
        name="tt",
        train={"max_steps": 8, "eval_every": 2, "batch_size": 4, "eval_rows": 8},
        tiny_train=False,
        scaling={"num_workers": 1, "cpus_per_worker": 0.9},
        stages=[stage_dict("single", "qed", "logp", limits=LIMITS)],
        tune=tune,
    )


def two_stages(tmp, **single) -> dict:
    """A domain stage, then the searched single stage (starting from the domain tags by default)."""
    raw = raw_config(tmp)
    raw["stages"] = [stage_dict("domain", "smiles_lm", limits=LIMITS), {**raw["stages"][0], **single}]
    return raw


# ---- fast: parsing and errors -----------------------------------------------------------------------


def test_defaults_one_search_per_task(tmp_path):
    cfg, ts = st.parse_tune(raw_config(tmp_path))
    assert ts.tag_length == [1, 2, 5, 10, 20] and ts.lr == [1e-4, 3e-2] and ts.metric == "val_loss"
    assert ts.asha == {"grace_period": 1, "reduction_factor": 2, "max_t": None}
    assert ts.trial_resources == {"CPU": 0.1} and ts.concurrent_trials == ts.num_samples == 8
    searches = plan.plan_searches(cfg, ts)
    assert [s.task for s in searches] == ["qed", "logp"]
    for s in searches:
        assert s.name.startswith(f"single-{s.task}-") and len(s.stage.tasks) == 1
        assert s.evals == 4 and s.init_from is None and s.stage.train.select_metric == "val_loss"
        # the trials share one prefix set per node, in the search's own folder (deleted when it ends)
        assert s.stage.train.prefix_cache_shared == f"auto:{s.name}"
    assert cfg.stages[-1].train.prefix_cache_shared == "search"  # a plain stage keeps its own store


def test_task_subset_metric_placeholder_and_asha_budget(tmp_path):
    cfg, ts = st.parse_tune(
        raw_config(tmp_path, tasks=["logp"], metric="val/{task}/mse", lr=["1e-4", "1e-2"], asha={"max_t": 3})
    )
    (s,) = plan.plan_searches(cfg, ts)
    assert s.task == "logp" and s.metric == "val/logp/mse"
    assert s.stage.train.select_metric == "val/logp/mse"  # the artifact keeps the best state by this metric
    assert s.stage.train.max_steps == 6 and s.evals == 3  # max_t evaluations of eval_every steps
    assert ts.lr == [1e-4, 1e-2]  # YAML reads 1e-4 as a string


def test_experiment_name_follows_the_search_settings(tmp_path):
    def name(**kw):
        return plan.plan_searches(*st.parse_tune(raw_config(tmp_path, tasks=["qed"], **kw)))[0].name

    # settings that do not change the trials keep the name: the search resumes
    assert name() == name(top_k=1, max_concurrent=1, registry="/x", trial_resources={"CPU": 1, "D": 1})
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
        ({"max_concurrent": 0}, "tune.max_concurrent"),
        ({"mode": "best"}, "tune.mode"),
        ({"bogus": 1}, "tune.bogus"),
        ({"asha": {"grace": 1}}, "tune.asha.grace"),
        ({"asha": {"reduction_factor": 1}}, "tune.asha.reduction_factor"),
        ({"asha": {"grace_period": 4}}, "tune.asha.grace_period"),  # a trial makes only 4 evaluations
        ({"multi_objective": True, "asha": {"grace_period": 1}}, "tune.asha"),
        ({"stage": "nope"}, "tune.stage"),
        ({"tasks": ["qed", "tanimoto"]}, "tune.tasks"),
        ({"trial_resources": {}}, "tune.trial_resources"),
        ({"trial_resources": [0.1]}, "tune.trial_resources"),
        ({"trial_resources": {"CPU": 0}}, "tune.trial_resources"),  # Tune refuses an all-zero request
        ({"trial_resources": {"CPU": -1}}, "tune.trial_resources.CPU"),
        ({"trial_resources": {"TRAIN_DRIVER_RESOURCE": "x"}}, "tune.trial_resources.TRAIN_DRIVER_RESOURCE"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, tune, field):
    with pytest.raises(ConfigError) as e:
        st.parse_tune(raw_config(tmp_path, **tune))
    assert e.value.field == field, e.value


def test_cli_reports_bad_lr_as_a_config_error(tmp_path, capsys):
    from tagray.cli import main

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw_config(tmp_path)))
    assert main(["tune", str(path), "--set", "tune.lr=[0.1, 0.001]"]) == 2
    assert "error: tune.lr: expected 0 < low < high" in capsys.readouterr().err


def test_trial_resources_accept_a_custom_driver_resource(tmp_path):
    _, ts = st.parse_tune(raw_config(tmp_path, trial_resources={"cpu": 0, "TRAIN_DRIVER_RESOURCE": 1}))
    assert ts.trial_resources == {"CPU": 0.0, "TRAIN_DRIVER_RESOURCE": 1.0}  # Tune's "cpu" spelled once


def test_trial_demand_and_what_fits(tmp_path):
    cfg, ts = st.parse_tune(raw_config(tmp_path))
    stage = cfg.stages[0]
    assert plan.trial_demand(stage, ts) == pytest.approx({"CPU": 1.0})  # 0.1 (driver) + 0.9 (worker)
    assert plan.trials_that_fit({"CPU": 4.0}, plan.trial_demand(stage, ts)) == 4
    gpu = dataclasses.replace(
        stage, scaling=dataclasses.replace(stage.scaling, use_gpu=True, num_workers=2, gpus_per_worker=1.0)
    )
    _, custom = st.parse_tune(raw_config(tmp_path, trial_resources={"CPU": 0.1, "TRAIN_DRIVER_RESOURCE": 1}))
    need = plan.trial_demand(gpu, custom)
    assert need == pytest.approx({"CPU": 1.9, "GPU": 2.0, "TRAIN_DRIVER_RESOURCE": 1.0})
    assert plan.trials_that_fit({"CPU": 8.0, "GPU": 0.0, "TRAIN_DRIVER_RESOURCE": 8.0}, need) == 0
    assert plan.trials_that_fit({"CPU": 64.0, "GPU": 5.0, "TRAIN_DRIVER_RESOURCE": 2.0}, need) == 2


def test_max_concurrent_comes_from_the_settings_not_the_cluster_size(tmp_path, monkeypatch, caplog):
    """#12.2: GPU workers start at 0 on an autoscaling cluster; concurrency must not freeze at 1."""
    import ray

    from tagray.ray import tune as tt

    raw = raw_config(tmp_path, tasks=["qed"], trial_resources={"CPU": 0.1, "TRAIN_DRIVER_RESOURCE": 1})
    raw["scaling"] = {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 1.0, "cpus_per_worker": 1.0}
    monkeypatch.setattr(
        ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 0.0, "TRAIN_DRIVER_RESOURCE": 1.0}
    )
    started = ray.is_initialized()  # the session's shared Ray may already run (earlier tests)
    for tune, want in (({}, 8), ({"max_concurrent": 3}, 3), ({"max_concurrent": 20}, 8)):
        cfg, ts = st.parse_tune({**raw, "tune": {**raw["tune"], **tune}})
        (s,) = plan.plan_searches(cfg, ts)
        with caplog.at_level(logging.INFO, logger="tagray"):
            tt._log_capacity(ts, s)  # what run_search logs before building a new Tuner
        tuner = tt.new_tuner(cfg, ts, s)
        # Ray 2.60 keeps the TuneConfig on the TunerInternal; nothing here starts Ray
        assert tuner._local_tuner._tune_config.max_concurrent_trials == want
        assert ray.is_initialized() == started  # planning a search starts no Ray of its own
    assert "holds 0 of them now" in caplog.text and "wait for the autoscaler" in caplog.text
    pgf = tt.trainable(cfg, ts, s)._resources  # each trial driver asks for the declared driver resource
    assert pgf.required_resources == {"CPU": 0.1, "TRAIN_DRIVER_RESOURCE": 1.0}


def test_asha_or_fifo_and_metric_given_once(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tagray.ray import tune as tt

    cfg, ts = st.parse_tune(raw_config(tmp_path, tasks=["qed"]))
    (s,) = plan.plan_searches(cfg, ts)
    tc = tt.tune_config(cfg, ts, s)
    assert isinstance(tc.scheduler, ASHAScheduler) and tc.scheduler._max_t == s.evals - 1
    assert (tc.metric, tc.mode, tc.num_samples) == ("val_loss", "min", 8)
    cfg, ts = st.parse_tune(raw_config(tmp_path, tasks=["qed"], multi_objective=True))
    tc = tt.tune_config(cfg, ts, plan.plan_searches(cfg, ts)[0])
    assert type(tc.scheduler) is FIFOScheduler and tc.metric is None  # the searcher holds both metrics


def test_earlier_stages_to_run_first(tmp_path):
    cfg, ts = st.parse_tune(two_stages(tmp_path))
    first = plan.prerequisites(cfg, ts)
    assert [s.name for s in first.stages] == ["domain"] and first.registry is None and first.name == cfg.name
    s = plan.plan_searches(cfg, ts)[0]
    assert s.init_from == os.path.abspath(f"{tmp_path}/runs/tt/domain")  # what tagray.pipeline resolves
    # even with the artifact present the earlier stages are returned: run_pipeline skips finished ones
    # (same config hash) and retrains stale ones, so a search never starts from outdated tags
    os.makedirs(s.init_from)
    open(f"{s.init_from}/tagset.json", "w").write("{}")
    assert [x.name for x in plan.prerequisites(cfg, ts).stages] == ["domain"]
    assert plan.prerequisites(*st.parse_tune(two_stages(tmp_path, init_from=None))) is None
    cfg, ts = st.parse_tune(two_stages(tmp_path / "fresh", init_from="domain"))  # no artifact there
    assert [x.name for x in plan.prerequisites(cfg, ts).stages] == ["domain"]
    with pytest.raises(ConfigError) as e:
        st.parse_tune(two_stages(tmp_path, init_from=str(tmp_path / "missing")))
    assert e.value.field == "stages.single.init_from"


def test_run_search_refuses_missing_earlier_stages_before_starting_ray(tmp_path, monkeypatch):
    from tagray.ray import tune as tt

    monkeypatch.setattr(tt, "ensure_ray", lambda *a: pytest.fail("started Ray"))
    with pytest.raises(ConfigError) as e:
        tt.run_search(*st.parse_tune(two_stages(tmp_path)))
    assert e.value.field == "tune.stage" and "run stage(s) ['domain'] first" in e.value.message


def _records() -> list[report.TrialRecord]:
    """Three finished trials and one ASHA-stopped, shaped as the executor builds them from Tune results."""

    def rec(n, p, lr, curve, final=None, error=False):
        tid = f"ab12c_0000{n}"
        hist = [{"val_loss": v, "trial_id": tid, report.DONE: math.nan} for v in curve]
        if final is not None:
            hist.append({"val_loss": final, "trial_id": tid, report.DONE: 1.0, "artifact": f"/a/{tid}"})
        last = {k: v for k, v in hist[-1].items() if not (isinstance(v, float) and math.isnan(v))}
        return report.TrialRecord(
            f"_trial_{tid}_{n}_lr={lr},tag_length={p}_2026", {"tag_length": p, "lr": lr}, last, hist, error
        )

    return [
        rec(2, 5, 2e-3, [0.9, 0.7], final=0.65),
        rec(1, 1, 1e-2, [0.8, 0.6, 0.5], final=0.5),
        rec(3, 10, 0.02, [12.5]),  # stopped by ASHA at its first rung
        rec(4, 2, 1e-3, [0.7, 0.6], final=0.55),
    ]


def test_trial_rows_status_value_and_curves(tmp_path):
    cfg, ts = st.parse_tune(raw_config(tmp_path, tasks=["qed"]))
    (s,) = plan.plan_searches(cfg, ts)
    rows = report.trial_rows(_records(), s, ts)
    assert [r["number"] for r in rows] == [1, 2, 3, 4]
    assert [r["status"] for r in rows] == ["completed", "completed", "stopped", "completed"]
    assert [r["value"] for r in rows] == [0.5, 0.65, 12.5, 0.55]  # finished: the kept state's value
    assert (
        rows[0]["history"] == [0.8, 0.6, 0.5] and rows[0]["evals"] == 3
    )  # the final report is no evaluation
    assert rows[2]["artifact"] is None and rows[1]["artifact"] == "/a/ab12c_00002"


def test_finish_writes_results_ranks_and_publishes(tmp_path, monkeypatch):
    import csv

    import optuna

    from tagray.search import publish

    published = []
    monkeypatch.setattr(
        publish, "publish_best", lambda c, t, s, done: published.append(done) or {"tagset": "x"}
    )
    cfg, ts = st.parse_tune(raw_config(tmp_path, tasks=["qed"]))
    (s,) = plan.plan_searches(cfg, ts)
    res = report.finish(cfg, ts, s, _records(), {"task": "qed", "metric": s.metric, "trials": 4})
    assert (res["completed"], res["stopped_early"], res["errors"]) == (3, 1, 0)
    assert res["ranked"] == ["ab12c_00001", "ab12c_00004", "ab12c_00002"] and res["best"]["value"] == 0.5
    assert [r["trial"] for r in published[0]] == res["ranked"]
    d = res["results"]
    assert d == f"{tmp_path}/runs/tt/tune/results/{s.name}"
    rows = list(csv.DictReader(open(f"{d}/trials.csv")))
    assert [r["status"] for r in rows] == ["completed", "completed", "stopped", "completed"]
    assert "history" not in rows[0]
    assert json.load(open(f"{d}/summary.json"))["tagset"] == "x"
    study = optuna.load_study(study_name=s.name, storage=f"sqlite:///{d}/study.db")
    assert [t.state.name for t in study.trials].count("PRUNED") == 1 and study.best_value == 0.5
    assert set(res["plots"]) == {"history", "importance"}
    assert all(os.path.getsize(f"{d}/{f}") > 0 for f in res["plots"].values())
    table = report.format_table({"qed": res, "logp": {"trials": 2, "interrupted": True}})
    assert "qed" in table and "val_loss 0.5000" in table and "interrupted: re-run" in table
    assert open(report.save_table(cfg, table)).read() == table + "\n"


def test_search_package_is_ray_free_and_the_executor_imports_no_pipeline():
    code = (
        "import sys, tagray.search, tagray.search.report, tagray.search.publish\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'tagray.search imports ray'\n"
        "import tagray.ray.tune\n"
        "assert 'tagray.pipeline' not in sys.modules and 'tagray.cli' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_jobs_tune_yaml_parses():
    cfg, ts = st.load_tune("jobs/tune.yaml")
    assert [s.task for s in plan.plan_searches(cfg, ts)] == ts.tasks
    # two trials at once on a 2-CPU machine: driver + worker = 1 CPU each
    assert cfg.stage("single").scaling.cpus_per_worker + ts.trial_resources["CPU"] == pytest.approx(1.0)
    assert ts.concurrent_trials == 2


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
    from tagray.ray import tune as tt

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
    cfg, ts = st.load_tune(str(path))
    marker = str(tmp / "interrupted.json")
    first = tt.run_search(cfg, ts, callbacks=[InterruptAfter(2, marker)])["qed"]
    finished = json.load(open(marker))
    exp = first["experiment"]
    rows = os.path.join(os.environ["TAGRAY_PREFIX_SHARED"], os.path.basename(exp))  # the search's prefix rows
    kept_while_interrupted = bool(glob.glob(f"{rows}/*/*.npy"))
    before = {t: open(f"{_trial_dir(exp, t)}/result.json").read() for t in finished}
    art = {
        t: os.path.getmtime(p + "/tagset.json")
        for t in finished
        if os.path.exists(p := f"{tmp}/runs/tt/tune/_artifacts/{os.path.basename(exp)}/{t}")
    }
    rc = main(["tune", str(path)])  # the same command again: resumes
    final = json.load(open(f"{tmp}/runs/tt/tune/results/{os.path.basename(exp)}/summary.json"))
    return {
        "shared_rows": (kept_while_interrupted, os.path.exists(rows)),
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
    # the trials' shared prefix rows (RAM-backed /dev/shm by default) stay for the resumed run, and are
    # deleted on every node once the search has finished
    assert search["shared_rows"] == (True, False)


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
    full = plan.plan_searches(search["cfg"], search["ts"])[0].evals
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
    from tagray.serving import Predictor

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
    from tagray.ray import tune as tt

    raw["train"]["max_steps"] = 4
    res = tt.run_search(*st.parse_tune(raw))["qed"]
    assert res["completed"] == 2 and res["stopped_early"] == 0  # FIFO: ASHA needs a scalar
    assert res["pareto"] and set(res["pareto"]) <= {r for r in res["ranked"]}
    assert os.path.exists(f"{res['results']}/pareto.png")
    assert "Pareto front" in report.format_table({"qed": res})
