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


def test_varpro_stage_trains_the_tag_and_refits_the_head(tiny_llama):
    cfg = tiny_pipeline(
        name="x",
        train={
            "head_mode": "varpro",
            "optimizer": "ngd",
            "lr": 1e-2,
            "max_steps": 3,
            "eval_every": 1,
            "batch_size": 4,
            "grad_accum": 2,
            "eval_rows": 8,
            "tag_length": 2,
        },
        tiny_train=False,
        stages=[stage_dict("s", "qed", limits={"train": 24, "valid": 8, "test": 8})],
    )
    rt = Runtime()
    ts, _ = run_stage(StageJob(stage=cfg.stages[0]), rt, base=tiny_llama)
    train_losses = [r["train_loss"] for r in rt.reports]
    assert len(rt.reports) == 3 and all(x == x and x > 0 for x in train_losses), rt.reports  # LOO MSE
    assert ts.meta["probe"]["<QED>"]["rows"] == 24  # heads re-fitted on every training row
    assert ts.tags["<QED>"].shape[0] == 2
