"""``head_mode: varpro``: the function tag follows the *leave-one-out* error of its best ridge head.

Why: with about as many rows as feature dimensions (500 rows, d = 576) a ridge head fits part of its
training rows' noise. A tag moved along the gradient of the head's *training* error (``refit``: variable
projection on the in-sample loss) makes the features easier to overfit, and validation got worse
(docs/training.md). Ridge's leave-one-out residual has a closed form, ``e_i / (1 - H_ii)``, which is
differentiable in the features: its mean square estimates the error of the read-out on rows it did not
see, so the tag is trained on the generalisation error of the head it will be served with.

Each optimizer step poses the problem on its own rows (``batch_size x grad_accum`` rows of one task,
all at the current tags: nothing stale) with the ridge strength that minimises their LOO error; the
heads themselves are re-fitted on every training row only before evaluations. Pure torch; under DDP the
rows of every rank form one problem.

Held-out step check. The LOO error is out of sample for the *head*, not for the tag: a tag step fitted to
the same rows always looks good on them, and with a few hundred rows large steps lowered the rows' own LOO
error while validation got worse (docs/training.md). So each step's rows are split in two halves: the
gradient comes from one half's LOO error, and the step is kept only if it lowers the LOO error of the
*other* half, rows that did not shape it (the trainer undoes it otherwise). The halves swap every step.
"""

from __future__ import annotations

import torch

from ..core.data import to_device
from ..core.heads import RIDGE_LAMBDAS, ridge_targets
from ..core.progress import progress
from .batches import make_batch

MIN_LOO_ROWS = 8  # a task's rows in one problem below which its LOO error is not posed


def loo_ridge_loss(z: torch.Tensor, t: torch.Tensor, lam: float) -> torch.Tensor:
    """Mean squared leave-one-out residual of ridge (unpenalised intercept) of ``t (n, k)`` on ``z (n, d)``.

    Exact: with ``zc`` the centred features, the hat matrix is ``1/n + zc (zc'zc + lam I)^-1 zc'``, and the
    LOO residual of row i is its residual over ``1 - H_ii``. Solved in the dual ``(n, n)`` when n <= d,
    else in the primal ``(d, d)``; float64, differentiable in ``z``.
    """
    z, t = z.double(), t.double()
    n, d = z.shape
    zc, tc = z - z.mean(0), t - t.mean(0)
    if n <= d:  # A = (G + lam I)^-1: e = lam A t, 1 - H_ii - 1/n = lam A_ii - 1/n
        A = torch.linalg.inv(zc @ zc.T + lam * torch.eye(n, dtype=z.dtype, device=z.device))
        loo = (A @ tc) / (A.diagonal() - 1.0 / (n * lam))[:, None]
    else:
        kz = torch.linalg.solve(zc.T @ zc + lam * torch.eye(d, dtype=z.dtype, device=z.device), zc.T)
        e = tc - zc @ (kz @ tc)
        loo = e / (1.0 - (zc * kz.T).sum(1) - 1.0 / n)[:, None]
    return loo.pow(2).mean()


def _lam(z: torch.Tensor, t: torch.Tensor) -> float:
    """The grid's ridge strength with the lowest LOO error on these rows (no grad)."""
    with torch.no_grad():
        return min(RIDGE_LAMBDAS, key=lambda lam: float(loo_ridge_loss(z, t, lam)))


def _loo(setup, tasks: torch.Tensor, z: torch.Tensor, ys: list) -> torch.Tensor | None:
    """Mean over the tasks present of each task's LOO loss on its rows (None: no head task has 8 rows)."""
    heads, losses = setup.model.heads, []
    y = torch.tensor(ys, dtype=torch.float64)
    for i in tasks.unique().tolist():
        td = setup.tasks[i]
        m = tasks == i
        if (
            td.spec.head_tag not in setup.train_heads or int(m.sum()) < MIN_LOO_ROWS
        ):  # too few to leave one out
            continue
        spec, (mu, sd) = heads.specs[td.spec.head_tag], heads.stats()[td.spec.head_tag]
        zi = (z[m] - mu.double()) / sd.double()
        ti = ridge_targets(y[m], spec)
        losses.append(loo_ridge_loss(zi, ti, _lam(zi.detach(), ti)))
    return torch.stack(losses).mean() if losses else None


