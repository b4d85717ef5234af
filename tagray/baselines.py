"""Standard expert baselines of a task with scikit-learn: what a learned tag has to beat.

On exactly the task's splits (:func:`tagray.tasks.dataset.build_task_data`, limits included): every
model is fitted on ``train``, its hyperparameters are chosen on ``valid``, and the chosen fit is scored
on ``test`` (never refitted on train + valid, so the test numbers compare with a tag trained on train).

- features (:mod:`tagray.tasks.features`): SMILES -> Morgan bits (radius 2, 2048) or RDKit 2D
  descriptors; proteins -> amino-acid + dipeptide composition; several fields -> blocks side by side.
  Descriptors and compositions are z-scored on train (clipped to +-10, missing -> the train mean).
- models: ridge / logistic regression and a random forest per feature family, plus ``mean``
  (the training mean, or the training class prior for classification).
- metrics: those of :mod:`tagray.core.metrics`, the same code the tags are scored with: regression on
  the first target column (as the evaluation does), classification from class probabilities.

Ray-free and JSON-serialisable (NaN becomes null)::

    result = fit_baselines(load_task("qed"))
    print(format_baselines(result))
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import torch

from .core.errors import ConfigError
from .core.metrics import classification_metrics, regression_metrics
from .tasks.dataset import SPLITS, TaskData, build_task_data
from .tasks.features import excluded_descriptors, families, feature_fields, featurize
from .tasks.spec import TaskSpec, load_task

# the first candidate of each grid is its default: the one kept when a task has no valid rows
RIDGE_ALPHAS = (1.0, 0.01, 0.1, 10.0, 100.0, 1000.0)
LOGREG_CS = (1.0, 0.01, 0.1, 10.0)
# random forests: sqrt(d) features per split always; a third of them too where d is small (descriptors,
# compositions), where it pays; on 2048 fingerprint bits it costs 5x the time for no gain
RF_LEAVES = (1, 3)
RF_WIDE_UNTIL = 1024
RF_TREES = 100
SPARSE_BELOW = 0.1  # a feature matrix with fewer non-zeros than this goes to the linear models as CSR
CLIP = 10.0


def _standardise(xs: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """z-score the ``mask`` columns with train statistics; NaN -> 0 (the mean); clip outliers (e.g. Ipc)."""
    tr = xs["train"][:, mask]
    mu = np.nanmean(tr, 0) if len(tr) else np.zeros(tr.shape[1])
    sd = np.nanstd(tr, 0) if len(tr) else np.ones(tr.shape[1])
    mu, sd = np.nan_to_num(mu), np.where(np.isfinite(sd) & (sd > 1e-12), sd, 1.0)
    out = {}
    for s, x in xs.items():
        x = x.copy()
        x[:, mask] = np.clip(np.nan_to_num((x[:, mask] - mu) / sd), -CLIP, CLIP)
        out[s] = np.nan_to_num(x)
    return out


def _candidates(kind: str, dims: int, seed: int, n_jobs: int) -> dict[str, list[tuple[dict, object]]]:
    """``{model: [(params, unfitted estimator)]}`` of the hyperparameter grid per model."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.linear_model import LogisticRegression, Ridge

    rf = RandomForestRegressor if kind == "regression" else RandomForestClassifier
    widths = ("sqrt", 0.33) if dims <= RF_WIDE_UNTIL else ("sqrt",)
    grid = [{"max_features": w, "min_samples_leaf": leaf} for w in widths for leaf in RF_LEAVES]
    forests = [(p, rf(n_estimators=RF_TREES, random_state=seed, n_jobs=n_jobs, **p)) for p in grid]
    if kind == "regression":
        return {"ridge": [({"alpha": a}, Ridge(alpha=a)) for a in RIDGE_ALPHAS], "rf": forests}
    lin = [({"C": c}, LogisticRegression(C=c, max_iter=2000)) for c in LOGREG_CS]
    return {"logreg": lin, "rf": forests}


