"""bf16 numerics (#11.4): a bf16 base with fp32 tags and heads trains like the fp32 run.

On GPU workers the base is loaded in bf16 (``resolve_dtype``) while the tag and head tables stay fp32:
``TagLLM.embed`` casts the table to the base's dtype for the splice (the gradient flows back through
the cast into the fp32 parameter) and ``HeadBank.read`` reads ``hidden.float()``. These tests pin that
contract on CPU with a tiny random Llama: the same weights in fp32 and rounded to bf16, the same tags,
heads and rows, one AdamW step each.
"""

from __future__ import annotations

import random

import pytest
import torch

from tagray.core.data import collate
from tagray.core.heads import HeadBank, HeadSpec, head_init
from tagray.core.model import TagLLM
from tagray.core.prefix import PrefixStore
from tagray.core.tags import TagBank, mean_embedding_init
from tagray.core.template import IGNORE, Encoded

V, D, P = 256, 64, 4


def _base(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same random weights for both dtypes; bf16 is their rounding
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batch() -> dict:
    """QED-shaped rows: text, frozen <S> (rows 0..P-1), text, trainable <Q> (rows P..2P-1) read by the head."""
    rng, rows, ys = random.Random(0), [], []
    for _ in range(6):
        a, b = rng.randrange(3, 8), rng.randrange(5, 20)
        ids = [rng.randrange(V) for _ in range(a)] + [0] * P + [rng.randrange(V) for _ in range(b)] + [0] * P
        tags = [-1] * a + list(range(P)) + [-1] * b + list(range(P, 2 * P))
        n = len(ids)
        rows.append(Encoded(ids, tags, [IGNORE] * n, [0] * n, head_pos=n - 1, head="<Q>"))
        ys.append([rng.random()])
    return collate(rows, ["<Q>"], ys)


def _model(dtype: torch.dtype, store: PrefixStore | None = None) -> TagLLM:
    base = _base(dtype)
    emb = _base(torch.float32).get_input_embeddings().weight  # inits from the fp32 weights, same for both
    g = torch.Generator().manual_seed(1)
    tags = TagBank(
        {"<S>": mean_embedding_init(emb, P, 0.3, g), "<Q>": mean_embedding_init(emb, P, 0.3, g)},
        trainable={"<Q>"},
    )
    heads = HeadBank(
        {"<Q>": head_init(emb, 1, g)},
        {"<Q>": HeadSpec("regression", 1, (0.5,), (0.3,))},
        D,
        trainable={"<Q>"},
    )
    return TagLLM(base, tags, heads, prefix_store=store).train()


def _one_step(model: TagLLM, batch: dict) -> dict:
    """Loss, gradients, the optimizer's state and the updated tables after one AdamW step."""
    params = model.trainable_parameters()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    out = model(batch)
    out.loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    after = model(batch).loss
    return {
        "loss": float(out.loss.detach()),
        "after": float(after.detach()),
        "grads": grads,
        "state": [opt.state[p] for p in params],
        "delta": [p.detach() - b for p, b in zip(params, before, strict=True)],
        "split": dict(model.last_split),
    }


def test_bf16_base_keeps_fp32_tags_heads_and_optimizer_state():
    model = _model(torch.bfloat16)
    assert {p.dtype for p in model.base.parameters()} == {torch.bfloat16}
    r = _one_step(model, _batch())
    assert r["split"]["prefix_tokens"] > 0  # the frozen-prefix path ran (stage-2 layout)
    tables = [
        model.tags.trainable,
        model.tags.frozen,
        model.heads.trainable,
        model.heads.feat_mu,
        model.heads.feat_sd,
    ]
    assert all(t.dtype == torch.float32 for t in tables)
    assert all(g.dtype == torch.float32 for g in r["grads"])
    for st in r["state"]:  # AdamW's moments live in the parameters' dtype: fp32
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    # the update lands in the fp32 tables: AdamW's first step moves each entry by ~lr (sign of the grad);
    # in bf16 a step of 1e-2 on entries of size ~1 would often round away
    for d in r["delta"]:
        assert float(d.abs().max()) == pytest.approx(1e-2, rel=0.05)
        assert float((d != 0).float().mean()) > 0.99


def test_bf16_step_matches_fp32_within_bf16_rounding():
    """One training step of the bf16 base is within 1% of the fp32 one (loss before and after the step).

    Why 1%: bf16 keeps an 8-bit significand, a relative rounding of u = 2^-8 = 0.39% per stored value.
    Every block rounds its matmul outputs and residual sums to bf16, so the final hidden state the head
    reads carries errors of the order of u per element; the head (fp32) sums d of them with mixed signs
    and the MSE averages over the rows, so the loss moves far less than u in practice (measured here:
    0.003% before the step, 0.03% after it). 1% (~2.5u) is a bound no rounding of this model should
    reach, yet any systematic error (targets or tables in the wrong dtype, a step that diverges) crosses
    it; the dtypes themselves are pinned by the test above. The gradients must point the same way
    (cosine > 0.99, measured > 0.9997), so AdamW's first update (the gradient's sign) is the same.
    """
    batch = _batch()
    r32, r16 = _one_step(_model(torch.float32), batch), _one_step(_model(torch.bfloat16), batch)
    assert r16["loss"] == pytest.approx(r32["loss"], rel=0.01)
    assert r16["after"] == pytest.approx(r32["after"], rel=0.01)
    assert r16["after"] < r16["loss"] and r32["after"] < r32["loss"]  # both steps reduce the loss
    for g16, g32 in zip(r16["grads"], r32["grads"], strict=True):
        assert float(torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)) > 0.99


def test_bf16_prefix_store_reuse_is_exact_in_bf16():
    """A store in the compute dtype (bf16) gives exactly the loss of recomputing the prefix."""
    batch = _batch()
    m = _model(torch.bfloat16, PrefixStore(dtype=torch.bfloat16))
    first = m(batch)
    assert m.last_split["computed_rows"] == len(batch["input_ids"])
    again = m(batch)
    assert m.last_split["computed_rows"] == 0  # every prefix came from the store
    assert float(again.loss) == float(first.loss)
