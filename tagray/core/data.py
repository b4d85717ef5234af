"""Batches: collate encoded rows into padded tensors, and length-bucketed sampling.

Real inputs vary in length (SMILES 40-300 tokens, proteins more); batches padded to their longest row
waste compute on padding. :class:`BucketBatchSampler` groups rows of similar length (deterministic per
seed and epoch), which the benchmark in ``bench/`` measures against random padded batches.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch

from .template import IGNORE, Encoded


def collate(
    rows: Sequence[Encoded],
    head_names: Sequence[str] = (),
    targets: Sequence | None = None,
    pad_id: int = 0,
    left_pad: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad encoded rows into a batch.

    Returns:
        ``input_ids, tag_rows, labels, span, attention_mask``: ``(B, T)``; ``head_pos, head_idx``: ``(B,)``
        (``-1`` where a row has no head); ``targets``: ``(B, k)`` float when ``targets`` are given.
        Rows are right-padded unless ``left_pad`` (generation prompts).
    """
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tag_rows = torch.full((B, T), -1, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    span = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    head_pos = torch.full((B,), -1, dtype=torch.long)
    head_idx = torch.full((B,), -1, dtype=torch.long)
    index = {n: i for i, n in enumerate(head_names)}
    for b, r in enumerate(rows):
        n = len(r)
        sl = slice(T - n, T) if left_pad else slice(0, n)
        ids[b, sl] = torch.tensor(r.ids)
        tag_rows[b, sl] = torch.tensor(r.tag_rows)
        labels[b, sl] = torch.tensor(r.labels)
        span[b, sl] = torch.tensor(r.span)
        mask[b, sl] = 1
        if r.head is not None and r.head in index:
            head_pos[b] = r.head_pos + (T - n if left_pad else 0)
            head_idx[b] = index[r.head]
    batch = {
        "input_ids": ids,
        "tag_rows": tag_rows,
        "labels": labels,
        "span": span,
        "attention_mask": mask,
        "head_pos": head_pos,
        "head_idx": head_idx,
    }
    if targets is not None:
        k = max((len(t) for t in targets if t is not None), default=1)
        tg = torch.full((B, k), float("nan"))
        for b, t in enumerate(targets):
            if t is not None:
                tg[b, : len(t)] = torch.tensor(t, dtype=torch.float32)
        batch["targets"] = tg
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class BucketBatchSampler:
    """Yields lists of indices whose rows have similar lengths.

    Shuffles, cuts the order into windows of ``bucket_factor * batch_size`` rows, sorts each window by
    length and cuts it into batches, then shuffles the batches. With ``groups`` (one id per row, e.g. the
    task), every batch holds rows of one group and the groups' batches interleave. ``num_replicas``/``rank``
    shard batches for data parallelism (every rank gets the same number of batches, as DDP needs).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        bucket_factor: int = 50,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        bucketing: bool = True,
        groups: Sequence[int] | None = None,
    ):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.bucket_factor = bucket_factor
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.bucketing = bucketing
        self.groups = list(groups) if groups is not None else [0] * len(self.lengths)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _group_batches(self, order: list[int]) -> list[list[int]]:
        batches = []
        window = self.batch_size * (self.bucket_factor if self.bucketing else 1)
        for w in range(0, len(order), window):
            chunk = order[w : w + window]
            if self.bucketing:
                chunk.sort(key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        batches = []
        for g in sorted(set(self.groups)):
            batches += self._group_batches([i for i in order if self.groups[i] == g])
        if self.shuffle and (self.bucketing or len(set(self.groups)) > 1):
            rng.shuffle(batches)
        per_rank = math.ceil(len(batches) / self.num_replicas) if batches else 0
        batches += batches[: per_rank * self.num_replicas - len(batches)]  # pad so all ranks step equally
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def padding_efficiency(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Useful (non-padding) tokens / padded tokens over ``batches``."""
    useful = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return useful / max(padded, 1)
