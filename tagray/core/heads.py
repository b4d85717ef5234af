"""Heads: linear read-outs ``d -> out_dim`` of a function tag's last hidden state, and their targets.

Regression targets are standardised with training statistics (so one learning rate fits every task) and
mapped back by :meth:`HeadBank.decode`; classification heads give logits. Heads are packed like tags (one
trainable table, DDP-safe) and read hidden states standardised per dimension (see :class:`HeadBank`).
:func:`ridge_fit` gives the closed-form linear-probe solution used to initialise (and re-fit) a head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .tags import PackedTable


@dataclass(frozen=True)
class HeadSpec:
    """Metadata of a head: ``kind`` is ``regression`` or ``classification``.

    Regression targets are standardised with the training set's ``mean``/``std`` (stored here) so one
    learning rate fits every task; predictions are mapped back to the original units.
    """

    kind: str
    out_dim: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()
    # What the head saw in training (regression), for the out-of-distribution flags of served answers:
    # per-column target min / max, the task's declared value range (predictions are clipped to it), and
    # the min / max number of characters of the input fields. Not part of equality: two tasks training
    # one head share its targets, not their row ranges.
    lo: tuple[float, ...] = field(default=(), compare=False)
    hi: tuple[float, ...] = field(default=(), compare=False)
    clip: tuple[float, float] | None = field(default=None, compare=False)
    input_chars: tuple[int, int] | None = field(default=None, compare=False)

    def to_json(self) -> dict:
        out = {
            "kind": self.kind,
            "out_dim": self.out_dim,
            "mean": list(self.mean),
            "std": list(self.std),
            "classes": list(self.classes),
        }
        if self.lo:
            out.update(lo=list(self.lo), hi=list(self.hi))
        if self.clip is not None:
            out["clip"] = list(self.clip)
        if self.input_chars is not None:
            out["input_chars"] = list(self.input_chars)
        return out

    def ood(self, value: torch.Tensor, chars: int | None) -> list[str]:
        """Why an answer lies outside what the head was trained on (empty: inside). ``value``: ``(out_dim,)``
        in target units, before clipping; ``chars``: characters of the request's input fields."""
        vals, why = value.tolist(), []
        if self.lo and any(v < lo or v > hi for v, lo, hi in zip(vals, self.lo, self.hi, strict=True)):
            why.append("prediction outside the training targets' range")
        if self.clip is not None and any(v < self.clip[0] or v > self.clip[1] for v in vals):
            why.append(f"prediction outside the task's range {list(self.clip)} (clipped)")
        if self.input_chars is not None and chars is not None:
            lo, hi = self.input_chars
            if not lo <= chars <= hi:
                why.append(f"input length {chars} outside the training inputs' {lo}-{hi} characters")
        return why

    @classmethod
    def from_json(cls, d: Mapping) -> HeadSpec:
        return cls(
            d["kind"],
            int(d["out_dim"]),
            tuple(d.get("mean", ())),
            tuple(d.get("std", ())),
            tuple(d.get("classes", ())),
            tuple(d.get("lo", ())),
            tuple(d.get("hi", ())),
            tuple(d["clip"]) if d.get("clip") is not None else None,
            tuple(d["input_chars"]) if d.get("input_chars") is not None else None,
        )

    def standardise(self, y: torch.Tensor) -> torch.Tensor:
        """Regression targets ``(N, k)`` in their units -> what the head is trained to output."""
        return (y - y.new_tensor(self.mean)) / y.new_tensor(self.std)

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw head outputs ``(N, out_dim)`` -> target units (regression) or class probabilities."""
        if self.kind == "regression":
            return raw * raw.new_tensor(self.std) + raw.new_tensor(self.mean)
        return torch.softmax(raw, -1)

    def loss(self, raw: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-row loss ``(N,)``: MSE on standardised targets, or cross-entropy on the class index."""
        if self.kind == "regression":
            return F.mse_loss(raw, self.standardise(y[:, : self.out_dim]), reduction="none").mean(1)
        return F.cross_entropy(raw, y[:, 0].long(), reduction="none")

    def point(self, raw: torch.Tensor) -> torch.Tensor:
        """One number per output column ``(N, out_dim or 1)``: values, or the predicted class index."""
        if self.kind == "regression":
            return self.decode(raw)
        return raw.argmax(1, keepdim=True).to(raw.dtype)


