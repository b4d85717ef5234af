"""Rows -> encoded examples -> padded batches, for training, evaluation and the head probe."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..core.data import collate
from ..core.errors import InputError
from ..core.tags import TagBank
from ..core.template import Encoded, TemplateEncoder
from ..tasks.dataset import TaskData
from ..tasks.spec import TaskSpec

log = logging.getLogger("tagray")


def encoder_for(
    spec: TaskSpec, tokenizer, bank: TagBank, rename=None, drop_tags: bool = False
) -> TemplateEncoder:
    """The task's template against ``bank``'s tag layout."""
    return TemplateEncoder(
        tokenizer,
        spec.template,
        bank.slots,
        char_fields=spec.char_fields,
        lm_field=spec.target.field,
        lm_eos=spec.target.eos,
        head_tag=spec.head_tag,
        function_tag=spec.function_tag,
        rename=rename,
        max_length=spec.max_length,
        drop_tags=drop_tags,
    )


@dataclass
class Example:
    enc: Encoded
    target: list[float] | None
    task: int  # index of the task in the list it was encoded from


def encode_rows(
    tasks: list[TaskData],
    tokenizer,
    bank: TagBank,
    split: str,
    limit: int | None = None,
    drop_tags: bool = False,
) -> list[Example]:
    """Encoded rows of ``split`` of every task; rows over ``max_length`` are skipped and counted."""
    out = []
    for i, td in enumerate(tasks):
        enc = encoder_for(td.spec, tokenizer, bank, drop_tags=drop_tags)
        rows = td.splits[split][:limit] if limit else td.splits[split]
        skipped = 0
        for r in rows:
            try:
                out.append(Example(enc.encode(r), r.get("_target"), i))
            except InputError:
                skipped += 1  # never silently truncated
        if skipped:
            log.info(
                "task %s/%s: %d rows over max_length %d skipped",
                td.spec.name,
                split,
                skipped,
                td.spec.max_length,
            )
    return out


def make_batch(exs: list[Example], head_names, pad_id: int) -> dict:
    return collate([e.enc for e in exs], head_names, [e.target for e in exs], pad_id=pad_id)


def sorted_batches(exs: list[Example], batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Length-sorted batches (little padding) of ``exs``, this rank's share (every ``world``-th batch)."""
    order = sorted(range(len(exs)), key=lambda i: len(exs[i].enc))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return batches[rank::world]
