"""Tag and head banks: named ``p x d`` tags and linear heads, packed into one trainable table each.

Why packed: under DDP every step must touch the same trainable parameters, otherwise a batch that
lacks some tag raises "Expected to have finished reduction". One ``(rows, width)`` parameter for all
trainable tags (and one for all trainable heads) is always used. Frozen entries (earlier stages) live
in a buffer, so they cannot change and are not in the optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, UnknownTagError


@dataclass(frozen=True)
class Slot:
    """Where one named entry lives: ``rows`` rows starting at ``start`` of the virtual table."""

    start: int
    rows: int
    trainable: bool


class PackedTable(nn.Module):
    """Named blocks of rows; the virtual table is ``cat([frozen, trainable])``.

    Args:
        entries: name -> tensor ``(rows, width)``, in a fixed order.
        trainable: names whose rows are trained; the others are frozen buffers.
    """

    def __init__(self, entries: Mapping[str, torch.Tensor], trainable: set[str], width: int):
        super().__init__()
        unknown = set(trainable) - set(entries)
        if unknown:
            raise UnknownTagError("train_tags", f"not in this bank: {sorted(unknown)}")
        self.width = width
        frozen = [n for n in entries if n not in trainable]
        train = [n for n in entries if n in trainable]
        self.slots: dict[str, Slot] = {}
        row = 0
        for names, is_train in ((frozen, False), (train, True)):
            for n in names:
                t = entries[n]
                if t.dim() != 2 or t.shape[1] != width:
                    raise ConfigError(n, f"expected shape (rows, {width}), got {tuple(t.shape)}")
                self.slots[n] = Slot(row, t.shape[0], is_train)
                row += t.shape[0]
        cat = lambda ns: (  # noqa: E731
            torch.cat([entries[n].detach().float() for n in ns]) if ns else torch.zeros(0, width)
        )
        self.register_buffer("frozen", cat(frozen), persistent=False)
        self.trainable = nn.Parameter(cat(train), requires_grad=bool(train))

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def table(self) -> torch.Tensor:
        """The whole virtual table ``(rows, width)``; gradients flow into the trainable part only."""
        if self.trainable.numel() == 0:  # serving: everything frozen, no copy per forward pass
            return self.frozen
        return torch.cat([self.frozen.to(self.trainable.dtype), self.trainable])

    def get(self, name: str) -> torch.Tensor:
        """The rows of one entry ``(rows, width)`` (a view; detached for frozen entries)."""
        if name not in self.slots:
            raise UnknownTagError("tag", f"unknown {name!r}; known: {self.names}")
        s = self.slots[name]
        src = self.trainable if s.trainable else self.frozen
        off = s.start - (0 if not s.trainable else self.frozen.shape[0])
        return src[off : off + s.rows]

    def state(self) -> dict[str, torch.Tensor]:
        """name -> a detached, contiguous CPU copy of its rows (for saving)."""
        return {n: self.get(n).detach().to("cpu", torch.float32).contiguous().clone() for n in self.slots}


class TagBank(PackedTable):
    """Named tags, each ``(p, d)``; spliced into the input embeddings at their template positions."""

    def __init__(self, tags: Mapping[str, torch.Tensor], trainable: set[str] | None = None):
        d = next(iter(tags.values())).shape[1] if tags else 0
        super().__init__(tags, set(trainable or ()), width=d)

    def length(self, name: str) -> int:
        return self.slots[name].rows


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

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "out_dim": self.out_dim,
            "mean": list(self.mean),
            "std": list(self.std),
            "classes": list(self.classes),
        }

    @classmethod
    def from_json(cls, d: Mapping) -> HeadSpec:
        return cls(
            d["kind"],
            int(d["out_dim"]),
            tuple(d.get("mean", ())),
            tuple(d.get("std", ())),
            tuple(d.get("classes", ())),
        )


class HeadBank(PackedTable):
    """Linear heads ``d -> out_dim`` keyed by function-tag name, packed as rows ``[W | b]`` of width d+1.

    Each head reads the hidden state standardised per dimension with fixed statistics ``(mu, sd)``
    (measured on training rows when the head is created): ``y = W (h - mu) / sd + b``, still a linear
    head. Why: LM hidden states have a few huge "massive activation" dimensions (SmolLM2: mean |h| 1.25,
    per-dimension std 0.15), which make a raw linear head very ill-conditioned for Adam.

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

    @torch.no_grad()
    def track_mean(self, h: torch.Tensor, head_idx: torch.Tensor, momentum: float) -> None:
        """Move each trainable head's feature mean toward this batch's: ``mu += m (mean(h) - mu)``.

        ``h (N, d)`` are the features the heads read, ``head_idx (N,)`` each row's head (an index into
        :attr:`names`). Why: a tag update shifts the hidden state at the function tag by almost the same
        vector for every input (measured on SmolLM2: a 0.005 step per coordinate moves the features by half
        their spread across inputs), which a fixed-statistics head reads as a large bias error. Tracking the
        mean, as BatchNorm does, absorbs the common shift. Under DDP the batch means are all-reduced, so every
        rank keeps identical statistics. Frozen heads (earlier stages) never change.
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
def mean_embedding_init(
    embedding: torch.Tensor, length: int, noise: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The paper's tag init: every vector = the mean token embedding, rescaled to the average token norm.

    Args:
        embedding: the base's input embedding matrix ``(V, d)``.
        length: p, the number of vectors in the tag.
        noise: relative std of a small perturbation so the p vectors are not identical (0 = paper).

    Returns:
        ``(p, d)`` float32 tensor; never zeros (zero tags get no gradient through attention).
    """
    e = embedding.detach().float()
    mean = e.mean(0)
    avg_norm = e.norm(dim=1).mean()
    v = mean / mean.norm().clamp_min(1e-12) * avg_norm
    tag = v.expand(length, -1).clone()
    if noise > 0:
        tag += torch.randn(tag.shape, generator=generator) * noise * avg_norm / e.shape[1] ** 0.5
    return tag


@torch.no_grad()
def head_init(
    embedding: torch.Tensor, out_dim: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Head rows ``(out_dim, d+1)``: small weights along the mean-embedding direction plus noise, bias 0.

    Bias 0 on standardised targets means the untrained head predicts the training mean.
    """
    e = embedding.detach().float()
    d = e.shape[1]
    direction = e.mean(0) / e.mean(0).norm().clamp_min(1e-12)
    w = 0.01 * direction.expand(out_dim, -1) + torch.randn(out_dim, d, generator=generator) * (0.01 / d**0.5)
    return torch.cat([w, torch.zeros(out_dim, 1)], dim=1)
