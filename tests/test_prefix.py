"""The frozen-prefix split is exact: same loss, predictions and gradients as the full forward."""

from __future__ import annotations

import pytest
import torch

from tagray.core.data import collate
from tagray.core.heads import HeadBank, HeadSpec, head_init
from tagray.core.model import TagLLM
from tagray.core.prefix import PrefixStore, kv_bytes_per_token, split_points
from tagray.core.tags import TagBank, mean_embedding_init
from tagray.core.template import TemplateEncoder

QED = "# Input: The SMILES of the molecule is <SMILES> {smiles}. # Output: The QED is <QED>"
TRANSLATE = "# Input: <{src_lang}> {src} # Output: <{tgt_lang}> <Translate> {tgt}"
SMILES = ["CCO", "CC(=O)Oc1ccccc1C(=O)O", "c1ccccc1", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "O"]


def _bank(base, names, trainable, p=3, seed=0):
    emb = base.model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    return TagBank({n: mean_embedding_init(emb, p, 0.3, g) for n in names}, trainable=set(trainable))


def _regression(base, isolate=False, store=None, prefix="auto", p=3):
    emb = base.model.get_input_embeddings().weight
    bank = _bank(base, ["<SMILES>", "<QED>"], ["<QED>"], p)
    heads = HeadBank(
        {"<QED>": head_init(emb, 1, torch.Generator().manual_seed(1))},
        {"<QED>": HeadSpec("regression", 1, (0.5,), (0.2,))},
        emb.shape[1],
        trainable={"<QED>"},
    )
    model = TagLLM(base.model, bank, heads, isolate_spans=isolate, prefix=prefix, prefix_store=store)
    enc = TemplateEncoder(base.tokenizer, QED, bank.slots, head_tag="<QED>")
    rows = [enc.encode({"smiles": s}) for s in SMILES]
    batch = collate(
        rows, heads.names, [[0.1 * i] for i in range(len(rows))], pad_id=base.tokenizer.pad_token_id
    )
    return model, batch


def _translate(base, isolate=False, prefix="auto"):
    bank = _bank(base, ["<EN>", "<FR>", "<DE>", "<Translate>"], ["<Translate>"])
    model = TagLLM(base.model, bank, isolate_spans=isolate, prefix=prefix)
    enc = TemplateEncoder(base.tokenizer, TRANSLATE, bank.slots, lm_field="tgt", lm_eos=True)
    pairs = [("EN", "FR", "Save changes", "Enregistrer"), ("FR", "DE", "Mot de passe oublié ?", "Passwort")]
    rows = [enc.encode({"src_lang": a, "tgt_lang": b, "src": s, "tgt": t}) for a, b, s, t in pairs]
    return model, collate(rows, pad_id=base.tokenizer.pad_token_id)


def _step(model, batch):
    model.train()
    for p in model.trainable_parameters():
        p.grad = None
    out = model(batch)
    out.loss.backward()
    return out, [p.grad.clone() for p in model.trainable_parameters()], dict(model.last_split)


