"""Grouped-query attention without ``repeat_kv``: query heads folded onto their key/value head.

Why: with an explicit mask, transformers' SDPA path copies every key/value head ``groups`` times
(``repeat_kv``) before attention (SmolLM2: 9 query heads share 3 key/value heads, so the copies are 3x the
keys and values), and in backward it computes gradients for all those copies and sums them. In the split
forward (:mod:`.prefix`) a few suffix positions attend over a cached prefix of tens of positions per row,
so those copies of the prefix are most of the attention's memory traffic. Folding the ``groups`` query
heads of one key/value head into its query axis, ``(B, H, S, D) -> (B, H_kv, groups * S, D)``, with the
mask tiled the same way, computes exactly the same softmax(q k' / sqrt(D) + mask) v for every query head
and never copies keys or values.

Used where a mask shared by all heads is given (our split forward, padded batches); everything else (no
mask, per-head masks, multi-query layouts we do not know) goes to the stock SDPA function unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "tagray_sdpa"


def folded_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query (B, H, S, D)``, ``key``/``value (B, H_kv, K, D)``, ``attention_mask (B, 1, S, >=K)`` (additive
    or boolean) -> attention output ``(B, S, H, D)`` (the layout transformers' attention functions return)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (
        groups == 1
        or attention_mask is None
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or key.shape[1] * groups != query.shape[1]
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    B, H, S, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    # query head h = j * groups + g reads key/value head j (repeat_kv's order): fold g into the query axis
    q = query.reshape(B, Hkv, groups * S, D)
    mask = attention_mask[:, :, :, :K]
    mask = mask[:, :, None].expand(B, 1, groups, S, K).reshape(B, 1, groups * S, K)
    out = torch.nn.functional.scaled_dot_product_attention(
        q,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
    )
    return out.reshape(B, H, S, D).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, folded_sdpa)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA gets: same layout


def use_folded_gqa(model: nn.Module) -> bool:
    """Switch a base that runs stock SDPA with grouped-query attention to :func:`folded_sdpa` (exact; a
    config setting of the model, its weights and modules are untouched). Returns whether it switched."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None)
    if not heads or not kv or kv == heads:
        return False
    _register()
    if cfg._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    return True
