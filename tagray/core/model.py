"""TagLLM: a frozen causal LM called with tag vectors spliced into ``inputs_embeds``.

The base model is composed, never forked or patched: tagray computes ``embed_tokens(input_ids)``,
overwrites the tag positions with rows of the tag table and calls the base's backbone. Heads read the
final hidden state at the head tag's last position; LM logits are computed only where a loss needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .tags import HeadBank, TagBank
from .template import IGNORE


@dataclass
class Output:
    loss: torch.Tensor | None  # scalar mean of per-row losses
    row_loss: torch.Tensor  # (B,) loss of each row (0 for rows without a target)
    preds: torch.Tensor | None  # (B, k) head outputs in target units (NaN where a row has no head)
    n_tokens: int  # LM target tokens in the batch


def isolated_span_mask(span: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask ``(B, 1, T, T)``: causal + padding, and positions in an isolated span (id > 0)
    see only their own span. Everything else (e.g. the function tag at the end) sees all earlier tokens.
    """
    B, T = span.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=span.device).tril()
    keys_ok = attention_mask.bool()[:, None, :]  # (B, 1, T)
    same = span[:, :, None] == span[:, None, :]  # (B, T, T)
    isolated = (span > 0)[:, :, None]  # query in a span
    allowed = causal[None] & keys_ok & (~isolated | same)
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=span.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def _ce_chunk(lm_head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), y, reduction="none")