def _same(a, b):
    (oa, ga, _), (ob, gb, _) = a, b
    assert torch.allclose(oa.loss, ob.loss, atol=1e-5, rtol=1e-5)
    assert torch.allclose(oa.row_loss, ob.row_loss, atol=1e-5, rtol=1e-5)
    if oa.preds is not None:
        assert torch.allclose(oa.preds, ob.preds, atol=1e-5, equal_nan=True)
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), (x - y).abs().max()


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def base(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("isolate", [False, True])
def test_regression_split_equals_full_forward(base, isolate):
    model, batch = _regression(base, isolate)
    full = _step(_regression(base, isolate, prefix="off")[0], batch)
    split = _step(model, batch)
    assert full[2]["prefix_tokens"] == 0
    # mixed prefix lengths in one batch: every row splits at its own function tag
    cut = split_points(batch, model.tags.first_trainable_row)
    assert len(set(cut.tolist())) > 1 and split[2]["prefix_tokens"] == int(cut.sum())
    _same(full, split)


@pytest.mark.parametrize("isolate", [False, True])
def test_lm_targets_after_the_tag_split_equals_full(base, isolate):
    """Translation: the LM targets follow the trainable <Translate>; language tags before it are frozen."""
    model, batch = _translate(base, isolate)
    full = _step(_translate(base, isolate, prefix="off")[0], batch)
    split = _step(model, batch)
    assert split[2]["prefix_tokens"] > 0
    _same(full, split)


def test_trainable_tag_first_takes_the_full_path(base):
    """Stage 1: the trainable domain tag opens the row, so nothing is frozen before it."""
    bank = _bank(base, ["<SMILES>"], ["<SMILES>"])
    model = TagLLM(base.model, bank)
    enc = TemplateEncoder(base.tokenizer, "<SMILES> {smiles}", bank.slots, lm_field="smiles")
    batch = collate([enc.encode({"smiles": s}) for s in SMILES], pad_id=0)
    _step(model, batch)
    assert model.last_split["prefix_tokens"] == 0


def test_store_reuses_prefixes_and_matches(base):
    store = PrefixStore(max_bytes=1 << 30)
    model, batch = _regression(base, store=store)
    first = _step(model, batch)
    assert first[2]["computed_rows"] == len(SMILES) and len(store) == len(SMILES)
    again = _step(model, batch)
    assert again[2]["computed_rows"] == 0 and store.stats["hits"] >= len(SMILES)
    _same(first, again)
    # eval mode with a store also reuses, and equals the full no-grad forward
    model.eval()
    with torch.no_grad():
        cached = model(batch)
        model.prefix = "off"
        ref = model(batch)
    assert torch.allclose(cached.preds, ref.preds, atol=1e-5)


def test_store_spills_to_disk_over_budget(base, tmp_path):
    model, batch = _regression(base)
    row_bytes = kv_bytes_per_token(base.model.config) * 30
    store = PrefixStore(max_bytes=row_bytes * 2, spill_dir=str(tmp_path))
    model.prefix_store = store
    ref = _step(model, batch)
    assert store.stats["spilled"] > 0 and len(store) == len(SMILES)
    again = _step(model, batch)
    assert again[2]["computed_rows"] == 0
    _same(ref, again)


def test_shared_store_fills_once_per_node_and_other_stores_map_it(base, tmp_path):
    """The trials of a search: one store writes each row's file, a second (another process) reads them."""
    import fcntl

    model, batch = _regression(base)
    first = PrefixStore(max_bytes=1 << 30, shared_dir=str(tmp_path))
    first.ensure_context("ctx")
    model.prefix_store = first
    ref = _step(model, batch)
    assert first.stats["shared_writes"] == len(SMILES) and first.ram_bytes == 0  # files, not private RAM
    second = PrefixStore(max_bytes=1 << 30, shared_dir=str(tmp_path))
    second.ensure_context("ctx")
    model.prefix_store = second
    again = _step(model, batch)
    assert again[2]["computed_rows"] == 0 and second.stats["shared_hits"] == len(SMILES)
    assert second.stats["shared_writes"] == 0 and second.bytes_per_row() > 0
    _same(ref, again)
    first.clear()  # a store leaving does not delete what the others map
    other = PrefixStore(shared_dir=str(tmp_path))
    other.ensure_context("other-frozen-tags")  # a different context never sees these rows
    model.prefix_store = other
    assert _step(model, batch)[2]["computed_rows"] == len(SMILES)
    model.prefix_store = PrefixStore(shared_dir=str(tmp_path))
    model.prefix_store.ensure_context("ctx")
    assert _step(model, batch)[2]["computed_rows"] == 0
    # fill_lock is exclusive across open files (processes): a second locker would wait
    with second.fill_lock(), open(tmp_path / "ctx" / ".lock") as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "ctx" / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released


def test_a_searchs_shared_rows_live_in_its_own_folder_and_are_removed(base, tmp_path, monkeypatch):
    """``auto:<search>``: rows under ``<shared root>/<search>/<context>/``; ``remove_shared`` frees them."""
    from tagray.core.prefix import remove_shared, resolve_shared

    monkeypatch.setenv("TAGRAY_PREFIX_SHARED", str(tmp_path / "root"))
    assert resolve_shared("auto") == str(tmp_path / "root")
    assert resolve_shared("auto:single-qed-1") == str(tmp_path / "root" / "single-qed-1")
    assert resolve_shared(str(tmp_path / "mine")) == str(tmp_path / "mine") and resolve_shared(None) is None
    model, batch = _regression(base)
    model.prefix_store = PrefixStore(shared_dir="auto:single-qed-1")
    model.prefix_store.ensure_context("ctx")
    _step(model, batch)
    assert len(list((tmp_path / "root" / "single-qed-1" / "ctx").glob("*.npy"))) == len(SMILES)
    assert remove_shared("auto:single-qed-1") and not (tmp_path / "root" / "single-qed-1").exists()
    assert not remove_shared("auto:single-qed-1")  # nothing left: a no-op


def test_duplicate_prefixes_in_a_batch_are_computed_once(base):
    """Ensemble members and repeated rows share one prefix computation."""
    model, batch = _regression(base)
    dup = {k: torch.cat([v, v]) for k, v in batch.items()}
    _step(model, dup)
    assert model.last_split["computed_rows"] == len(SMILES)


def test_left_padding_takes_the_full_path(base):
    model, _ = _regression(base)
    enc = TemplateEncoder(base.tokenizer, QED, model.tags.slots, head_tag="<QED>")
    rows = [enc.encode({"smiles": s}) for s in SMILES]
    batch = collate(rows, model.heads.names, [[0.5]] * len(rows), pad_id=0, left_pad=True)
    _step(model, batch)
    assert model.last_split["prefix_tokens"] == 0


@pytest.mark.slow
def test_split_equals_full_on_smollm2(smollm2):
    model, batch = _regression(smollm2, p=10)
    full = _step(_regression(smollm2, prefix="off", p=10)[0], batch)
    split = _step(model, batch)
    assert split[2]["prefix_tokens"] > 0.6 * split[2]["tokens"]
    _same(full, split)


def test_greedy_generate_matches_hf_generate_without_spans(base):
    from tagray.core.generate import greedy_generate

    model, _ = _translate(base)
    enc = TemplateEncoder(
        base.tokenizer, TRANSLATE, model.tags.slots, lm_field="tgt", function_tag="<Translate>"
    )
    rows = [
        enc.encode({"src_lang": "EN", "tgt_lang": "FR", "src": s, "tgt": ""}, with_target=False)
        for s in ("Save changes", "Password reset on this site")
    ]
    tok = base.tokenizer
    ours = greedy_generate(model.eval(), collate(rows, pad_id=tok.pad_token_id), 6, None)
    left = collate(rows, pad_id=tok.pad_token_id, left_pad=True)
    with torch.no_grad():
        ref = base.model.generate(
            inputs_embeds=model.embed(left["input_ids"], left["tag_rows"]),
            attention_mask=left["attention_mask"],
            do_sample=False,
            max_new_tokens=6,
            min_new_tokens=6,
            pad_token_id=tok.pad_token_id,
        )
    assert ours == ref.tolist()


def test_generation_applies_the_isolated_span_mask(base):
    """Training and inference agree: with isolation on, the first generated token's logits equal the
    training forward's logits at the last prompt position (both under the span mask)."""
    from tagray.core.prefix import run_segment

    model, batch = _translate(base, isolate=True)
    model.eval()
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        full = model.logits(batch)  # the training forward (isolated_span_mask)
        emb = model.embed(batch["input_ids"], batch["tag_rows"])
        n = batch["attention_mask"].sum(1)
        h, _ = run_segment(base.model, emb, n, torch.arange(T).expand(len(n), T), span_seg=batch["span"])
        seg = base.model.get_output_embeddings()(h)
    for b in range(len(n)):
        assert torch.allclose(full[b, : n[b]], seg[b, : n[b]], atol=1e-5)