def _pass(setup, batches: list[dict], rt, what: str):
    """``batches`` with a progress line every ``progress_s`` (a step over every row runs for minutes)."""
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    return progress(
        batches,
        f"stage {setup.stage}: varpro {what} ({n} rows)",
        setup.cfg.progress_s,
        "batches",
        rt.rank == 0,
    )


def _gathered(setup, batches: list[dict], chunks: list[list], rt, ctx, autocast, what: str = "features"):
    """Every rank's step rows: task indices ``(m,)``, features ``(m, d)`` (no grad), targets, and a mask
    ``(m,)`` of this rank's rows."""
    model, feats = setup.model, []
    with torch.no_grad(), ctx:
        for c, b in zip(chunks, _pass(setup, batches, rt, what), strict=True):
            # remembered when read at these tags before (the step's check before, the re-fit, the probe)
            feats.append(
                setup.memo.read(model, c, lambda b=b: model.head_features(b).float().cpu(), autocast)
            )
    tasks = torch.tensor([e.task for c in chunks for e in c], dtype=torch.long)
    z = torch.cat(feats) if feats else torch.zeros(0, model.heads.width - 1)
    parts = rt.all_gather((tasks, z, [e.target for c in chunks for e in c]))
    mine = torch.tensor([rt.rank == r for r, (t, _, _) in enumerate(parts) for _ in range(len(t))])
    return (
        torch.cat([t for t, _, _ in parts]),
        torch.cat([f for _, f, _ in parts]).double(),
        [y for _, _, yy in parts for y in yy],
        mine,
    )


def _batches(setup, chunks, device):
    return [to_device(make_batch(c, setup.head_names(), setup.pad_id), device) for c in chunks]


@torch.no_grad()
def varpro_loss(setup, chunks: list[list], rt, device, autocast=None) -> float | None:
    """The step's LOO loss at the current tags (no grad): the trainer's test of a tentative step."""
    ctx = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
    tasks, z, ys, _ = _gathered(
        setup, _batches(setup, chunks, device), chunks, rt, ctx, autocast, "check of the step"
    )
    loss = _loo(setup, tasks, z, ys)
    return None if loss is None else float(loss)


def split_rows(rows: list, parity: int) -> tuple[list, list]:
    """A step's rows as (gradient half, check half): every other row, the halves swapping with ``parity``."""
    return rows[parity::2], rows[1 - parity :: 2]


def varpro_step(
    setup, chunks: list[list], rt, device, autocast=None, check: list[list] | None = None
) -> tuple[float | None, float | None]:
    """One optimizer step's gradient: the LOO loss of ridge on ``chunks``' rows, per task, at the current
    tags, back-propagated into the function tags. Returns that loss (mean over the step's tasks) and the
    LOO loss of the ``check`` rows at the same tags (None without them): the step is kept only if the
    check rows' loss falls (:func:`varpro_loss` after the step).

    Two passes keep memory at one micro-batch: features of every row without grad, then the loss's
    gradient ``dL/dz (m, d)`` in closed form, then each micro-batch re-run with grad and back-propagated
    with its rows of ``dL/dz`` (the chain rule, exact). ``chunks``: this rank's micro-batches of examples
    (``Example.task`` indexes ``setup.tasks``); under DDP the features of every rank's rows form one
    problem and each rank back-propagates its own rows (the trainer sums the gradients).
    """
    ctx = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
    before = varpro_loss(setup, check, rt, device, autocast) if check else None
    batches = _batches(setup, chunks, device)
    tasks, z, ys, mine = _gathered(setup, batches, chunks, rt, ctx, autocast)
    z.requires_grad_(True)
    loss = _loo(setup, tasks, z, ys)
    if loss is None:
        return None, before
    (grad,) = torch.autograd.grad(loss, z)
    grad, off = grad[mine].float(), 0  # this rank's rows, in chunk order
    for b in _pass(setup, batches, rt, "gradient"):
        with ctx:
            fresh = setup.model.head_features(b)
        n = fresh.shape[0]
        (fresh.float() * grad[off : off + n].to(fresh.device)).sum().backward()
        off += n
    return float(loss.detach()), before
