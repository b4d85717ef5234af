"""Tag banks: named ``p x d`` tags packed into one trainable table (heads reuse the packing, see heads.py).

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

    @property
    def first_trainable_row(self) -> int:
        """Rows of the virtual table at or above this index are trainable (frozen rows come first)."""
        return self.frozen.shape[0]

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
