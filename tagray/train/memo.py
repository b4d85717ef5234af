"""Head features of training rows remembered at one state of the trainable tags.

Why: with ``head_mode: varpro`` a stage reads every training row's features at the *same* tags several
times: the probe pass of the setup and the head re-fit before the step-0 validation; a step's acceptance
check and the next step's first pass (or the re-fit before the next validation). Each read is a suffix
forward per row, the bulk of a stage-2 step or a search trial once the prefix store holds the prefixes.
The features depend only on the row, the trainable tags (the frozen tags and the base do not change
within a stage) and the autocast dtype, so a read at an unchanged state returns the remembered ones.

The key is a hash of the trainable tag table's bytes, so any change to it (a step, an undone step, the
best state restored) is seen without the trainer having to say so. Two states are kept: a rejected
varpro step restores the state before it, whose features were just replaced. Off when the model has no
prefix store (``prefix: off``, FSDP: every FSDP forward is a collective, ranks must not skip different
ones).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch

KEEP = 2  # tag states remembered (see the module docstring)


class FeatureMemo:
    """``{tag state: {id(row encoding): features (d,)}}`` for the rows of one setup (which keeps the
    encodings alive, so their ids are stable)."""

    def __init__(self):
        self.states: OrderedDict[tuple, dict[int, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(model, autocast: torch.dtype | None) -> tuple | None:
        if model.prefix_store is None:
            return None
        t = model.tags.trainable.detach()
        h = hashlib.blake2b(t.to("cpu", torch.float32).contiguous().numpy().tobytes(), digest_size=16)
        return (h.hexdigest(), tuple(t.shape), str(autocast))

    def get(self, model, rows: list, autocast=None) -> torch.Tensor | None:
        """Features ``(len(rows), d)`` of ``rows`` (``Example``s) at the model's tags, if every one is known."""
        k = self.key(model, autocast)
        known = self.states.get(k) if k is not None else None
        if known is None or any(id(e.enc) not in known for e in rows):
            self.misses += len(rows)
            return None
        self.states.move_to_end(k)
        self.hits += len(rows)
        return torch.stack([known[id(e.enc)] for e in rows])

    def read(self, model, rows: list, compute: Callable[[], torch.Tensor], autocast=None) -> torch.Tensor:
        """Features of ``rows`` at the model's tags: remembered, or ``compute()`` (float32, CPU) and kept."""
        f = self.get(model, rows, autocast)
        if f is None:
            f = compute()
            self.put(model, rows, f, autocast)
        return f

    def put(self, model, rows: list, feats: torch.Tensor, autocast=None) -> None:
        """Remember ``feats (len(rows), d)`` (float32, CPU) of ``rows`` at the model's tags."""
        k = self.key(model, autocast)
        if k is None:
            return
        known = self.states.setdefault(k, {})
        self.states.move_to_end(k)
        for e, f in zip(rows, feats.detach(), strict=True):
            known[id(e.enc)] = f
        while len(self.states) > KEEP:
            self.states.popitem(last=False)
