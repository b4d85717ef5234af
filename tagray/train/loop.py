"""The training loop: AdamW over the tag and head tables, warm-up + cosine schedule, gradient
accumulation, periodic validation that offers each task group's state to the :class:`BestSnapshot`
and reports a checkpoint, and progress lines with an ETA (visible in ``ray job logs``)."""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time

import torch

from ..core.data import BucketBatchSampler, to_device
from ..core.errors import ConfigError
from ..core.progress import fmt_eta
from .batches import Example, make_batch
from .checkpoint import BestSnapshot, LoopState, save_checkpoint
from .evaluate import evaluate
from .setup import Setup, refresh_heads
from .varpro import MIN_LOO_ROWS, split_rows, varpro_loss, varpro_step


def make_optimizer(setup: Setup):
    """AdamW (or SGD on normalised gradients, ``optimizer: ngd``) with one group for the tag table and
    one for the head table; returns (optimizer, params)."""
    cfg, model = setup.cfg, setup.model
    params = model.trainable_parameters()
    if not params:
        raise ConfigError("train_tags", "this stage has nothing to train")
    groups = [{"params": [model.tags.trainable], "lr": cfg.lr}] if model.tags.trainable.requires_grad else []
    if model.heads is not None and model.heads.trainable.requires_grad:
        groups.append({"params": [model.heads.trainable], "lr": cfg.head_lr or cfg.lr})
    if cfg.optimizer == "ngd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay), params
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay), params


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def total_steps(cfg, n_rows: int, world: int) -> int:
    """``max_steps``, or ``epochs`` passes over ``n_rows`` at ``batch_size x grad_accum x world`` rows a step."""
    if cfg.epochs is None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_rows / (cfg.batch_size * cfg.grad_accum * world)))


def _normalise_per_entry(setup: Setup) -> None:
    """Scale each trainable entry's gradient (a tag's ``p`` rows, a head's rows) to unit RMS, so every tag
    of a mixed-task step moves by ``lr`` whatever its tasks' loss scales (one table holds them all)."""
    for bank in (setup.model.tags, setup.model.heads):
        if bank is None or bank.trainable.grad is None:
            continue
        g, off = bank.trainable.grad, bank.first_trainable_row
        for s in bank.slots.values():
            if s.trainable:
                block = g[s.start - off : s.start - off + s.rows]
                block /= block.pow(2).mean().sqrt().clamp_min(1e-20)


