"""Core invariants on tiny random models (seconds): splicing, freezing, gradients, losses, batching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tagray.core.data import BucketBatchSampler, collate, padding_efficiency
from tagray.core.errors import InputError, UnknownTagError
from tagray.core.heads import HeadBank, HeadSpec, head_init
from tagray.core.model import TagLLM, chunked_lm_loss, isolated_span_mask
from tagray.core.tags import TagBank, mean_embedding_init
from tagray.core.template import IGNORE, TemplateEncoder, parse_template, template_tags

TEMPLATE = "The SMILES of the molecule is <SMILES> {smiles}. The QED is <QED>"


def make_model(base, p=3, trainable=("<SMILES>", "<QED>"), heads=True):
    emb = base.model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    tags = {"<SMILES>": mean_embedding_init(emb, p, 0.1, g), "<QED>": mean_embedding_init(emb, p, 0.1, g)}
    bank = TagBank(tags, trainable=set(trainable))
    hb = None
    if heads:
        hb = HeadBank(
            {"<QED>": head_init(emb, 1, g)},
            {"<QED>": HeadSpec("regression", 1, (0.5,), (0.2,))},
            emb.shape[1],
            trainable={"<QED>"} & set(trainable),
        )
    return TagLLM(base.model, bank, hb)


def encode(model, tok, rows, template=TEMPLATE, **kw):
    enc = TemplateEncoder(tok, template, model.tags.slots, head_tag=kw.pop("head_tag", "<QED>"), **kw)
    names = model.heads.names if model.heads is not None else []
    return collate([enc.encode(r) for r in rows], names, [[0.6]] * len(rows), pad_id=tok.pad_token_id)


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def base(request):
    return request.getfixturevalue(request.param)


def test_parse_template_pieces():
    ps = parse_template("# In: <{src_lang}> {src} # Out: <{tgt_lang}> <Translate> {tgt}")
    kinds = [(p.kind, p.value, p.dynamic) for p in ps if p.kind != "text"]
    assert kinds == [
        ("tag", "src_lang", True),
        ("field", "src", False),
        ("tag", "tgt_lang", True),
        ("tag", "<Translate>", False),
        ("field", "tgt", False),
    ]
    assert template_tags("<{l}> {x} <T>", {"l": "FR"}) == ["<FR>", "<T>"]


def test_no_tags_output_equals_base_exactly(base):
    """With no tag positions the spliced forward is the base model's forward, bit for bit."""
    model = make_model(base)
    ids = base.tokenizer.encode("CC(=O)Oc1ccccc1C(=O)O is aspirin", add_special_tokens=False)
    batch = {
        "input_ids": torch.tensor([ids]),
        "tag_rows": torch.full((1, len(ids)), -1),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }
    with torch.no_grad():
        ours = model.logits(batch)
        ref = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ours, ref)


def test_tags_are_spliced_at_their_positions(base):
    model = make_model(base, p=3)
    batch = encode(model, base.tokenizer, [{"smiles": "CCO"}])
    emb = model.embed(batch["input_ids"], batch["tag_rows"])[0]
    rows = batch["tag_rows"][0]
    pos = (rows >= 0).nonzero()[:, 0]
    assert len(pos) == 6  # two tags of p=3
    table = model.tags.table()
    for p in pos.tolist():
        assert torch.equal(emb[p], table[rows[p]])
    # the head reads the last vector of <QED>, which is the last position
    assert batch["head_pos"][0] == len(rows) - 1
    assert rows[-1] == model.tags.slots["<QED>"].start + 2


def test_tags_change_the_output(base):
    model = make_model(base)
    batch = encode(model, base.tokenizer, [{"smiles": "CCO"}])
    h1 = model.hidden_states(batch)
    with torch.no_grad():
        model.tags.trainable.add_(1.0)
    assert not torch.allclose(h1, model.hidden_states(batch))


def test_only_trainable_tags_and_heads_get_gradients(base):
    model = make_model(base, trainable=("<QED>",))
    before = {n: p.detach().clone() for n, p in base.model.state_dict().items()}
    frozen_before = model.tags.get("<SMILES>").clone()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    batch = encode(model, base.tokenizer, [{"smiles": "CCO"}, {"smiles": "c1ccccc1O"}])
    model.train()
    out = model(batch)
    out.loss.backward()
    assert model.tags.trainable.grad is not None and model.tags.trainable.grad.abs().sum() > 0
    assert model.heads.trainable.grad is not None and model.heads.trainable.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.model.parameters())
    assert not any(p.requires_grad for p in base.model.parameters())
    opt.step()
    after = base.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before), "base weights must be bit-identical"
    assert torch.equal(model.tags.get("<SMILES>"), frozen_before), "frozen tag must not move"
    assert not base.model.training, "base stays in eval mode (no dropout)"