class HeadBank(PackedTable):
    """Linear heads ``d -> out_dim`` keyed by function-tag name, packed as rows ``[W | b]`` of width d+1.

    Each head reads the hidden state standardised per dimension with statistics ``(mu, sd)`` measured on
    training rows when the head is created: ``y = W (h - mu) / sd + b``, still a linear head. Why: LM
    hidden states have a few huge "massive activation" dimensions (SmolLM2: mean |h| 1.25, per-dimension
    std 0.15), which make a raw linear head very ill-conditioned for Adam.

    All heads are evaluated for every selected row (a few extra dot products) so DDP always sees every
    trainable head used; each row then reads its own slice.
    """

    def __init__(
        self,
        heads: Mapping[str, torch.Tensor],
        specs: Mapping[str, HeadSpec],
        d_model: int,
        trainable: set[str] | None = None,
        stats: Mapping[str, torch.Tensor] | None = None,
    ):
        super().__init__(heads, set(trainable or ()), width=d_model + 1)
        self.specs = dict(specs)
        missing = set(heads) - set(specs)
        if missing:
            raise ConfigError("heads", f"no spec for {sorted(missing)}")
        # per table row: feature mean and std (2, rows, d); identity (0, 1) when none were given
        mu = torch.zeros(self.table().shape[0], d_model)
        sd = torch.ones(self.table().shape[0], d_model)
        for n, st in (stats or {}).items():
            if n in self.slots:
                mu[self.cols(n)] = st[0].float()
                sd[self.cols(n)] = st[1].float().clamp_min(1e-4)
        self.register_buffer("feat_mu", mu, persistent=False)
        self.register_buffer("feat_sd", sd, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (N, d)`` -> raw outputs of every head ``(N, rows)``; pick columns with :meth:`cols`."""
        t = self.table().to(hidden.dtype)
        w = t[:, :-1] / self.feat_sd.to(hidden.dtype)  # (R, d)
        return hidden @ w.T - (w * self.feat_mu.to(hidden.dtype)).sum(1) + t[:, -1]

    def read(
        self,
        hidden: torch.Tensor,
        head_idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        center: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Point predictions and losses of rows that each read their own head.

        Args:
            hidden: ``(N, d)`` features under each row's function tag.
            head_idx: ``(N,)`` index into :attr:`names` per row.
            targets: ``(N, k)`` targets in their units (class index for classification), or None.
            center: read features centred on their mean over this call's rows of the same head instead of
                the stored mean (BatchNorm's training mode). Why: moving a tag shifts the features of every
                input by almost the same vector, and a head with a fixed centre reads that shift as a bias
                error so large that it dominates the loss's curvature (docs/training.md, line search).
                Centred on the batch, the loss and its gradients ignore common shifts and follow what
                distinguishes inputs; the stored centre is re-measured before every evaluation.

        Returns:
            ``preds (N, k)`` in target units (NaN-padded past a head's width), ``loss (N,)`` or None, and
            ``probs (N, C)``: class probabilities of classification rows (NaN elsewhere and past a head's
            classes), or None when no head classifies.
        """
        out = self(hidden.float())  # (N, R)
        k = max((s.out_dim if s.kind == "regression" else 1) for s in self.specs.values())
        preds = out.new_full((len(hidden), k), float("nan"))
        loss = out.new_zeros(len(hidden)) if targets is not None else None
        C = max((s.out_dim for s in self.specs.values() if s.kind == "classification"), default=0)
        probs = out.new_full((len(hidden), C), float("nan")) if C else None
        bias = self.table()[:, -1]
        for hi in head_idx.unique().tolist():
            name = self.names[hi]
            spec, m = self.specs[name], head_idx == hi
            raw = out[m][:, self.cols(name)]
            if center:  # W (h - mean_batch h) / sd + b: linear head, so centre its outputs
                raw = raw - raw.mean(0, keepdim=True) + bias[self.cols(name)].to(raw.dtype)
            p = spec.point(raw).detach()
            preds[m] = torch.cat([p, p.new_full((len(p), k - p.shape[1]), float("nan"))], 1)
            if spec.kind == "classification":
                q = spec.decode(raw).detach()
                probs[m] = torch.cat([q, q.new_full((len(q), C - q.shape[1]), float("nan"))], 1)
            if targets is not None:
                loss = loss.masked_scatter(m, spec.loss(raw, targets[m]))
        return preds, loss, probs

    @torch.no_grad()
    def track_mean(self, h: torch.Tensor, head_idx: torch.Tensor, momentum: float) -> None:
        """Move each trainable head's feature mean toward this batch's: ``mu += m (mean(h) - mu)``.

        ``h (N, d)`` are the features the heads read, ``head_idx (N,)`` each row's head. Why: a tag update
        shifts the hidden state at the function tag by almost the same vector for every input, which a
        fixed-statistics head reads as a bias error; tracking the mean, as BatchNorm does, absorbs the
        common shift. Under DDP the batch means are all-reduced, so every rank keeps identical statistics.
        """
        names = self.names
        train = [i for i, n in enumerate(names) if self.slots[n].trainable]
        if not train:
            return
        sums = h.new_zeros(len(names), h.shape[1] + 1, dtype=torch.float32)
        sums.index_add_(0, head_idx, torch.cat([h.float(), h.new_ones(len(h), 1, dtype=torch.float32)], 1))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        for i in train:
            n = int(sums[i, -1])
            if n:
                c = self.cols(names[i])
                self.feat_mu[c] += momentum * (sums[i, :-1] / n - self.feat_mu[c])

    def set_stats(self, name: str, mu: torch.Tensor, sd: torch.Tensor) -> None:
        with torch.no_grad():
            self.feat_mu[self.cols(name)] = mu.to(self.feat_mu)
            self.feat_sd[self.cols(name)] = sd.to(self.feat_sd).clamp_min(1e-4)

    def stats(self) -> dict[str, torch.Tensor]:
        """name -> ``(2, d)`` stacked (mu, sd) of its first row (all rows of a head share them)."""
        return {
            n: torch.stack([self.feat_mu[s.start], self.feat_sd[s.start]]).cpu().contiguous()
            for n, s in self.slots.items()
        }

    def cols(self, name: str) -> slice:
        s = self.slots[name]
        return slice(s.start, s.start + s.rows)


# ---- initialisation -------------------------------------------------------------------------------


@torch.no_grad()
def head_init(
    embedding: torch.Tensor, out_dim: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Head rows ``(out_dim, d+1)``: small weights along the mean-embedding direction plus noise, bias 0.

    Bias 0 on standardised targets means the untrained head predicts the training mean (the paper's init).
    """
    e = embedding.detach().float()
    d = e.shape[1]
    direction = e.mean(0) / e.mean(0).norm().clamp_min(1e-12)
    w = 0.01 * direction.expand(out_dim, -1) + torch.randn(out_dim, d, generator=generator) * (0.01 / d**0.5)
    return torch.cat([w, torch.zeros(out_dim, 1)], dim=1)


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std ``(d,)`` of features ``(n, d)``; tiny stds floored at a tenth of the
    median, so a near-constant dimension cannot amplify small feature drifts later."""
    mu = feats.mean(0)
    sd = feats.std(0) if len(feats) > 1 else torch.ones(feats.shape[1])
    return mu, sd.clamp_min(0.1 * float(sd.median())).clamp_min(1e-4)


RIDGE_LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def ridge_targets(y: torch.Tensor, spec: HeadSpec) -> torch.Tensor:
    """What ridge regresses on ``(n, k)`` float64: standardised targets, or one-hot classes (least squares)."""
    if spec.kind == "regression":
        return spec.standardise(y.double())
    return F.one_hot(y[:, 0].long(), spec.out_dim).double()


def ridge_fit(
    z: torch.Tensor, y: torch.Tensor, spec: HeadSpec, seed: int = 0, folds: int = 5
) -> tuple[torch.Tensor, float]:
    """Least-squares head rows ``(out_dim, d+1)`` on standardised features ``z (n, d)``, and its lambda.

    Regression targets are standardised as the loss sees them; classes become one-hot (a least-squares
    classifier). The ridge strength is chosen by k-fold cross-validation on a seeded random permutation
    of the rows, never on an ordered slice (rows often arrive sorted, e.g. by length).
    """
    z64, t64 = z.double(), ridge_targets(y, spec)
    n, d = z64.shape
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(n, dtype=torch.long)
    fold[perm] = torch.arange(n) % max(2, min(folds, n))
    eye = torch.eye(d, dtype=torch.float64)

    def solve(a, b, lam):
        am, bm = a.mean(0), b.mean(0)
        w = torch.linalg.solve((a - am).T @ (a - am) + lam * eye, (a - am).T @ (b - bm))
        return w, bm - am @ w

    def cv(lam):
        err = 0.0
        for f in fold.unique():
            tr, te = fold != f, fold == f
            w, b = solve(z64[tr], t64[tr], lam)
            err += float(((z64[te] @ w + b - t64[te]) ** 2).sum())
        return err / n

    lam = min(RIDGE_LAMBDAS, key=cv)
    w, b = solve(z64, t64, lam)  # (d, k), (k,)
    return torch.cat([w.T, b[:, None]], 1).float(), lam
