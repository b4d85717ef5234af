"""Greedy decoding with tags spliced into the prompt, under the same attention rules as training.

Why not ``base.generate(inputs_embeds=...)``: Hugging Face's loop builds its own masks, so a model
trained with isolated spans would be decoded without them (training and inference would differ). Here
the prompt runs through :func:`~tagray.core.prefix.run_segment` with the span mask, and each new token
(outside every span) sees the whole prompt and what was generated before it. Pure torch.
"""

from __future__ import annotations

import torch

from .prefix import run_segment


@torch.no_grad()
def greedy_generate(
    model,
    batch: dict,
    max_new_tokens: int | list[int],
    eos_token_id: int | None,
) -> list[list[int]]:
    """Generated token ids per row (EOS excluded) for a right-padded prompt batch.

    Args:
        model: a :class:`~tagray.core.model.TagLLM`.
        batch: collated prompts (``input_ids, tag_rows, span, attention_mask``), right-padded.
        max_new_tokens: one limit for all rows or one per row.
        eos_token_id: stop a row at this token (None: run to the limit).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not bool(mask[:, 0].all()):
        raise ValueError("greedy_generate expects right-padded prompts")
    B, T = ids.shape
    dev = ids.device
    limit = (
        torch.as_tensor(max_new_tokens, device=dev).expand(B)
        if not isinstance(max_new_tokens, list)
        else torch.tensor(max_new_tokens, device=dev)
    )
    n = mask.sum(1)  # (B,) prompt lengths
    emb = model.embed(ids, batch["tag_rows"])
    spans = model._spans(batch)
    hidden, past = run_segment(model.base, emb, n, torch.arange(T, device=dev).expand(B, T), span_seg=spans)
    lm_head = model.base.get_output_embeddings()
    logits = lm_head(hidden[torch.arange(B, device=dev), n - 1])  # (B, V)
    out: list[list[int]] = [[] for _ in range(B)]
    done = limit <= 0
    embed = model.base.get_input_embeddings()
    for t in range(int(limit.max())):
        tok = logits.argmax(-1)  # (B,)
        stop = done | (tok == eos_token_id) if eos_token_id is not None else done.clone()
        for b in (~stop).nonzero()[:, 0].tolist():
            out[b].append(int(tok[b]))
        done = stop | (torch.tensor([len(o) for o in out], device=dev) >= limit)
        if bool(done.all()):
            break
        h, kv = run_segment(
            model.base,
            embed(tok)[:, None],
            torch.ones(B, dtype=torch.long, device=dev),
            (n + t)[:, None],
            past=past,
        )
        past = past.extend(kv)
        logits = lm_head(h[:, 0])
    return out