def test_init_is_mean_embedding_with_average_norm(tiny_llama):
    emb = tiny_llama.model.get_input_embeddings().weight
    t = mean_embedding_init(emb, 4)
    assert t.shape == (4, emb.shape[1])
    assert torch.allclose(t.norm(dim=1), emb.norm(dim=1).mean().expand(4), rtol=1e-5)
    cos = F.cosine_similarity(t[0], emb.mean(0), dim=0)
    assert cos > 0.9999
    assert t.abs().sum() > 0


def test_lm_loss_matches_full_logits_and_chunking(base):
    model = make_model(base, heads=False)
    enc = TemplateEncoder(base.tokenizer, "<SMILES> {smiles}", model.tags.slots, lm_field="smiles")
    rows = [enc.encode({"smiles": s}) for s in ("CCO", "c1ccccc1C(=O)O", "CC(C)CN")]
    batch = collate(rows, pad_id=base.tokenizer.pad_token_id)
    out = model(batch)
    logits = model.logits(batch)
    tgt = batch["labels"][:, 1:]
    full = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(tgt.shape)
    per_row = full.sum(1) / (tgt != IGNORE).sum(1)
    assert torch.allclose(out.row_loss, per_row, atol=1e-5)
    # chunked CE (with recomputation) gives the same values and gradients
    h = torch.randn(37, base.d_model, requires_grad=True)
    y = torch.randint(0, 100, (37,))
    a = chunked_lm_loss(h, base.model.get_output_embeddings(), y, chunk=8)
    b = F.cross_entropy(base.model.get_output_embeddings()(h), y, reduction="none")
    assert torch.allclose(a, b, atol=1e-5)
    (ga,) = torch.autograd.grad(a.sum(), h)
    (gb,) = torch.autograd.grad(b.sum(), h)
    assert torch.allclose(ga, gb, atol=1e-5)


def test_labels_only_on_the_lm_field(tiny_llama):
    model = make_model(tiny_llama, heads=False)
    enc = TemplateEncoder(
        tiny_llama.tokenizer,
        "# In: <SMILES> {smiles} # Out",
        model.tags.slots,
        lm_field="smiles",
        lm_eos=True,
    )
    e = enc.encode({"smiles": "CCO"})
    labelled = [i for i, y in enumerate(e.labels) if y != IGNORE]
    ids_cco = tiny_llama.tokenizer.encode("CCO", add_special_tokens=False)
    assert [e.labels[i] for i in labelled] == ids_cco + [tiny_llama.tokenizer.eos_token_id]
    assert all(e.tag_rows[i] == -1 for i in labelled)


def test_isolated_span_mask_semantics(tiny_llama):
    model = make_model(tiny_llama)
    enc = TemplateEncoder(tiny_llama.tokenizer, TEMPLATE, model.tags.slots, head_tag="<QED>")
    e = enc.encode({"smiles": "CCO"})
    span = torch.tensor([e.span])
    mask = isolated_span_mask(span, torch.ones_like(span), torch.float32)[0, 0]
    first_span = e.span.index(1)
    # a position in the SMILES span cannot see the prompt before <SMILES>, but sees its own span
    assert mask[first_span + 1, 0] < -1e30 and mask[first_span + 1, first_span] == 0
    # the function tag at the end sees everything before it
    assert (mask[-1] == 0).all()
    # with isolation on, the model runs and the output differs from plain causal attention
    batch = collate([e], ["<QED>"], [[0.5]])
    h_plain = model.hidden_states(batch)
    model.isolate_spans = True
    h_iso = model.hidden_states(batch)
    assert not torch.allclose(h_plain[0, -1], h_iso[0, -1])
    # positions before the span are unaffected (causal): isolation only removes attention inside spans
    assert torch.allclose(h_plain[0, :first_span], h_iso[0, :first_span], atol=1e-5)


