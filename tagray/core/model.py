"""TagLLM: a frozen causal LM called with tag vectors spliced into ``inputs_embeds``.

The base model is composed, never forked or patched: tagray computes ``embed_tokens(input_ids)``,
overwrites the tag positions with rows of the tag table and calls the base's backbone. Heads read the
final hidden state at the head tag's last position; LM logits are computed only where a loss needs them.
When everything before the first trainable tag is frozen, the batch runs as a no-grad prefix (optionally
reused from a :class:`~tagray.core.prefix.PrefixStore`) plus a suffix with grad (:mod:`.prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import use_folded_gqa
from .heads import HeadBank
from .prefix import KV, PrefixStore, _gather, row_key, run_segment, split_points, supports_prefix
from .tags import TagBank
from .template import IGNORE


@dataclass
class Output:
    loss: torch.Tensor | None  # scalar mean of per-row losses
    row_loss: torch.Tensor  # (B,) loss of each row (0 for rows without a target)
    preds: torch.Tensor | None  # (B, k) head outputs in target units (NaN where a row has no head)
    n_tokens: int  # LM target tokens in the batch
    probs: torch.Tensor | None = None  # (B, C) class probabilities of classification rows (NaN elsewhere)


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
        center_heads: in training, heads read features centred on their batch mean (see
            :meth:`HeadBank.read`); the stored centre is used in evaluation.
        prefix: ``auto`` splits batches at the first trainable position when that saves work (exact),
            ``off`` always runs the full forward.
        prefix_store: where prefix keys/values are kept between calls (None: recomputed, without grad).
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
        center_heads: bool = False,
        prefix: str = "auto",
        prefix_store: PrefixStore | None = None,
    ):
        super().__init__()
        self.base = base
        use_folded_gqa(base)  # exact GQA attention without repeat_kv copies of the cached prefix (.attention)
        self.tags = tags
        self.heads = heads
        self.isolate_spans = isolate_spans
        self.lm_chunk = lm_chunk
        self.track_momentum = track_momentum  # >0: heads track their feature mean while training
        self.center_heads = center_heads
        self.prefix = prefix if supports_prefix(base) else "off"
        self.prefix_store = prefix_store
        self.last_split: dict = {}  # what the last forward did (tokens in prefix / suffix, cache hits)

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
        if self._spans(batch) is not None:
            kw["attention_mask"] = isolated_span_mask(batch["span"], mask, emb.dtype)
            kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        else:
            kw["attention_mask"] = mask
        return kw

    def _spans(self, batch: dict) -> torch.Tensor | None:
        span = batch.get("span")
        return span if self.isolate_spans and span is not None and bool((span > 0).any()) else None

    def hidden_states(self, batch: dict) -> torch.Tensor:
        """Final hidden states ``(B, T, d)`` of the backbone (after its final norm); no logits."""
        emb = self.embed(batch["input_ids"], batch["tag_rows"])
        out = self.base.base_model(**self.backbone_kwargs(batch, emb))
        return out.last_hidden_state

    def logits(self, batch: dict) -> torch.Tensor:
        """Full LM logits ``(B, T, V)`` (used for tests and generation-style scoring)."""
        return self.base.get_output_embeddings()(self.hidden_states(batch))

    # ---- the split forward ----------------------------------------------------------------------

    def _split(self, batch: dict) -> torch.Tensor | None:
        """Per-row split points when the split path applies and pays off, else None (full forward)."""
        if self.prefix == "off" or not bool(batch["attention_mask"][:, 0].all()):
            return None  # left-padded batches (generation prompts) take the full path
        cut = split_points(batch, self.tags.first_trainable_row)
        if self.prefix_store is None and not (torch.is_grad_enabled() and self.training):
            return None  # without grad and without reuse the split saves nothing
        n = batch["attention_mask"].sum()
        # the prefix must be a real share of the work (stage 1: the trainable domain tag comes first)
        return cut if float(cut.sum()) > 0.2 * float(n) else None

    def _prefix_kv(self, batch: dict, emb: torch.Tensor, cut: torch.Tensor) -> KV:
        """Keys/values of every row's prefix ``[0, cut_b)``: from the store, else computed once per unique
        prefix in the batch (ensemble members and repeated rows share one), without grad."""
        ids, tr = batch["input_ids"], batch["tag_rows"]
        span = batch["span"] if self._spans(batch) is not None else torch.zeros_like(ids)
        keys = [row_key(ids[b], tr[b], span[b], int(cut[b])) for b in range(len(cut))]
        store = self.prefix_store
        got = {k: store.get(k) for k in dict.fromkeys(keys)} if store is not None else {}
        todo = [k for k in dict.fromkeys(keys) if got.get(k) is None]
        if todo:
            first = [keys.index(k) for k in todo]
            sel = torch.tensor(first, device=emb.device)
            P = int(cut[sel].max())
            with torch.no_grad():
                _, kv = run_segment(
                    self.base,
                    emb[sel, :P].detach(),
                    cut[sel],
                    torch.arange(P, device=emb.device).expand(len(sel), P),
                    span_seg=span[sel, :P] if self._spans(batch) is not None else None,
                )
            for i, k in enumerate(todo):
                got[k] = kv.row(i)
                if store is not None:
                    store.put(k, got[k])
        self.last_split["computed_rows"] = len(todo)
        return KV.stack([got[k] for k in keys], emb.dtype, emb.device)

    def run(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states, next-token targets and head read-out positions, in one layout.

        Returns:
            ``hidden (B, S, d)``; ``next_labels (B, S)``: the token position ``s`` predicts (IGNORE where
            none); ``head_pos (B,)``: where each row's head reads ``hidden`` (-1: no head). ``S = T`` for
            the full forward; for the split forward the layout holds each row's suffix only.
        """
        labels = batch.get("labels")
        ids = batch["input_ids"]
        nl = torch.full_like(ids, IGNORE)
        if labels is not None:
            nl[:, :-1] = labels[:, 1:]
        head_pos = batch.get("head_pos", torch.full_like(ids[:, 0], -1))
        cut = self._split(batch)
        if cut is None:
            self.last_split = {"prefix_tokens": 0, "tokens": int(batch["attention_mask"].sum())}
            return self.hidden_states(batch), nl, head_pos
        emb = self.embed(ids, batch["tag_rows"])  # (B, T, d); only suffix positions carry grad
        past = self._prefix_kv(batch, emb, cut)
        n = batch["attention_mask"].sum(1)
        seg = n - cut  # (B,) suffix lengths
        S = int(seg.max())
        T = ids.shape[1]
        spans = self._spans(batch)
        hidden, _ = run_segment(
            self.base,
            _gather(emb, cut, S),
            seg,
            (cut[:, None] + torch.arange(S, device=ids.device)).clamp_max(T - 1),
            past=past,
            span_seg=_gather(spans, cut, S) if spans is not None else None,
            span_past=spans[:, : past.slots] if spans is not None else None,
        )
        self.last_split.update(prefix_tokens=int(cut.sum()), tokens=int(n.sum()))
        return hidden, _gather(nl, cut, S, fill=IGNORE), torch.where(head_pos >= 0, head_pos - cut, head_pos)

    def head_features(self, batch: dict) -> torch.Tensor:
        """What each row's head reads ``(B, d)``: the hidden state under its function tag."""
        hidden, _, head_pos = self.run(batch)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), head_pos.clamp_min(0)]

    def forward(self, batch: dict) -> Output:
        """Loss and head predictions for a collated batch (see :mod:`tagray.core.data`)."""
        hidden, next_labels, head_pos = self.run(batch)  # (B, S, d), (B, S), (B,)
        B = hidden.shape[0]
        row_loss = hidden.new_zeros(B, dtype=torch.float32)
        has_loss = torch.zeros(B, dtype=torch.bool, device=hidden.device)
        preds = probs = None
        n_tokens = 0

        sel = next_labels != IGNORE  # (B, S)
        if bool(sel.any()):
            tok_loss = chunked_lm_loss(
                hidden[sel], self.base.get_output_embeddings(), next_labels[sel], self.lm_chunk
            )
            rows = sel.nonzero()[:, 0]
            row_loss = row_loss.index_add(0, rows, tok_loss) / sel.sum(1).clamp_min(1).float()
            has_loss |= sel.any(1)
            n_tokens = int(sel.sum())

        head_idx = batch.get("head_idx")
        if self.heads is not None and head_idx is not None:
            rows = (head_idx >= 0).nonzero()[:, 0]
            h = hidden[rows, head_pos[rows]]  # (N, d): what the heads read
            if self.training and self.track_momentum > 0:
                # every rank calls this on every step, rows or not: it all-reduces under DDP
                self.heads.track_mean(h.detach(), head_idx[rows], self.track_momentum)
            if len(rows):
                targets = batch.get("targets")
                tg = targets[rows] if targets is not None else None
                p, loss, q = self.heads.read(
                    h, head_idx[rows], tg, center=self.training and self.center_heads
                )
                preds = hidden.new_full((B, p.shape[1]), float("nan"), dtype=torch.float32)
                preds[rows] = p
                if q is not None:
                    probs = hidden.new_full((B, q.shape[1]), float("nan"), dtype=torch.float32)
                    probs[rows] = q
                if loss is not None:
                    row_loss = row_loss.index_put((rows,), loss, accumulate=True)
                    has_loss[rows] = True
        loss = row_loss[has_loss].mean() if bool(has_loss.any()) else None
        if loss is not None and self.training:
            # zero-valued term so every trainable table is part of the graph on every step (DDP needs it)
            loss = loss + sum(p.sum() for p in self.trainable_parameters()) * 0.0
        return Output(loss, row_loss.detach(), preds, n_tokens, probs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        ps = [self.tags.trainable]
        if self.heads is not None:
            ps.append(self.heads.trainable)
        return [p for p in ps if p.requires_grad and p.numel() > 0]
