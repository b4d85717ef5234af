"""head_mode varpro: the closed-form leave-one-out loss and the loop that descends it (tiny configs)."""

from __future__ import annotations

import pytest
import torch

from tagray.train import Runtime, StageJob, run_stage
from tagray.train.varpro import loo_ridge_loss

from .factories import stage_dict, tiny_pipeline


def brute_force_loo(z: torch.Tensor, t: torch.Tensor, lam: float) -> float:
    """Refit ridge (unpenalised intercept) n times, each without one row, and score that row."""
    z, t, err = z.double(), t.double(), 0.0
    for i in range(len(z)):
        keep = torch.arange(len(z)) != i
        a, b = z[keep], t[keep]
        am, bm = a.mean(0), b.mean(0)
        w = torch.linalg.solve(
            (a - am).T @ (a - am) + lam * torch.eye(z.shape[1], dtype=z.dtype), (a - am).T @ (b - bm)
        )
        err += float(((z[i] - am) @ w + bm - t[i]).pow(2).sum())
    return err / t.numel()


@pytest.mark.parametrize("n,d", [(12, 30), (40, 6)])  # dual (n <= d) and primal forms
def test_loo_loss_matches_refitting_without_each_row(n, d):
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(n, d, generator=g), torch.randn(n, 2, generator=g)
    for lam in (0.5, 10.0):
        assert float(loo_ridge_loss(z, t, lam)) == pytest.approx(brute_force_loo(z, t, lam), rel=1e-8)


def test_loo_loss_gradient_is_finite_and_points_downhill():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(20, 1, generator=g, dtype=torch.float64)
    loss = loo_ridge_loss(z, t, 1.0)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all()
    with torch.no_grad():
        assert float(loo_ridge_loss(z - 1e-3 * grad / grad.norm(), t, 1.0)) < float(loss)


def varpro_qed_stage(name: str, limits: dict | None = None, **train):
    """A one-task stage on ``qed`` with the varpro recipe (ngd, lr 1e-2, p = 2) and ``train`` over it."""
    base = {"head_mode": "varpro", "optimizer": "ngd", "lr": 1e-2, "eval_rows": 8, "tag_length": 2}
    limits = limits or {"train": 24, "valid": 8, "test": 8}
    return tiny_pipeline(
        name=name, train={**base, **train}, tiny_train=False, stages=[stage_dict("s", "qed", limits=limits)]
    ).stages[0]


def test_varpro_stage_trains_the_tag_and_refits_the_head(tiny_llama):
    stage = varpro_qed_stage("x", max_steps=3, eval_every=1, batch_size=4, grad_accum=2)
    rt = Runtime()
    ts, _ = run_stage(StageJob(stage=stage), rt, base=tiny_llama)
    train_losses = [r["train_loss"] for r in rt.reports]
    assert len(rt.reports) == 3 and all(x == x and x > 0 for x in train_losses), rt.reports  # LOO MSE
    assert ts.meta["probe"]["<QED>"]["rows"] == 24  # heads re-fitted on every training row
    assert ts.tags["<QED>"].shape[0] == 2


def test_every_long_loop_of_a_stage_prints_progress_with_an_eta(tiny_llama, caplog):
    """``progress_s: 0``: the data, probe, varpro, evaluation and step loops each print ``done/total``
    lines with an ETA (issue 12: evaluations were silent for minutes); the default stays quiet on a tiny run."""
    import logging

    def stage(progress_s, limits):
        return varpro_qed_stage(
            "p",
            limits,
            max_steps=2,
            eval_every=2,
            batch_size=80,
            eval_rows=20,
            log_every=100,
            progress_s=progress_s,
        )

    with caplog.at_level(logging.INFO, logger="tagray"):
        run_stage(
            StageJob(stage=stage(0, {"train": 80, "valid": 20, "test": 20})), Runtime(), base=tiny_llama
        )
    lines = [r.getMessage() for r in caplog.records]
    for what in (
        "task qed: labelling train rows",
        "qed head features (80 training rows)",
        "varpro features (40 rows)",  # the step's gradient half
        "varpro gradient (40 rows)",
        "varpro check of the step (40 rows)",  # the held-out half
        "valid evaluation of qed (20 rows)",
        "test evaluation of qed (20 rows)",
    ):
        hits = [x for x in lines if what in x]
        assert any("ETA" in x for x in hits), (what, lines)
        assert any(" in 0m" in x for x in hits), (what, hits)  # and a closing line with the loop's time
    assert any("step 1/2" in x and "ETA" in x for x in lines)  # a step line before log_every steps
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tagray"):
        run_stage(
            StageJob(stage=stage(30.0, {"train": 81, "valid": 20, "test": 20})), Runtime(), base=tiny_llama
        )
    assert not [r for r in caplog.records if "ETA" in r.getMessage() and "step" not in r.getMessage()]