def _clean(v):
    """JSON-safe: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


class _Scorer:
    """Metrics of predictions on a split, and the valid score that picks hyperparameters."""

    def __init__(self, spec: TaskSpec, ys: dict[str, np.ndarray]):
        self.spec, self.ys = spec, ys
        self.kind = spec.target.kind
        self.n_classes = len(spec.target.classes)
        self.positive = spec.target.positive_index if self.n_classes == 2 else 1
        self.select = "mse" if self.kind == "regression" else "roc_auc"

    def predict(self, model, x: np.ndarray) -> np.ndarray:
        if self.kind == "regression":
            return model.predict(x)
        p = np.zeros((len(x), self.n_classes))
        p[:, model.classes_.astype(int)] = model.predict_proba(x)  # classes absent from train stay 0
        return p

    def metrics(self, out: np.ndarray, split: str) -> dict | None:
        y = self.ys[split]
        if not len(y):
            return None
        if self.kind == "regression":
            return regression_metrics(torch.from_numpy(out), torch.from_numpy(y))
        return classification_metrics(torch.from_numpy(out), torch.from_numpy(y), self.positive)

    def better(self, a: dict, b: dict | None) -> bool:
        """Is valid metrics ``a`` better than ``b``? (lower MSE; higher ROC-AUC, then accuracy)."""
        if b is None:
            return True
        if self.kind == "regression":
            return a["mse"] < b["mse"]
        ka = (a["roc_auc"] if a["roc_auc"] == a["roc_auc"] else -1.0, a["accuracy"])
        kb = (b["roc_auc"] if b["roc_auc"] == b["roc_auc"] else -1.0, b["accuracy"])
        return ka > kb


def _fit_model(scorer: _Scorer, grid: list, xs: dict[str, np.ndarray]) -> dict:
    """Fit each candidate on train and keep the best on valid; without valid rows, the first (default)."""
    t = time.perf_counter()
    has_valid = len(scorer.ys["valid"]) > 0
    best, best_valid, tried = None, None, []
    for params, est in grid if has_valid else grid[:1]:
        est.fit(xs["train"], scorer.ys["train"])
        v = scorer.metrics(scorer.predict(est, xs["valid"]), "valid") if has_valid else None
        tried.append({"params": params, "valid": v})
        if best is None or (v is not None and scorer.better(v, best_valid)):
            best, best_valid = (params, est), v
    params, est = best
    return {
        "params": params,
        "valid": best_valid,
        "test": scorer.metrics(scorer.predict(est, xs["test"]), "test"),
        "grid": tried,
        "seconds": time.perf_counter() - t,
    }


def _fit_family(scorer: _Scorer, fam: str, xs: dict, only, seed: int, n_jobs: int) -> dict[str, dict]:
    """Every model of one feature family; linear models get sparse matrices where the data is sparse."""
    import scipy.sparse

    dims = int(xs["train"].shape[1])
    sparse = bool(len(xs["train"])) and np.count_nonzero(xs["train"]) < SPARSE_BELOW * xs["train"].size
    out = {}
    for m, grid in _candidates(scorer.kind, dims, seed, n_jobs).items():
        if only is not None and f"{fam}/{m}" not in only:
            continue
        x = {s: scipy.sparse.csr_matrix(v) for s, v in xs.items()} if sparse and m != "rf" else xs
        out[f"{fam}/{m}"] = {"features": fam, "model": m, "dims": dims, **_fit_model(scorer, grid, x)}
    return out


def _mean_model(scorer: _Scorer) -> dict:
    ytr = scorer.ys["train"]
    if scorer.kind == "regression":
        const = np.array(float(ytr.mean()))
        out = {s: np.full(len(scorer.ys[s]), float(const)) for s in ("valid", "test")}
    else:
        prior = np.bincount(ytr.astype(int), minlength=scorer.n_classes) / len(ytr)
        out = {s: np.tile(prior, (len(scorer.ys[s]), 1)) for s in ("valid", "test")}
    res = {"params": {}, "seconds": 0.0}
    for s in ("valid", "test"):
        m = scorer.metrics(out[s], s)
        if m is not None and scorer.kind == "regression":
            m.update(pearson=float("nan"), spearman=float("nan"))  # undefined for a constant prediction
        res[s] = m
    return res


def _targets(spec: TaskSpec, data: TaskData) -> dict[str, np.ndarray]:
    dt = np.float64 if spec.target.kind == "regression" else np.int64
    return {s: np.array([r["_target"][0] for r in data.splits[s]], dtype=dt) for s in SPLITS}


def fit_baselines(
    task: TaskSpec | str | dict,
    data: TaskData | None = None,
    *,
    seed: int = 0,
    n_jobs: int = -1,
    only: list[str] | None = None,
    limit: int | None = None,
) -> dict:
    """Fit, select and score every baseline of a regression / classification task.

    Args:
        task: a :class:`TaskSpec`, builtin task name, task YAML path or inline dict.
        data: the task's rows (default: :func:`build_task_data` of the task, cached per process).
        seed: random-forest seed. n_jobs: random-forest worker threads (-1: every core).
        only: a subset of model names (e.g. ``["mean", "morgan/ridge"]``); default: all.
        limit: score only the first ``limit`` valid / test rows (what ``tagray eval --limit`` scores).

    Returns:
        JSON-serialisable ``{"task", "kind", "rows", "models": {name: {"valid", "test", "params", ...}},
        "best", "select_metric", "seconds", ...}``.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    spec = task if isinstance(task, TaskSpec) else load_task(task)
    if spec.target.kind not in ("regression", "classification"):
        raise ConfigError(
            f"task {spec.name}.target.kind", "baselines need a regression or classification task"
        )
    data = data or build_task_data(spec)
    if limit:
        data = replace(
            data, splits={s: rows if s == "train" else rows[:limit] for s, rows in data.splits.items()}
        )
    spec = data.spec  # classes may have been read from the data
    scorer = _Scorer(spec, _targets(spec, data))
    if spec.target.kind == "classification" and len(set(scorer.ys["train"].tolist())) < 2:
        raise ConfigError(f"task {spec.name}.target.column", "the train split holds a single class")
    models: dict[str, dict] = {}
    if only is None or "mean" in only:
        models["mean"] = {"features": None, "model": "mean", **_mean_model(scorer)}
    feat_s = 0.0
    for fam in families(spec):
        if only is not None and not any(o.startswith(f"{fam}/") for o in only):
            continue
        t = time.perf_counter()
        xs, mask = {}, None
        for s in SPLITS:
            xs[s], mask = featurize(spec, data.splits[s], fam)
        xs = _standardise(xs, mask)
        feat_s += time.perf_counter() - t
        models.update(_fit_family(scorer, fam, xs, only, seed, n_jobs))
    best = None
    for name, r in models.items():
        if r["valid"] is not None and (best is None or scorer.better(r["valid"], models[best]["valid"])):
            best = name
    return _clean(
        {
            "task": spec.name,
            "kind": spec.target.kind,
            "target": spec.target.columns[0] if spec.target.kind == "regression" else spec.target.column,
            "classes": list(spec.target.classes) or None,
            "positive": spec.target.classes[scorer.positive] if scorer.n_classes == 2 else None,
            "rows": {s: len(data.splits[s]) for s in SPLITS},
            "dropped": data.dropped,
            "split": data.split_info.get("kind", "key"),
            "fields": feature_fields(spec),
            "excluded_descriptors": list(excluded_descriptors(spec)),
            "select_metric": scorer.select,
            "models": models,
            "best": best,
            "seed": seed,
            "seconds": {
                "features": feat_s,
                "total": time.perf_counter() - t0,
                "cpu": time.process_time() - c0,
            },
        }
    )


