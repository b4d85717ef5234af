"""Artifacts and base models: safetensors + JSON round trip, fingerprints, local / S3 / hub loading."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tagray.core.artifacts import TagSet, load_tagset, merge_tagsets, save_tagset
from tagray.core.base import fingerprint, load_base, same_base
from tagray.core.errors import ConfigError, FingerprintMismatch
from tagray.core.heads import HeadSpec
from tagray.core.tags import mean_embedding_init


def make_tagset(base) -> TagSet:
    emb = base.model.get_input_embeddings().weight
    return TagSet(
        tags={"<SMILES>": mean_embedding_init(emb, 3, 0.1), "<QED>": mean_embedding_init(emb, 2, 0.1)},
        heads={"<QED>": torch.randn(1, emb.shape[1] + 1)},
        tag_info={
            "<SMILES>": {"kind": "domain", "length": 3, "stage": "domain"},
            "<QED>": {"kind": "function", "length": 2, "stage": "single"},
        },
        head_specs={"<QED>": HeadSpec("regression", 1, (0.5,), (0.2,))},
        base=base.fingerprint,
        stage="single",
        metrics={"qed": {"test": {"mse": 0.01}}},
        head_stats={"<QED>": torch.stack([torch.zeros(emb.shape[1]), torch.ones(emb.shape[1])])},
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tagset_round_trip(tiny_llama, tmp_path, where, request):
    ts = make_tagset(tiny_llama)
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        path = f"s3://{bucket}/runs/single"
    else:
        path = str(tmp_path / "single")
    save_tagset(ts, path)
    back = load_tagset(path, expect_base=tiny_llama.fingerprint)
    assert set(back.tags) == set(ts.tags)
    assert all(torch.equal(back.tags[n], ts.tags[n]) for n in ts.tags)
    assert torch.equal(back.heads["<QED>"], ts.heads["<QED>"])
    assert torch.equal(back.head_stats["<QED>"], ts.head_stats["<QED>"])
    assert back.head_specs == ts.head_specs and back.tag_info == ts.tag_info and back.metrics == ts.metrics
    if where == "local":
        files = sorted(os.listdir(path))
        assert files == ["heads.safetensors", "tags.safetensors", "tagset.json"]
        meta = json.load(open(os.path.join(path, "tagset.json")))
        assert (
            meta["format"] == "tagray.tagset/1"
            and meta["base"]["weights_hash"] == tiny_llama.fingerprint["weights_hash"]
        )


def test_fingerprint_mismatch_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    save_tagset(make_tagset(tiny_llama), str(tmp_path / "t"))
    with pytest.raises(FingerprintMismatch) as e:
        load_tagset(str(tmp_path / "t"), expect_base=tiny_gpt2.fingerprint)
    assert "trained on base llama" in e.value.message


def test_fingerprint_tracks_weights_not_dtype(tiny_llama):
    import copy

    fp = tiny_llama.fingerprint
    m = copy.deepcopy(tiny_llama.model)
    assert same_base(fingerprint(m.to(torch.bfloat16)), fp), (
        "bf16 copy of the same weights has the same fingerprint"
    )
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    assert not same_base(fingerprint(m), fp)


def test_merge_namespaces_tagsets(tiny_llama):
    a, b = make_tagset(tiny_llama), make_tagset(tiny_llama)
    m = merge_tagsets({"a": a, "b": b})
    assert set(m.tags) == {"a/<SMILES>", "a/<QED>", "b/<SMILES>", "b/<QED>"}
    assert set(m.head_stats) == {"a/<QED>", "b/<QED>"}


def test_bad_artifact_folders(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_tagset(str(tmp_path))
    assert "tagset.json" in e.value.message
    (tmp_path / "tagset.json").write_text("{not json")
    with pytest.raises(ConfigError):
        load_tagset(str(tmp_path))


def test_no_pickle_in_artifacts(tiny_llama, tmp_path):
    save_tagset(make_tagset(tiny_llama), str(tmp_path / "t"))
    for f in os.listdir(tmp_path / "t"):
        data = (tmp_path / "t" / f).read_bytes()
        assert b"\x80\x04" not in data[:2] and not f.endswith((".pt", ".pkl", ".bin"))


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_base_from_local_folder(tiny_llama, tiny_base_dir):
    b = load_base(tiny_base_dir)
    assert _same_weights(b.model, tiny_llama.model)
    assert same_base(b.fingerprint, tiny_llama.fingerprint)
    assert not any(p.requires_grad for p in b.model.parameters())


def test_load_base_from_s3_is_cached_per_node(tiny_llama, tiny_base_dir, s3_bucket, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("TAGRAY_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3")
    fs.put(tiny_base_dir + "/", f"{s3_bucket}/models/tiny/", recursive=True)
    b = load_base(f"s3://{s3_bucket}/models/tiny")
    assert _same_weights(b.model, tiny_llama.model)
    local = tmp_path / "cache" / "s3" / s3_bucket / "models" / "tiny"
    assert (local / ".complete").exists()
    fs.rm(f"{s3_bucket}/models/tiny", recursive=True)  # a second load must not touch S3 again
    assert same_base(load_base(f"s3://{s3_bucket}/models/tiny").fingerprint, tiny_llama.fingerprint)
    with pytest.raises(ConfigError) as e:
        load_base(f"s3://{s3_bucket}/models/missing")
    assert e.value.field == "base"


def test_load_base_by_hub_id_from_the_hub_cache(tiny_llama, tiny_base_dir):
    """A hub id resolves through huggingface_hub's cache (offline here; online it downloads the same way)."""
    from huggingface_hub import constants

    repo = os.path.join(constants.HF_HUB_CACHE, "models--tagray-test--tiny-llama")
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = os.path.join(repo, "snapshots", rev)
    shutil.copytree(tiny_base_dir, snap, dirs_exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(rev)
    b = load_base("tagray-test/tiny-llama")
    assert _same_weights(b.model, tiny_llama.model)
    with pytest.raises(ConfigError) as e:
        load_base("tagray-test/not-in-cache")
    assert e.value.field == "base"


@pytest.mark.slow
def test_packaged_smollm2_is_a_real_pretrained_model(smollm2):
    assert smollm2.fingerprint["model_type"] == "llama" and smollm2.fingerprint["d_model"] == 576
    assert sum(p.numel() for p in smollm2.model.parameters()) > 130_000_000
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = smollm2.model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1] :])