def test_no_vocabulary_logits_for_regression(tiny_llama, monkeypatch):
    model = make_model(tiny_llama)
    calls = []
    head = tiny_llama.model.get_output_embeddings()
    monkeypatch.setattr(head, "forward", lambda x: calls.append(x.shape) or F.linear(x, head.weight))
    model(encode(model, tiny_llama.tokenizer, [{"smiles": "CCO"}]))
    assert calls == [], "a regression step must not compute vocabulary-sized logits"


def test_heads_regression_destandardise_and_classification(tiny_llama):
    model = make_model(tiny_llama)
    batch = encode(model, tiny_llama.tokenizer, [{"smiles": "CCO"}])
    out = model(batch)
    h = model.hidden_states(batch)[0, -1]
    raw = model.heads(h[None])[0, 0]
    assert torch.allclose(out.preds[0, 0], raw * 0.2 + 0.5, atol=1e-5)


def test_unknown_tag_and_too_long_inputs(tiny_llama):
    model = make_model(tiny_llama)
    enc = TemplateEncoder(tiny_llama.tokenizer, "<Nope> {smiles}", model.tags.slots)
    with pytest.raises(UnknownTagError):
        enc.encode({"smiles": "CCO"})
    enc = TemplateEncoder(tiny_llama.tokenizer, TEMPLATE, model.tags.slots, head_tag="<QED>", max_length=16)
    with pytest.raises(InputError) as e:
        enc.encode({"smiles": "C" * 200})
    assert e.value.field == "smiles"
    enc = TemplateEncoder(tiny_llama.tokenizer, TEMPLATE, model.tags.slots, head_tag="<QED>")
    with pytest.raises(InputError) as e:
        enc.encode({"other": "CCO"})
    assert e.value.field == "smiles"


def test_bucket_sampler_covers_all_rows_and_shards_evenly():
    lengths = [(i * 37) % 101 + 5 for i in range(203)]
    s = BucketBatchSampler(lengths, 8, seed=1)
    seen = sorted(i for b in s for i in b)
    assert seen == list(range(203))
    rnd = BucketBatchSampler(lengths, 8, seed=1, bucketing=False)
    assert padding_efficiency(list(s), lengths) > padding_efficiency(list(rnd), lengths)
    shards = [list(BucketBatchSampler(lengths, 8, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(x) for x in shards}) == 1
    assert {i for sh in shards for b in sh for i in b} == set(range(203))
    s.set_epoch(1)
    assert list(s) != list(BucketBatchSampler(lengths, 8, seed=1))


def test_packed_bank_keeps_ddp_safe_single_parameter(tiny_llama):
    model = make_model(tiny_llama)
    assert [p.shape for p in model.trainable_parameters()] == [
        (6, tiny_llama.d_model),
        (1, tiny_llama.d_model + 1),
    ]


def test_heads_track_their_feature_mean_and_frozen_heads_do_not():
    d = 4
    spec = HeadSpec("regression", 1, (0.0,), (1.0,))
    bank = HeadBank(
        {"<A>": torch.zeros(1, d + 1), "<B>": torch.zeros(1, d + 1)},
        {"<A>": spec, "<B>": spec},
        d,
        trainable={"<B>"},
    )
    a, b = bank.names.index("<A>"), bank.names.index("<B>")
    h = torch.tensor([[1.0, 2, 3, 4], [3.0, 2, 1, 0], [9.0, 9, 9, 9]])
    bank.track_mean(h, torch.tensor([b, b, a]), momentum=0.5)
    mu, _ = bank.stats()["<B>"]
    assert torch.allclose(mu, 0.5 * torch.tensor([2.0, 2, 2, 2]))  # half-way to the batch mean of its rows
    assert torch.equal(bank.stats()["<A>"][0], torch.zeros(d))  # frozen (earlier stage): never moves
    # a common shift of every input is absorbed: predictions keep their spread, the mean follows the shift
    bank.get("<B>").data[:, :d] = 1.0
    x = torch.randn(64, d)
    with torch.no_grad():
        before = bank(x)[:, b]
        for _ in range(80):
            bank.track_mean(x + 5.0, torch.full((64,), b), momentum=0.2)
        after = bank(x + 5.0)[:, b]
    assert torch.allclose(bank.stats()["<B>"][0], x.mean(0) + 5.0, atol=1e-4)
    assert torch.allclose(after - after.mean(), before - before.mean(), atol=1e-4)
    assert abs(float(after.mean())) < 1e-3  # centred on the tracked mean, not off by 5 * sum(w)