def format_baselines(result: dict) -> str:
    """A plain-text table of :func:`fit_baselines`' test metrics (valid score in the first column)."""
    reg = result["kind"] == "regression"
    cols = ["mse", "mae", "pearson", "spearman"] if reg else ["accuracy", "roc_auc", "f1"]
    sel = result["select_metric"]
    r = result["rows"]
    params = {
        n: ", ".join(f"{k}={v}" for k, v in m["params"].items()) or "-" for n, m in result["models"].items()
    }
    w = max(len(p) for p in params.values()) + 2
    lines = [
        f"task {result['task']} ({result['kind']}, target {result['target']}): "
        f"train {r['train']} / valid {r['valid']} / test {r['test']} rows, {result['split']} split"
        + (f", {result['dropped']} dropped" if result["dropped"] else ""),
        f"{'model':<22}{'params':<{w}}{'valid ' + sel:>13}" + "".join(f"{'test ' + c:>14}" for c in cols),
    ]

    def num(v) -> str:
        return "-" if v is None else f"{v:.4f}"

    for name, m in result["models"].items():
        valid, test = m["valid"] or {}, m["test"] or {}
        star = " *" if name == result["best"] else ""
        lines.append(
            f"{name + star:<22}{params[name]:<{w}}{num(valid.get(sel)):>13}"
            + "".join(f"{num(test.get(c)):>14}" for c in cols)
        )
    sec = result["seconds"]
    cpu = f", {sec['cpu']:.0f}s CPU" if "cpu" in sec else ""
    lines.append(f"* best on valid {sel}; {sec['total']:.0f}s wall{cpu}")
    return "\n".join(lines)
