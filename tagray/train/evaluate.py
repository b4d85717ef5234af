"""Metrics of the current tags on a split, shared across data-parallel ranks.

Each rank scores every ``world``-th length-sorted batch and the per-row results are gathered, so
validation and the final test pass cost ``1 / world`` of the work on every rank (no rank idles).
LM tasks can also be scored with the tags left out of the prompt and by a unigram model of the target
tokens: the references a domain tag must beat.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..core.data import collate, to_device
from ..core.generate import greedy_generate
from ..core.metrics import bleu, classification_metrics, lm_metrics, regression_metrics
from ..core.progress import progress
from ..tasks.dataset import TaskData
from ..tasks.spec import TaskSpec
from .batches import encode_rows, encoder_for, make_batch, sorted_batches
from .setup import Setup


def _score(setup: Setup, exs, rt, device, batch_size: int, autocast, what: str = "scoring") -> dict:
    """Per-row loss, LM token counts and predictions of ``exs``, gathered from every rank."""
    model = setup.model
    mine = {"i": [], "loss": [], "ntok": [], "pred": [], "y": [], "probs": []}
    batches = sorted_batches(exs, batch_size, rt.rank, rt.world_size)
    what = f"stage {setup.stage}: {what} ({len(exs)} rows)"
    for idx in progress(batches, what, setup.cfg.progress_s, enabled=rt.rank == 0):
        batch = to_device(make_batch([exs[i] for i in idx], setup.head_names(), setup.pad_id), device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model(batch)
        mine["i"] += idx
        mine["loss"] += out.row_loss.float().cpu().tolist()
        mine["ntok"] += (batch["labels"][:, 1:] != -100).sum(1).cpu().tolist()
        if out.preds is not None:
            mine["pred"] += out.preds[:, :1].cpu().tolist()
            mine["y"] += batch["targets"][:, :1].cpu().tolist()
        if out.probs is not None:
            mine["probs"] += out.probs.cpu().tolist()
    merged = {k: [] for k in mine}
    for part in rt.all_gather(mine):
        for k in merged:
            merged[k] += part[k]
    return merged


@torch.no_grad()
def evaluate(
    setup: Setup,
    tasks: list[TaskData],
    split: str,
    rt,
    device,
    limit: int | None = None,
    batch_size: int = 16,
    generate: bool = False,
    autocast: torch.dtype | None = None,
) -> dict:
    """Metrics per task on ``split``: ``{task: {metric: value, "loss": ..., "n": rows}}``."""
    model = setup.model
    was = model.training
    model.eval()
    results = {}
    for td in tasks:
        exs = setup.examples(td, split, limit)
        if not exs:
            continue
        r = _score(setup, exs, rt, device, batch_size, autocast, f"{split} evaluation of {td.spec.name}")
        m: dict = {"loss": sum(r["loss"]) / len(r["loss"]), "n": len(exs)}
        kind = td.spec.target.kind
        if kind == "regression":
            p, y = torch.tensor(r["pred"])[:, 0], torch.tensor(r["y"])[:, 0]
            m.update(regression_metrics(p, y))
            m["baseline_mse"] = float(((y - model.heads.specs[td.spec.head_tag].mean[0]) ** 2).mean())
        elif kind == "classification":
            y = torch.tensor(r["y"])[:, 0]
            probs = torch.tensor(r["probs"])[:, : len(td.spec.target.classes)]
            m.update(classification_metrics(probs, y, positive=td.spec.target.positive_index))
        else:
            tot = sum(lo * n for lo, n in zip(r["loss"], r["ntok"], strict=True))
            m.update(lm_metrics(tot, sum(r["ntok"])))
            if generate and "bleu" in td.spec.metrics:
                m.update(_bleu(setup, td, split, limit, device, batch_size, rt.rank == 0))
        results[td.spec.name] = m
    model.train(was)
    return results


def _bleu(setup: Setup, td: TaskData, split: str, limit, device, batch_size: int, log: bool = True) -> dict:
    rows = td.splits[split][:limit] if limit else td.splits[split]
    hyps = generate_text(
        setup.model,
        setup.base.tokenizer,
        td.spec,
        rows,
        device,
        batch_size,
        td.spec.generate.get("max_new_tokens", 48),
        progress_s=setup.cfg.progress_s if log else None,
        what=f"stage {setup.stage}: {split} generation for {td.spec.name} ({len(rows)} rows)",
    )
    refs = [r[td.spec.target.field] for r in rows]
    out = bleu(hyps, refs)
    out["examples"] = [
        {"src": r.get("src"), "ref": ref, "hyp": h}
        for r, ref, h in list(zip(rows, refs, hyps, strict=True))[:3]
    ]
    return out


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    spec: TaskSpec,
    rows: list[dict],
    device,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    rename=None,
    progress_s: float | None = None,
    what: str = "generation",
) -> list[str]:
    """Greedy generation of ``spec.target.field`` per row, under the training attention rules
    (a progress line every ``progress_s`` seconds; None: silent)."""
    enc = encoder_for(spec, tokenizer, model.tags, rename)
    encs = [enc.encode(r, with_target=False) for r in rows]
    order = sorted(range(len(encs)), key=lambda i: len(encs[i]))
    outs: dict[int, str] = {}
    for s in progress(range(0, len(order), batch_size), what, progress_s):
        idx = order[s : s + batch_size]
        batch = to_device(collate([encs[i] for i in idx], pad_id=tokenizer.pad_token_id), device)
        for i, ids in zip(
            idx, greedy_generate(model, batch, max_new_tokens, tokenizer.eos_token_id), strict=True
        ):
            outs[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return [outs[i] for i in range(len(rows))]


@torch.no_grad()
def lm_references(
    setup: Setup, td: TaskData, split: str, rt, device, limit=None, batch_size: int = 16
) -> dict:
    """What an LM task's domain tags must beat: the untagged prompt's loss and a unigram model's.

    ``untagged_loss``: the frozen base on the same text with every tag left out of the template.
    ``unigram_loss``: cross-entropy of the target tokens under their training-split frequencies
    (add-one smoothing over the tokens seen in training plus one unseen bucket), e.g. the amino-acid
    composition for proteins.
    """
    tok = setup.base.tokenizer
    plain = encode_rows([td], tok, setup.model.tags, split, limit, drop_tags=True)
    r = _score(
        setup, plain, rt, device, batch_size, None, f"{split} untagged-prompt reference of {td.spec.name}"
    )
    tot = sum(lo * n for lo, n in zip(r["loss"], r["ntok"], strict=True))
    out = {"untagged_loss": tot / max(1, sum(r["ntok"]))}
    counts = Counter(t for e in setup.examples(td, "train") for t in e.enc.labels if t != -100)
    if td.shard is not None:  # this rank's training rows are a shard: count over all of them
        counts = sum(rt.all_gather(counts), Counter())
    total = sum(counts.values()) + len(counts) + 1
    nll, n = 0.0, 0
    for e in setup.examples(td, split, limit):
        for t in e.enc.labels[1:]:  # the first position has no predecessor (the loss skips it too)
            if t != -100:
                nll -= math.log((counts.get(t, 0) + 1) / total)
                n += 1
    out["unigram_loss"] = nll / max(1, n)
    return out
