"""Folded grouped-query attention (tagray.core.attention) equals transformers' SDPA with repeat_kv."""

from __future__ import annotations

import torch

from tagray.core import attention
from tagray.core.model import TagLLM
from tagray.core.tags import TagBank

from .test_prefix import _regression, _same, _step, _translate


def _stock(base):
    base.model.set_attn_implementation("sdpa")


def test_tagllm_switches_gqa_bases_and_leaves_others(tiny_llama, tiny_gpt2):
    TagLLM(tiny_llama.model, TagBank({}))
    assert tiny_llama.model.config._attn_implementation == attention.NAME  # 4 query heads on 2 kv heads
    TagLLM(tiny_gpt2.model, TagBank({}))
    assert tiny_gpt2.model.config._attn_implementation != attention.NAME  # no grouped-query attention


def test_split_forward_losses_and_gradients_equal_stock_sdpa(tiny_llama, monkeypatch):
    calls = []
    real = attention.folded_sdpa

    def spy(module, query, key, value, attention_mask, **kw):
        calls.append(tuple(query.shape))
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setitem(__import__("transformers").AttentionInterface._global_mapping, attention.NAME, spy)
    for make in (_regression, _translate):
        model, batch = make(tiny_llama)
        folded = _step(model, batch)  # split forward: suffix queries over the prefix's keys/values
        assert folded[2]["prefix_tokens"] > 0 and calls
        _stock(tiny_llama)
        stock = _step(model, batch)
        _same(stock, folded)
        attention.use_folded_gqa(tiny_llama.model)


def test_full_forward_with_padding_equals_stock_sdpa(tiny_llama):
    attention.use_folded_gqa(tiny_llama.model)
    ids = torch.randint(3, 500, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    bb = tiny_llama.model.base_model
    folded = bb(input_ids=ids, attention_mask=mask).last_hidden_state
    _stock(tiny_llama)
    stock = bb(input_ids=ids, attention_mask=mask).last_hidden_state
    attention.use_folded_gqa(tiny_llama.model)
    keep = mask.bool()
    assert torch.allclose(folded[keep], stock[keep], atol=1e-5, rtol=1e-5)


def test_a_base_on_another_attention_is_left_alone(tiny_llama):
    tiny_llama.model.set_attn_implementation("eager")
    try:
        assert not attention.use_folded_gqa(tiny_llama.model)
        assert tiny_llama.model.config._attn_implementation == "eager"
    finally:
        _stock(tiny_llama)
        attention.use_folded_gqa(tiny_llama.model)
