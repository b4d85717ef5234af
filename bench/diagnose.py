"""Why training made the function tags worse, and which defaults fix it (docs/training.md).

One process, one task (default QED on RDKit's NCI molecules), one frozen SmolLM2 and one prefix store:
every experiment restarts from the same step-0 state (mean-embedding tags, ridge-probe head) and trains
only the function tag + head, so the runs differ only in what the experiment changes. Experiments:

- ``line``: line search along the step-0 gradient of the training loss w.r.t. the function tag, with the
  head fixed, re-centred (bias follows the feature mean) or re-fitted (ridge) at every point;
- ``grid``: tag learning rate x head learning rate;
- ``accum``: rows per step (batch x gradient accumulation) at a fixed number of epochs;
- ``track``: the heads' running feature mean on / off;
- ``probe``: ridge init on 256 rows vs all training rows;
- ``epochs``: longer runs with the chosen defaults.

Writes ``bench/results/diagnose.json`` (every curve) and ``docs/img/diagnose_*.png``; ``bench/render.py``
turns them into docs/training.md. ``--smoke`` runs every experiment on a tiny random model in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is a package

from bench.harness import add_options  # noqa: E402
from tagray.config import parse_pipeline
from tagray.core.data import to_device
from tagray.core.heads import feature_stats, ridge_fit
from tagray.train import Runtime, StageJob, build_setup
from tagray.train.batches import make_batch, sorted_batches
from tagray.train.evaluate import evaluate
from tagray.train.loop import Trainer
from tagray.train.recipe import _train_rows

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOMAIN_TAG = {
    "qed": "<SMILES>",
    "logp": "<SMILES>",
    "descriptor": "<Protein>",
    "amp": "<Protein>",
    "qed_moses": "<SMILES>",
    "logp_moses": "<SMILES>",
    "tanimoto": "<SMILES>",
}


class Quiet(Runtime):
    def report(self, metrics, checkpoint_dir):  # no checkpoint copies: many short runs
        self.reports.append(dict(metrics))


def make_setup(args, base=None):
    limits = {"train": args.rows, "valid": args.valid, "test": args.test}
    # only the function tag (and head) train; without a stage-1 artifact the domain tag stays at its init
    frozen = (
        {} if args.init_from or args.task not in DOMAIN_TAG else {"untrained_tags": [DOMAIN_TAG[args.task]]}
    )
    cfg = parse_pipeline(
        {
            "name": "diagnose",
            "base": args.base,
            "train": {
                "tag_length": args.p,
                "batch_size": 8,
                "eval_rows": args.valid,
                "probe_rows": 0,
                "seed": 0,
            },
            "stages": [{"name": "single", "tasks": [{"task": args.task, "limits": limits}], **frozen}],
        }
    )
    job = StageJob(stage=cfg.stages[0], base=args.base, dtype="float32", init_from=args.init_from)
    return build_setup(job, base)


class Lab:
    """A setup whose trainable state can be reset to step 0 and trained under any TrainConfig."""

    def __init__(self, setup):
        self.setup = setup
        self.train = _train_rows(setup)
        self.head = next(iter(setup.train_heads), None)  # None: an LM task (stage 1)
        self.task = setup.tasks[0]
        self.snapshot()

    def snapshot(self):
        m = self.setup.model
        self.init = [m.tags.trainable.detach().clone()]
        if m.heads is not None:
            self.init += [
                m.heads.trainable.detach().clone(),
                m.heads.feat_mu.clone(),
                m.heads.feat_sd.clone(),
            ]

    def reset(self):
        m = self.setup.model
        with torch.no_grad():
            m.tags.trainable.copy_(self.init[0])
            if m.heads is not None:
                m.heads.trainable.copy_(self.init[1])
                m.heads.feat_mu.copy_(self.init[2])
                m.heads.feat_sd.copy_(self.init[3])

    def run(self, name: str, **train) -> dict:
        """Train from step 0 with ``train`` overrides; returns the validation curve and the final test."""
        self.reset()
        base_cfg = self.setup.cfg
        self.setup.cfg = dataclasses.replace(base_cfg, **train)
        rt = Quiet("cpu")
        tr = Trainer(self.setup, "single", rt, self.setup.model, self.train, torch.device("cpu"), None)
        t = time.time()
        tr.validate(report=False)
        tr.run()
        curve = [
            {"step": h["step"], "val": h["val_loss"], "train": h["train_loss"]} for h in tr.state.history
        ]
        tr.best.restore(self.setup)
        test = evaluate(self.setup, [self.task], "test", rt, torch.device("cpu"))[self.task.spec.name]
        metric = next(k for k in ("mse", "accuracy", "loss") if k in test)
        self.setup.cfg = base_cfg
        best = min(curve, key=lambda c: c["val"])
        out = {
            "name": name,
            "config": train,
            "curve": curve,
            "best_step": best["step"],
            "best_val": best["val"],
            "step0_val": curve[0]["val"],
            "test": {metric: test[metric]},
            "seconds": round(time.time() - t, 1),
        }
        print(json.dumps({k: v for k, v in out.items() if k != "curve"}), flush=True)
        return out


@torch.no_grad()
def features(lab: Lab, split: str, limit=None) -> tuple[torch.Tensor, torch.Tensor]:
    s = lab.setup
    exs = s.examples(lab.task, split, limit)
    fs, ys = [], []
    for idx in sorted_batches(exs, 16):
        b = make_batch([exs[i] for i in idx], s.head_names(), s.pad_id)
        fs.append(s.model.head_features(b).float())
        ys += [exs[i].target for i in idx]
    return torch.cat(fs), torch.tensor(ys)


def train_gradient(lab: Lab, limit: int) -> torch.Tensor:
    """Gradient of the mean training loss w.r.t. the trainable tag table at step 0 (head fixed)."""
    s = lab.setup
    m = s.model
    m.train()  # the split path with grad (the base itself stays in eval mode)
    momentum, m.track_momentum = m.track_momentum, 0.0  # measuring must not move the feature mean
    # the gradient of the loss the recipe trains: heads centred on the batch (head_mode: batch)
    m.tags.trainable.grad = None
    exs = lab.train[:limit]
    for idx in sorted_batches(exs, 16):
        out = m(to_device(make_batch([exs[i] for i in idx], s.head_names(), s.pad_id), "cpu"))
        (out.loss * len(idx) / len(exs)).backward()
    m.track_momentum = momentum
    m.eval()
    return m.tags.trainable.grad.detach().clone()


def line_search(lab: Lab, args) -> dict:
    """Validation loss along -gradient: step sizes as the RMS change per tag coordinate."""
    lab.reset()
    g = train_gradient(lab, args.line_rows)
    d = g / g.pow(2).mean().sqrt()  # unit RMS per coordinate
    heads, spec = lab.setup.model.heads, lab.setup.model.heads.specs[lab.head]
    mu0, sd0 = heads.stats()[lab.head]
    w0 = heads.get(lab.head).detach().clone()
    rows = []
    for s in [0.0] + args.line_steps:
        lab.reset()
        with torch.no_grad():
            lab.setup.model.tags.trainable.add_(-s * d)
        ftr, ytr = features(lab, "train", args.line_rows)
        fva, yva = features(lab, "valid")

        def mse(w, mu, sd, f=fva, y=yva):
            raw = ((f - mu) / sd) @ w[0, :-1] + w[0, -1]
            return float(((raw - spec.standardise(y)[:, 0]) ** 2).mean())

        refit, _ = ridge_fit((ftr - mu0) / sd0, ytr, spec)
        rows.append(
            {
                "step_rms": s,
                "fixed": mse(w0, mu0, sd0),
                "recentred": mse(w0, ftr.mean(0), sd0),
                "refit": mse(refit, mu0, sd0),
                "feature_shift": float(((ftr.mean(0) - mu0) / sd0).pow(2).mean().sqrt()),
            }
        )
        print("line", json.dumps(rows[-1]), flush=True)
    lab.reset()
    return {"rows": rows, "adam_step_rms_per_lr": 1.0}


def refit_head(lab: Lab) -> None:
    """Closed-form head (ridge, lambda by CV) on the current features of every training row."""
    heads, spec = lab.setup.model.heads, lab.setup.model.heads.specs[lab.head]
    f, y = features(lab, "train")
    mu, sd = feature_stats(f)
    w, _ = ridge_fit((f - mu) / sd, y, spec)
    heads.set_stats(lab.head, mu, sd)
    with torch.no_grad():
        heads.get(lab.head).copy_(w)


def val_loss(lab: Lab) -> float:
    return evaluate(lab.setup, [lab.task], "valid", Quiet("cpu"), torch.device("cpu"))[lab.task.spec.name][
        "loss"
    ]


def varpro(lab: Lab, args) -> dict:
    """Full-batch gradient steps on the tag with the head re-fitted in closed form before each one
    (variable projection: by the envelope theorem this is the gradient of the best-linear-probe loss)."""
    lab.reset()
    m = lab.setup.model
    m.center_heads = False  # the head is exact for the current tags: no batch centring needed
    curve = []
    for t in range(args.varpro_steps + 1):
        refit_head(lab)
        curve.append({"step": t, "val": val_loss(lab)})
        print("varpro", json.dumps(curve[-1]), flush=True)
        if t == args.varpro_steps:
            break
        g = train_gradient(lab, args.line_rows)
        with torch.no_grad():
            m.tags.trainable.add_(-args.varpro_rms * g / g.pow(2).mean().sqrt())
    m.center_heads = lab.setup.cfg.head_mode == "batch"
    lab.reset()
    return {"step_rms": args.varpro_rms, "rows": args.line_rows, "curve": curve}


def experiments(lab: Lab, args) -> dict:
    ep = {"epochs": args.epochs, "eval_every": args.eval_every, "warmup_ratio": 0.03}
    out: dict = {}
    if "line" in args.only and lab.head is not None:
        out["line"] = line_search(lab, args)
    if "varpro" in args.only and lab.head is not None:
        out["varpro"] = varpro(lab, args)
    if "grid" in args.only:
        out["grid"] = [
            lab.run(f"lr={lr:g} head_lr={lr * f:g}", lr=lr, head_lr=lr * f, **ep)
            for lr in args.lrs
            for f in args.head_factors
        ]
    best = dict(lr=args.lr, head_lr=args.head_lr)
    if "track" in args.only:
        out["track"] = [
            lab.run(f"head_mode={c}", head_mode=c, **best, **ep) for c in ("fixed", "track", "batch")
        ]
    if "accum" in args.only:
        out["accum"] = [
            lab.run(
                f"batch={b}x{a}",
                batch_size=b,
                grad_accum=a,
                **best,
                **{**ep, "eval_every": max(1, args.eval_every * 8 // (b * a))},
            )
            for b, a in ((8, 1), (4, 8), (32, 1))
        ]
    if "probe" in args.only and lab.head is not None:
        out["probe"] = []
        for rows in (256, 0):
            setup = lab.setup
            setup.cfg = dataclasses.replace(setup.cfg, probe_rows=rows)
            setup.probe.clear()
            from tagray.train.setup import init_heads

            lab.reset()
            init_heads(setup, torch.device("cpu"))
            lab.snapshot()
            out["probe"].append(lab.run(f"probe_rows={rows or 'all'}", **best, **ep))
    for spec in args.run:  # ad-hoc runs: NAME=JSON overrides of the train config
        name, _, js = spec.partition("=")
        out.setdefault("custom", []).append(lab.run(name, **{**ep, **json.loads(js)}))
    if "epochs" in args.only:
        out["epochs"] = [lab.run(f"epochs={e}", **best, **{**ep, "epochs": e}) for e in args.long_epochs]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(p, task="qed", base="smollm2-135m")
    p.add_argument(
        "--init-from", default=None, help="tag set with the stage-1 domain tags (default: their init)"
    )
    add_options(
        p, rows=1000, valid=150, test=400, p=10, epochs=1.0, eval_every=25,
        lrs=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3], head_factors=[0.1, 1.0, 10.0], lr=1e-4, head_lr=1e-4,
        long_epochs=[2.0, 4.0], line_rows=256, line_steps=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
        varpro_steps=12, varpro_rms=2e-4,
    )  # fmt: skip
    p.add_argument("--run", action="append", default=[], help="extra run: NAME='{\"lr\": 1e-4}'")
    p.add_argument("--only", nargs="+", default=["line", "grid", "track", "accum", "probe", "epochs"])
    p.add_argument("--out", default=str(RESULTS / "diagnose.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t = time.time()
    lab = Lab(make_setup(args))
    res = {"args": vars(args), "probe": lab.setup.probe, "setup_seconds": round(time.time() - t, 1)}
    if lab.head is None:  # an LM task: what its domain tag must beat
        from tagray.train.evaluate import lm_references

        res["references"] = lm_references(lab.setup, lab.task, "valid", Quiet("cpu"), torch.device("cpu"))
        print("references", res["references"], flush=True)
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    res.update(experiments(lab, args))
    merged = {**prev, **res, "runs": {**prev.get("runs", {}), **{k: res[k] for k in args.only if k in res}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(merged, indent=1))
    print(f"wrote {args.out} ({time.time() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