class Trainer:
    """One stage's loop over its encoded training rows.

    Args:
        setup: the stage setup (model, tasks, groups).
        job_name: the stage name (log lines, checkpoints).
        rt: the runtime (rank, reporting, checkpoints).
        wrapped: the model as the runtime wrapped it (DDP or not).
        train: every task's encoded training rows (``Example.task`` indexes ``setup.tasks``).
    """

    def __init__(self, setup: Setup, job_name: str, rt, wrapped, train: list[Example], device, autocast):
        self.setup, self.name, self.rt, self.wrapped = setup, job_name, rt, wrapped
        self.train, self.device, self.autocast = train, device, autocast
        cfg = setup.cfg
        self.opt, self.params = make_optimizer(setup)
        # a rank holding a shard has 1 / world of the rows (equal shards), else every rank has every row
        rows = len(train) * rt.world_size if setup.sharded else len(train)
        self.total = total_steps(cfg, rows, rt.world_size)
        warmup = int(cfg.warmup_ratio * self.total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(warmup, self.total))
        self.sampler = BucketBatchSampler(
            [len(e.enc) for e in train],
            cfg.batch_size,
            seed=cfg.seed,
            num_replicas=1 if setup.sharded else rt.world_size,
            rank=0 if setup.sharded else rt.rank,
            bucketing=cfg.bucketing,
            groups=[e.task for e in train] if cfg.task_batches else None,
        )
        self.state = LoopState()
        self.best = BestSnapshot(setup.groups)
        self.losses: list[float] = []
        self.tokens = 0
        self.t0 = self.last_line = time.time()
        self.step0_at = 0
        self.pending: list[int] = []  # varpro: rows of the step being gathered, its loss, step scale
        self.vp_chunks: list = []  # varpro: the step's check half (micro-batches)
        self.vp_loss: float | None = None  # varpro: the check half's LOO loss before the step
        # varpro backtracking, per task set of a step (a task's rejected step must not shrink another's)
        self.step_scales: dict[tuple, float] = {}
        self.vp_key: tuple = ()
        self.rejected = 0

    # ---- validation ---------------------------------------------------------------------------

    def validate(self, report: bool = True) -> dict:
        """Score the validation split, offer each group's state to the snapshot, report a checkpoint."""
        setup, cfg, st = self.setup, self.setup.cfg, self.state
        recent = self.losses[-cfg.eval_every :]
        metrics = {
            "step": st.step,
            "train_loss": sum(recent) / len(recent) if recent else float("nan"),
            "tokens_per_s": self.tokens / max(time.time() - self.t0, 1e-9),
            "lr": self.sched.get_last_lr()[0],
        }
        if cfg.head_mode == "varpro":
            metrics.update(
                step_scale=min(self.step_scales.values(), default=1.0), rejected_steps=self.rejected
            )
            for key, scale in self.step_scales.items():
                names = "+".join(setup.tasks[i].spec.name for i in key)
                metrics[f"step_scale/{names}"] = scale
        t = time.time()
        refresh_heads(setup, self.rt, self.device)  # heads for the current tags
        val = evaluate(
            setup, setup.tasks, "valid", self.rt, self.device, limit=cfg.eval_rows, autocast=self.autocast
        )
        metrics["val_loss"] = sum(m["loss"] for m in val.values()) / max(1, len(val))
        for task, m in val.items():
            metrics.update({f"val/{task}/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        if cfg.select_metric == "val_loss":
            scores = {
                g.name: sum(val[setup.tasks[i].spec.name]["loss"] for i in g.tasks) / len(g.tasks)
                for g in setup.groups
            }
        else:
            if cfg.select_metric not in metrics:
                raise ConfigError(
                    "select_metric", f"{cfg.select_metric!r} is not reported; e.g. {sorted(metrics)[:6]}"
                )
            scores = {g.name: metrics[cfg.select_metric] for g in setup.groups}
        improved = self.best.offer(setup, st.step, scores)
        metrics["best_val"] = metrics.get(cfg.select_metric, metrics["val_loss"])
        st.history.append(
            {
                **{k: v for k, v in metrics.items() if "/" not in k or k.endswith("/loss")},
                "improved": improved,
            }
        )
        self.rt.log(
            f"stage {self.name} step {st.step}/{self.total}: train_loss {metrics['train_loss']:.4f} "
            f"val_loss {metrics['val_loss']:.4f} ({time.time() - t:.0f}s to validate"
            + (f"; new best: {', '.join(improved)})" if improved else ")")
        )
        if report:
            with tempfile.TemporaryDirectory(prefix="tagray-ckpt-") as d:
                if self.rt.rank == 0:
                    save_checkpoint(d, setup, self.opt, st, self.best, self.name)
                self.rt.report(metrics, d if self.rt.rank == 0 else None)
        return val

    # ---- the loop -----------------------------------------------------------------------------

    def _micro_step(self, idx: list[int], sync: bool) -> None:
        setup = self.setup
        batch = to_device(
            make_batch([self.train[i] for i in idx], setup.head_names(), setup.pad_id), self.device
        )
        # varpro steps bypass DDP (their gradients are summed in _optimizer_step), so LM rows do too
        model = self.setup.model if setup.cfg.head_mode == "varpro" else self.wrapped
        no_sync = getattr(model, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with ctx, torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = model(batch)
            if out.loss is not None:
                (out.loss / setup.cfg.grad_accum).backward()
        if out.loss is not None:
            self.losses.append(float(out.loss.detach()))
        self.tokens += int(batch["attention_mask"].sum())

    def _reads_head(self, idx: list[int]) -> bool:
        setup = self.setup
        return any(setup.tasks[self.train[i].task].spec.head_tag in setup.train_heads for i in idx)

    def _varpro_step(self, micro: int = 32) -> None:
        """``head_mode: varpro``: the LOO gradient of one half of the step's rows (bypassing DDP's forward,
        so :meth:`_optimizer_step` sums the ranks' gradients), in micro-batches of ``micro`` rows; the other
        half checks the step (:mod:`.varpro`). The halves swap every step."""
        # in training order, so the two halves are the same rows every step (each half's features at a
        # state are then computed once: by the check after one step, read as the next step's gradient half)
        rows = [self.train[i] for i in sorted(self.pending)]
        self.pending = []
        self.vp_key = tuple(sorted({e.task for e in rows}))
        fit, check = split_rows(rows, self.state.step % 2)
        if len(check) < MIN_LOO_ROWS:  # too few rows to hold half out: check the step on its own rows
            fit = check = rows
        chunked = lambda r: [r[s : s + micro] for s in range(0, len(r), micro)]  # noqa: E731
        self.vp_chunks = chunked(check)
        loss, self.vp_loss = varpro_step(
            self.setup, chunked(fit), self.rt, self.device, self.autocast, check=self.vp_chunks
        )
        if loss is not None:
            self.losses.extend([loss] * self.setup.cfg.grad_accum)
        self.tokens += sum(len(e.enc) for e in rows)

    def _accept(self, before: torch.Tensor) -> None:
        """Backtracking on the step's held-out half: keep the step if the LOO loss of rows that did not
        shape it fell, else undo it and halve later steps of the same task(s) (``step_scale/<task>``; it
        regrows by 1.25x per accepted step, up to 1). Why: how far a tag can move before its features change character, and before it
        fits its own rows' noise, varies by task, rows and step (docs/training.md); one shipped learning
        rate cannot fit them all, a step that helped rows it never saw can."""
        after = varpro_loss(self.setup, self.vp_chunks, self.rt, self.device, self.autocast)
        if after is not None and after > self.vp_loss:
            with torch.no_grad():
                self.setup.model.tags.trainable.copy_(before)
            self.opt.load_state_dict(self.opt_before)
            self.step_scales[self.vp_key] = self.step_scales.get(self.vp_key, 1.0) * 0.5
            self.rejected += 1
        else:
            self.step_scales[self.vp_key] = min(1.0, self.step_scales.get(self.vp_key, 1.0) * 1.25)
        self.vp_loss = None

    def _optimizer_step(self) -> None:
        cfg, st = self.setup.cfg, self.state
        if cfg.head_mode == "varpro" and self.rt.world_size > 1:  # one global loss: sum the ranks' parts
            for p in self.params:
                if p.grad is not None:
                    self.rt.all_reduce(p.grad)
        if cfg.optimizer == "ngd":  # each tag / head moves by lr (RMS per coordinate) along its gradient
            _normalise_per_entry(self.setup)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        tentative = self.vp_loss is not None
        if tentative:  # an undone step leaves no trace: tags and the optimizer's moments as before it
            before = self.setup.model.tags.trainable.detach().clone()
            self.opt_before = copy.deepcopy(self.opt.state_dict())
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(self.step_scales.get(self.vp_key, 1.0))
        self.opt.step()
        if tentative:
            self._accept(before)
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        st.step += 1
        every = cfg.progress_s >= 0 and time.time() - self.last_line >= cfg.progress_s
        if st.step % cfg.log_every == 0 or st.step == self.total or every:
            self.last_line = time.time()
            done = st.step - self.step0_at
            rate = done / max(time.time() - self.t0, 1e-9)
            recent = self.losses[-cfg.log_every * cfg.grad_accum :]
            self.rt.log(
                f"stage {self.name} step {st.step}/{self.total} ({100 * st.step // self.total}%): "
                f"loss {sum(recent) / max(1, len(recent)):.4f} lr {self.sched.get_last_lr()[0]:.2e} "
                f"{rate:.2f} steps/s ETA {fmt_eta((self.total - st.step) / max(rate, 1e-9))}"
            )

    def run(self) -> None:
        """Train until ``total`` steps, validating every ``eval_every`` steps and at the end."""
        cfg, st = self.setup.cfg, self.state
        self.setup.model.train()
        self.t0, self.step0_at = time.time(), st.step
        self.last_line = self.t0
        while st.step < self.total:
            self.sampler.set_epoch(st.epoch)
            batches = list(self.sampler)
            for bi in range(st.batch_in_epoch, len(batches)):  # resume mid-epoch at the right batch
                last = (bi + 1) % cfg.grad_accum == 0 or bi + 1 == len(batches)
                if cfg.head_mode == "varpro" and self._reads_head(batches[bi]):
                    self.pending.extend(batches[bi])  # the step's head rows form one problem
                else:
                    self._micro_step(batches[bi], sync=last)
                if last and self.pending:
                    self._varpro_step()
                st.batch_in_epoch = bi + 1
                if not last:
                    continue
                self._optimizer_step()
                if st.step % cfg.eval_every == 0 or st.step == self.total:
                    self.validate()  # (re-fits the heads first)
                elif cfg.head_mode == "refit":
                    refresh_heads(self.setup, self.rt, self.device)
                if st.step >= self.total:
                    return
            st.epoch += 1
            st.batch_in_epoch = 0