def test_feature_memo_skips_rereads_at_the_same_tags_with_the_same_results(tiny_llama, monkeypatch):
    """The probe pass, the re-fit before each validation, a step's acceptance check and the next step's
    first pass read the same rows at the same tags: the memo answers the repeats, and the stage ends
    with the same tags, heads and test metrics as one that recomputes every read."""
    from tagray.train.memo import FeatureMemo

    def run():
        stage = varpro_qed_stage("m", max_steps=3, eval_every=3, batch_size=24, lr=0.1)
        return run_stage(StageJob(stage=stage), Runtime(), base=tiny_llama)

    ts, test = run()
    memo = ts.meta["feature_memo"]
    # 24 rows in two fixed halves H0, H1 of 12; steps 1 and 3 are undone (their held-out half got worse),
    # step 2 is kept. Computed: the probe pass (24), every step's held-out check after it (3 x 12), and step
    # 3's check half before it (12: only H0 was read at step 2's state). Remembered: the step-0 re-fit (24),
    # steps 1 and 2's two halves before the step (2 x 24: the state they start from is the one read last),
    # step 3's gradient half (12) and the re-fit before the last validation (24, step 2's state)
    assert memo == {"hits": 24 + 2 * 24 + 12 + 24, "misses": 24 + 3 * 12 + 12}, memo
    monkeypatch.setattr(FeatureMemo, "key", staticmethod(lambda model, autocast: None))  # memo off
    ts_off, test_off = run()
    assert ts_off.meta["feature_memo"]["hits"] == 0
    for name, t in ts.tags.items():
        torch.testing.assert_close(t, ts_off.tags[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ts.heads["<QED>"], ts_off.heads["<QED>"], rtol=1e-4, atol=1e-5)
    assert abs(test["qed"]["mse"] - test_off["qed"]["mse"]) <= 1e-5 * max(1.0, test_off["qed"]["mse"])


def test_an_undone_varpro_step_restores_the_optimizer_moments(tiny_llama):
    """A rejected step (its LOO loss rose) leaves tags *and* AdamW's moments as they were before it: Adam's
    step count is the number of accepted steps, so the next step is not biased by a step that never was."""
    from tagray.train.loop import Trainer
    from tagray.train.recipe import _train_rows
    from tagray.train.setup import build_setup

    job = StageJob(
        stage=varpro_qed_stage("u", optimizer="adamw", lr=50.0, max_steps=3, eval_every=3, batch_size=24)
    )
    rt = Runtime()
    setup = build_setup(job, tiny_llama, rt.device)
    tr = Trainer(setup, "s", rt, setup.model, _train_rows(setup), rt.device, None)
    tr.run()
    assert tr.rejected >= 1, "lr 50 must overshoot at least once"
    accepted = tr.state.step - tr.rejected
    steps = [int(s["step"]) for s in tr.opt.state.values() if "step" in s]
    assert all(n == accepted for n in steps) and (bool(steps) == (accepted > 0)), (steps, tr.rejected)


def test_each_step_is_checked_on_the_half_of_its_rows_that_did_not_shape_it(tiny_llama, monkeypatch):
    """The gradient comes from one half's LOO error and the step is kept only if the other half's falls;
    the halves are fixed (training order) and swap roles every step."""
    from tagray.train import loop

    calls = []
    real = loop.varpro_step

    def spy(setup, chunks, rt, device, autocast=None, check=None):
        calls.append(({id(e.enc) for c in chunks for e in c}, {id(e.enc) for c in check or [] for e in c}))
        return real(setup, chunks, rt, device, autocast, check=check)

    monkeypatch.setattr(loop, "varpro_step", spy)
    stage = varpro_qed_stage("h", max_steps=3, eval_every=3, batch_size=24)
    run_stage(StageJob(stage=stage), Runtime(), base=tiny_llama)
    assert len(calls) == 3
    for fit, check in calls:
        assert len(fit) == len(check) == 12 and not fit & check
    assert calls[1] == (calls[0][1], calls[0][0]) and calls[2] == calls[0]  # swapped, then back


def test_a_rejected_step_shrinks_only_its_own_tasks_later_steps(tiny_llama, monkeypatch):
    """Backtracking is per task: QED's undone steps halve QED's step size, not LogP's."""
    from tagray.train import loop

    def fake_step(setup, chunks, rt, device, autocast=None, check=None):
        return 1.0, 1.0  # (gradient half's loss, check half's loss before the step)

    def fake_check(setup, chunks, rt, device, autocast=None):
        qed = setup.tasks[chunks[0][0].task].spec.name == "qed"
        return 2.0 if qed else 0.5  # QED's held-out half always gets worse, LogP's always better

    monkeypatch.setattr(loop, "varpro_step", fake_step)
    monkeypatch.setattr(loop, "varpro_loss", fake_check)
    stage = tiny_pipeline(
        name="b",
        train={
            "head_mode": "varpro",
            "optimizer": "ngd",
            "lr": 1e-2,
            "eval_rows": 8,
            "tag_length": 2,
            "max_steps": 4,
            "eval_every": 4,
            "batch_size": 24,
        },  # fmt: skip
        tiny_train=False,
        stages=[stage_dict("s", "qed", "logp", limits={"train": 24, "valid": 8, "test": 8})],
    ).stages[0]
    rt = Runtime()
    run_stage(StageJob(stage=stage), rt, base=tiny_llama)
    last = rt.reports[-1]
    assert last["step_scale/qed"] == 0.25 and last["step_scale/logp"] == 1.0, last
    assert last["rejected_steps"] == 2