def chunked_lm_loss(
    hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Per-token cross-entropy ``(N,)`` for ``hidden (N, d)`` without keeping ``(N, V)`` logits alive.

    Each chunk's logits are recomputed in backward (activation checkpointing), so peak memory is one
    ``(chunk, V)`` block instead of ``(N, V)``: 49k-128k vocabularies make that the largest tensor.
    """
    if hidden.shape[0] <= chunk or not torch.is_grad_enabled():
        return _ce_chunk(lm_head, hidden, targets)
    parts = [
        checkpoint(_ce_chunk, lm_head, h, y, use_reentrant=False)
        for h, y in zip(hidden.split(chunk), targets.split(chunk), strict=True)
    ]
    return torch.cat(parts)


class TagLLM(nn.Module):
    """Frozen base + tag bank + head bank.

    Args:
        base: a Hugging Face ``*ForCausalLM`` (frozen by the caller).
        tags: the :class:`TagBank` whose rows the batch's ``tag_rows`` index.
        heads: optional :class:`HeadBank` for regression / classification.
        isolate_spans: apply :func:`isolated_span_mask` (domain spans do not see the prompt before them).
        lm_chunk: rows per chunk of the chunked LM loss.
        track_momentum: momentum of the heads' running feature mean in training (0: fixed statistics).
    """

    def __init__(
        self,
        base: nn.Module,
        tags: TagBank,
        heads: HeadBank | None = None,
        *,
        isolate_spans: bool = False,
        lm_chunk: int = 1024,
        track_momentum: float = 0.0,
    ):
        super().__init__()
        self.base = base
        self.tags = tags
        self.heads = heads
        self.isolate_spans = isolate_spans
        self.lm_chunk = lm_chunk
        self.track_momentum = track_momentum  # >0: heads track their feature mean while training

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the base stays in eval mode: no dropout, it is not being trained
        return self

    def embed(self, input_ids: torch.Tensor, tag_rows: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` ids and tag rows -> ``(B, T, d)`` embeddings with tag vectors spliced in."""
        emb = self.base.get_input_embeddings()(input_ids)
        is_tag = tag_rows >= 0
        if bool(is_tag.any()):
            table = self.tags.table().to(emb.dtype)  # (R, d)
            emb = torch.where(is_tag[..., None], table[tag_rows.clamp_min(0)], emb)
        return emb

    def backbone_kwargs(self, batch: dict, emb: torch.Tensor) -> dict:
        mask = batch["attention_mask"]
        kw = {"inputs_embeds": emb, "use_cache": False}
        if self.isolate_spans and "span" in batch and bool((batch["span"] > 0).any()):
            kw["attention_mask"] = isolated_span_mask(batch["span"], mask, emb.dtype)
            kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        else:
            kw["attention_mask"] = mask
        return kw

    def hidden_states(self, batch: dict) -> torch.Tensor:
        """Final hidden states ``(B, T, d)`` of the backbone (after its final norm); no logits."""
        emb = self.embed(batch["input_ids"], batch["tag_rows"])
        out = self.base.base_model(**self.backbone_kwargs(batch, emb))
        return out.last_hidden_state

    def logits(self, batch: dict) -> torch.Tensor:
        """Full LM logits ``(B, T, V)`` (used for tests and generation-style scoring)."""
        return self.base.get_output_embeddings()(self.hidden_states(batch))

    def forward(self, batch: dict) -> Output:
        """Loss and head predictions for a collated batch (see :mod:`tagray.core.data`)."""
        hidden = self.hidden_states(batch)  # (B, T, d)
        B = hidden.shape[0]
        row_loss = hidden.new_zeros(B, dtype=torch.float32)
        has_loss = torch.zeros(B, dtype=torch.bool, device=hidden.device)
        preds = None
        n_tokens = 0

        labels = batch.get("labels")
        if labels is not None and bool((labels != IGNORE).any()):
            # position t predicts the token at t+1
            tgt = labels[:, 1:]
            sel = tgt != IGNORE  # (B, T-1)
            h = hidden[:, :-1][sel]  # (N, d)
            tok_loss = chunked_lm_loss(h, self.base.get_output_embeddings(), tgt[sel], self.lm_chunk)
            rows = sel.nonzero()[:, 0]
            counts = sel.sum(1).clamp_min(1).float()
            row_loss = row_loss.index_add(0, rows, tok_loss) / counts
            has_loss |= sel.any(1)
            n_tokens = int(sel.sum())

        head_idx = batch.get("head_idx")
        if self.heads is not None and head_idx is not None:
            rows = (head_idx >= 0).nonzero()[:, 0]
            h = hidden[rows, batch["head_pos"][rows]]  # (N, d): what the heads read
            if self.training and self.track_momentum > 0:
                # every rank calls this on every step, rows or not: it all-reduces under DDP
                self.heads.track_mean(h.detach(), head_idx[rows], self.track_momentum)
        if self.heads is not None and head_idx is not None and len(rows):
            out = self.heads(h.float())  # (N, R): every head, so DDP sees all trainable heads used
            k = max(s.out_dim if s.kind == "regression" else 1 for s in self.heads.specs.values())
            preds = hidden.new_full((B, k), float("nan"), dtype=torch.float32)
            targets = batch.get("targets")
            names = self.heads.names
            for hi in head_idx[rows].unique().tolist():
                name = names[hi]
                spec = self.heads.specs[name]
                m = head_idx[rows] == hi
                r = rows[m]
                o = out[m][:, self.heads.cols(name)]
                if spec.kind == "regression":
                    mean = torch.tensor(spec.mean, device=o.device)
                    std = torch.tensor(spec.std, device=o.device)
                    preds = preds.index_put(
                        (r,),
                        torch.cat(
                            [o * std + mean, o.new_full((len(r), k - spec.out_dim), float("nan"))], 1
                        ).detach(),
                    )
                    if targets is not None:
                        z = (targets[r, : spec.out_dim] - mean) / std
                        row_loss = row_loss.index_put(
                            (r,), F.mse_loss(o, z, reduction="none").mean(1), accumulate=True
                        )
                        has_loss[r] = True
                else:
                    preds = preds.index_put(
                        (r,),
                        torch.cat(
                            [o.argmax(1, keepdim=True).float(), o.new_full((len(r), k - 1), float("nan"))], 1
                        ).detach(),
                    )
                    if targets is not None:
                        row_loss = row_loss.index_put(
                            (r,), F.cross_entropy(o, targets[r, 0].long(), reduction="none"), accumulate=True
                        )
                        has_loss[r] = True
        loss = row_loss[has_loss].mean() if bool(has_loss.any()) else None
        if loss is not None and self.training:
            # zero-valued term so every trainable table is part of the graph on every step (DDP needs it)
            loss = loss + sum(p.sum() for p in self.trainable_parameters()) * 0.0
        return Output(loss, row_loss.detach(), preds, n_tokens)

    def trainable_parameters(self) -> list[nn.Parameter]:
        ps = [self.tags.trainable]
        if self.heads is not None:
            ps.append(self.heads.trainable)
        return [p for p in ps if p.requires_grad and p.numel() > 0]
