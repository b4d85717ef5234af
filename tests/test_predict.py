"""Predictor: one forward pass over many tag sets, ensembles, zero-shot composition, generation, errors.

Fast: tiny random models with a small in-process tokenizer (tagray.core.tiny), tag sets built directly
(no training). Tags need not be trained for equality tests; random tags make compositions and ensemble
members differ visibly.
"""

from __future__ import annotations

import copy
import math
import unicodedata

import pytest
import torch

from tagray.core.artifacts import TagSet, save_tagset
from tagray.core.base import Base
from tagray.core.errors import ConfigError, FingerprintMismatch, InputError, TagrayError, UnknownTagError
from tagray.core.heads import HeadSpec
from tagray.core.model import TagLLM
from tagray.core.tags import TagBank, mean_embedding_init
from tagray.core.template import template_tags
from tagray.core.weights import export_state, import_state
from tagray.serving import Predictor
from tagray.tasks.spec import load_task

from .factories import stage_dict, tiny_pipeline

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C"]
PEPTIDES = ["GLFDIVKKVVGALGSL", "KWKLFKKIEKVGQNIRDGIIKAGPAVAVVGQATQIAK"]


def random_tagset(
    base: Base, tasks: list[str], seed: int = 0, length: int = 3, extra_tags=(), stage: str = "s1"
) -> TagSet:
    """A tag set for ``tasks`` on ``base`` with random tags and heads (no data, no training).

    ``extra_tags`` adds domain tags that dynamic template slots resolve to (e.g. ``<FR>``).
    """
    g = torch.Generator().manual_seed(seed)
    emb = base.model.get_input_embeddings().weight
    d = emb.shape[1]
    tags, info, heads, specs, stats, task_docs = {}, {}, {}, {}, {}, {}

    def add(name: str, kind: str) -> None:
        if name not in tags:
            t = mean_embedding_init(emb, length)
            tags[name] = t + torch.randn(t.shape, generator=g) * t.norm(dim=1, keepdim=True) / d**0.5
            info[name] = {"kind": kind, "length": length, "stage": stage}

    for name in tasks:
        spec = load_task(name)
        task_docs[spec.name] = spec.to_json()
        for t in template_tags(spec.template):
            add(t, "function" if t == spec.function_tag else "domain")
        if spec.head_tag:
            if spec.target.kind == "regression":
                k = len(spec.target.columns)
                specs[spec.head_tag] = HeadSpec("regression", k, (0.5,) * k, (0.2,) * k)
            else:
                specs[spec.head_tag] = HeadSpec(
                    "classification", len(spec.target.classes), classes=spec.target.classes
                )
            heads[spec.head_tag] = torch.randn(specs[spec.head_tag].out_dim, d + 1, generator=g) * 0.5
            stats[spec.head_tag] = torch.stack([torch.randn(d, generator=g) * 0.1, torch.ones(d)])
    for t in extra_tags:
        add(t, "domain")
    return TagSet(
        tags,
        heads,
        info,
        specs,
        base.fingerprint,
        tasks=task_docs,
        metrics={t: {"test": {"mse": 0.01}, "stage": stage} for t in task_docs},
        stage=stage,
        head_stats=stats,
    )


@pytest.fixture(scope="module")
def sets(tiny_llama):
    return {
        "chem": random_tagset(tiny_llama, ["qed", "logp"], seed=1),
        "chem2": random_tagset(tiny_llama, ["qed", "logp"], seed=2),
        "prot": random_tagset(tiny_llama, ["amp", "descriptor"], seed=3),
        "lang": random_tagset(tiny_llama, ["translate"], seed=4, extra_tags=["<EN>", "<FR>", "<DE>", "<ES>"]),
    }


@pytest.fixture(scope="module")
def pred(tiny_llama, sets):
    return Predictor(tiny_llama, sets, {"chem-ens": ["chem", "chem2"]})


def same(a, b, tol: float = 1e-5) -> bool:
    """Equal JSON-like values, floats within ``tol`` (padding in a shared batch moves the last bits)."""
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and math.isclose(a, b, rel_tol=tol, abs_tol=tol)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(same(x, y, tol) for x, y in zip(a, b, strict=True))
        )
    return a == b


def qed(smiles: str, **kw) -> dict:
    return {"tag": "<QED>", "inputs": {"smiles": smiles}, **kw}


def test_matches_the_training_path(tiny_llama):
    """A tag set from the real stage code predicts exactly what the training model predicts."""
    from tagray.train import StageJob, build_setup
    from tagray.train.batches import encode_rows, make_batch
    from tagray.train.checkpoint import current_tagset

    cfg = tiny_pipeline(
        train={"tag_length": 3, "max_steps": 1},
        tiny_train=False,
        stages=[stage_dict("s1", "qed", limits={"train": 32, "valid": 8, "test": 8})],
    )
    setup = build_setup(StageJob(cfg.stages[0]), tiny_llama)
    with torch.no_grad():  # make the tags differ from their (identical) init
        setup.model.tags.trainable.add_(torch.randn_like(setup.model.tags.trainable) * 0.1)
    setup.model.eval()
    exs = encode_rows(setup.tasks, tiny_llama.tokenizer, setup.model.tags, "test", 8)
    with torch.no_grad():
        want = setup.model(make_batch(exs, setup.head_names(), tiny_llama.tokenizer.pad_token_id)).preds[:, 0]
    rows = setup.tasks[0].splits["test"][:8]
    p = Predictor(tiny_llama, {"trained": current_tagset(setup, stage="s1")})
    answers = p.predict([qed(r["smiles"]) for r in rows])
    got = [a["members"]["trained"] for a in answers]  # the member's own value, before clipping
    assert torch.allclose(torch.tensor(got), want, atol=1e-5)
    # the answer is clipped to QED's declared range [0, 1]
    clipped = torch.tensor([a["prediction"] for a in answers])
    assert torch.allclose(clipped, want.clamp(0, 1), atol=1e-5)


def test_mixed_batch_equals_single_requests(pred):
    reqs = [
        qed(SMILES[0]),
        qed(SMILES[1], tagset="chem2"),
        qed(SMILES[2], ensemble="chem-ens"),
        {"task": "logp", "inputs": {"smiles": SMILES[3]}, "compose": {"<SMILES>": "chem2"}},
        {"tag": "<AMP>", "inputs": {"seq": PEPTIDES[0]}},
        {"tag": "Descriptor", "tagset": "prot", "inputs": {"seq": PEPTIDES[1]}},
    ]
    before = pred.stats["forward_passes"]
    batch = pred.predict(reqs)
    assert pred.stats["forward_passes"] == before + 1  # 7 rows (one ensemble of 2), one forward pass
    for r, b in zip(reqs, batch, strict=True):
        (s,) = pred.predict([r])
        assert same(s, b), (s, b)


def test_ensemble_is_mean_of_members(pred):
    (e,) = pred.predict([qed(SMILES[2], ensemble="chem-ens")])
    a, b = (pred.predict([qed(SMILES[2], tagset=s)])[0]["prediction"] for s in ("chem", "chem2"))
    assert e["ensemble"] == "chem-ens" and e["tagset"] is None
    assert e["members"] == pytest.approx({"chem": a, "chem2": b}, abs=1e-6)
    assert e["prediction"] == pytest.approx((a + b) / 2, abs=1e-6)
    assert e["std"] == pytest.approx(abs(a - b) / 2, abs=1e-6)
    assert abs(a - b) > 1e-4  # members really differ


def test_composition_equals_a_set_holding_those_tags(tiny_llama, sets, pred):
    """Composing chem2's <SMILES> with chem's <QED> = a tag set that holds exactly those two tags."""
    chem, chem2 = sets["chem"], sets["chem2"]
    mix = TagSet(
        {"<SMILES>": chem2.tags["<SMILES>"], "<QED>": chem.tags["<QED>"]},
        {"<QED>": chem.heads["<QED>"]},
        {t: chem.tag_info[t] for t in ("<SMILES>", "<QED>")},
        {"<QED>": chem.head_specs["<QED>"]},
        chem.base,
        tasks={"qed": chem.tasks["qed"]},
        head_stats={"<QED>": chem.head_stats["<QED>"]},
    )
    want = Predictor(tiny_llama, {"mix": mix}).predict([qed(SMILES[1])])[0]["prediction"]
    (got,) = pred.predict([qed(SMILES[1], tagset="chem", compose={"<SMILES>": "chem2"})])
    assert got["composition"]["chem"] == {"<SMILES>": "chem2/<SMILES>", "<QED>": "chem/<QED>"}
    assert got["prediction"] == pytest.approx(want, abs=1e-6)
    plain = pred.predict([qed(SMILES[1], tagset="chem")])[0]["prediction"]
    assert abs(plain - want) > 1e-5
    # a domain tag under another name from another set: "set/<Tag>"
    (x,) = pred.predict([qed(SMILES[1], compose={"<SMILES>": "chem2/<SMILES>"})])
    assert x["prediction"] == pytest.approx(want, abs=1e-6)


def test_classification_returns_label_and_probabilities(pred):
    (r,) = pred.predict([{"tag": "<AMP>", "inputs": {"seq": PEPTIDES[0].lower()}}])  # lower case is accepted
    assert r["prediction"] in ("AMP", "UniProt") and r["kind"] == "classification"
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)


def test_generate_matches_offline_and_composes_zero_shot(tiny_llama, sets, pred):
    from tagray.train.evaluate import generate_text

    lang = sets["lang"]
    rows = [
        {"src_lang": "FR", "tgt_lang": "DE", "src": "Bonjour le monde"},  # a pair never trained together
        {"src_lang": "EN", "tgt_lang": "ES", "src": "Save changes"},
    ]
    spec = load_task("translate")
    model = TagLLM(tiny_llama.model, TagBank(lang.tags)).eval()
    want = [
        generate_text(model, tiny_llama.tokenizer, spec, [{**r, "tgt": ""}], "cpu", max_new_tokens=8)[0]
        for r in rows
    ]
    reqs = [{"tag": "<Translate>", "inputs": r, "max_new_tokens": 8} for r in rows]
    got = pred.generate(reqs)
    assert [g["text"] for g in got] == want
    assert got[0]["composition"]["lang"]["<FR>"] == "lang/<FR>" and got[0]["task"] == "translate"
    short = pred.generate([{**reqs[0], "max_new_tokens": 3}, reqs[1]])  # per-row limits in one pass
    assert len(tiny_llama.tokenizer.encode(short[0]["text"])) <= 4 and short[1]["text"] == want[1]


def gen(src_lang: str, tgt_lang: str) -> dict:
    return {
        "tag": "<Translate>",
        "inputs": {"src_lang": src_lang, "tgt_lang": tgt_lang, "src": "hi"},
        "_generate": True,
    }


@pytest.mark.parametrize(
    "req, err, field",
    [
        (qed("C1CC"), InputError, "inputs.smiles"),  # unclosed ring: invalid SMILES
        ({"tag": "<AMP>", "inputs": {"seq": "MKTXZ"}}, InputError, "inputs.seq"),  # not amino acids
        (qed("CCO", tagset="nope"), UnknownTagError, "tagset"),
        (qed("CCO", ensemble="nope"), UnknownTagError, "ensemble"),
        ({"tag": "<Nope>", "inputs": {"smiles": "CCO"}}, UnknownTagError, "tag"),
        ({"task": "nope", "inputs": {"smiles": "CCO"}}, UnknownTagError, "task"),
        (
            qed("CCO", compose={"<SMILES>": "chem/<QED>"}),
            InputError,
            "compose.<SMILES>",
        ),  # function tag as domain
        (qed("CCO", compose={"<SMILES>": "prot/<Protein>", "<Foo>": "chem"}), InputError, "compose.<Foo>"),
        (qed("CCO", compose={"<SMILES>": "lang/<XX>"}), UnknownTagError, "compose.<SMILES>"),
        (gen("Translate", "FR"), InputError, "inputs.src_lang"),  # a function tag in a domain slot
        (gen("PT", "FR"), UnknownTagError, "inputs.src_lang"),  # no such language tag
        (gen("FR", "a b"), InputError, "inputs.tgt_lang"),
        (qed("C" * 400), InputError, "inputs.smiles"),  # over the task's max_length tokens
        (qed("C" * 20_000), InputError, "inputs.smiles"),  # over MAX_CHARS
        ({"tag": "<QED>", "inputs": {}}, InputError, "inputs.smiles"),
        ({"tag": "<QED>", "inputs": {"smiles": 5}}, InputError, "inputs.smiles"),
        ({"inputs": {"smiles": "CCO"}}, InputError, "tag"),
        (qed("C\ud800C"), InputError, "inputs.smiles"),  # a lone surrogate (JSON can carry one)
        (
            {**gen("FR", "DE"), "inputs": {"src_lang": "FR", "tgt_lang": "DE", "src": "a\ud800"}},
            InputError,
            "inputs.src",
        ),
        ({"tag": "<QED>", "inputs": {"smiles": "CCO"}, "bogus": 1}, InputError, "bogus"),
        (qed("CCO", tagset="chem", ensemble="chem-ens"), InputError, "ensemble"),
        (
            {"tag": "<Translate>", "inputs": {"src_lang": "FR", "tgt_lang": "EN", "src": "x"}},
            InputError,
            "task",
        ),
        ({"tag": "not a tag!", "inputs": {}}, InputError, "tag"),
    ],
)
def test_bad_requests_name_the_field(pred, req, err, field):
    with pytest.raises(err) as e:
        if req.pop("_generate", False):
            pred.generate([req])
        else:
            pred.predict([req])
    assert e.value.field == field, e.value
    assert 400 <= e.value.status < 500


def test_extra_inputs_are_ignored_and_task_kind(pred):
    """Rows of a labelled CSV (``tagray predict --input-file``) carry ids and targets: not inputs."""
    a = pred.predict([qed("CCO", tagset="chem")])[0]
    b = pred.predict(
        [{"tag": "<QED>", "tagset": "chem", "inputs": {"smiles": "CCO", "qed": "0.5", "id": "7"}}]
    )[0]
    assert a == b
    assert [pred.task_kind(t) for t in ("qed", "amp", "translate")] == ["regression", "classification", "lm"]
    with pytest.raises(UnknownTagError):
        pred.task_kind("nope")


def test_errors_are_per_request_when_asked(pred):
    out = pred.predict([qed("CCO"), qed("C1CC"), qed("CCN")], return_errors=True)
    assert isinstance(out[1], InputError) and out[1].field == "inputs.smiles"
    assert out[0]["prediction"] != out[2]["prediction"]
    g = pred.generate(
        [
            {"tag": "<QED>", "inputs": {"smiles": "CCO"}},
            {
                "tag": "<Translate>",
                "inputs": {"src_lang": "EN", "tgt_lang": "FR", "src": "Hi"},
                "max_new_tokens": 0,
            },
        ],
        return_errors=True,
    )
    assert g[0].field == "task" and g[1].field == "max_new_tokens"


def test_other_base(tiny_llama, tiny_gpt2, sets, tmp_path):
    foreign = random_tagset(tiny_gpt2, ["qed"], seed=5)
    with pytest.raises(FingerprintMismatch) as e:
        Predictor(tiny_llama, {"chem": sets["chem"], "gpt": foreign})
    assert e.value.status == 409 and e.value.field == "tagsets.gpt"
    # from a registry: the foreign set is refused per request, the rest keeps working
    from tagray.registry import publish_ensemble, publish_tagset

    reg = str(tmp_path / "reg")
    publish_tagset(reg, "chem", sets["chem"])
    publish_tagset(reg, "gpt", foreign)
    publish_ensemble(reg, "both", ["chem", "gpt"])
    p = Predictor.from_registry(tiny_llama, reg)
    assert p.predict([qed("CCO")])[0]["tagset"] == "chem"
    for req, field in (
        (qed("CCO", tagset="gpt"), "tagset"),
        (qed("CCO", ensemble="both"), "ensemble"),
        (qed("CCO", compose={"<SMILES>": "gpt"}), "compose.<SMILES>"),
    ):
        with pytest.raises(FingerprintMismatch) as e:
            p.predict([req])
        assert e.value.field == field and e.value.status == 409
    with pytest.raises(ConfigError) as e:
        Predictor.from_registry(tiny_llama, str(tmp_path / "nope"))
    assert e.value.field == "registry"
    d = p.describe()
    assert d["tagsets"] == ["chem"] and d["rejected"]["gpt"]["error"] == "FingerprintMismatch"
    assert d["ensembles"] == {"both": {"members": ["chem", "gpt"]}}


def test_catalogue(pred, sets):
    cat = {r["id"]: r for r in pred.catalogue()}
    q = cat["chem/<QED>"]
    assert q["kind"] == "function" and q["length"] == 3 and q["stage"] == "s1" and q["tasks"] == ["qed"]
    assert (
        q["metrics"] == {"qed": {"test": {"mse": 0.01}, "stage": "s1"}} and q["head"]["kind"] == "regression"
    )
    assert q["base"].startswith("llama-d32-L2")
    assert cat["chem/<SMILES>"]["kind"] == "domain" and set(cat["chem/<SMILES>"]["tasks"]) == {"qed", "logp"}
    assert cat["lang/<FR>"]["kind"] == "domain" and cat["lang/<FR>"]["tasks"] == ["translate"]
    assert cat["lang/<Translate>"]["tasks"] == ["translate"]
    assert len(cat) == sum(len(s.tags) for s in sets.values())


def test_saved_and_reloaded_sets_predict_the_same(tiny_llama, sets, pred, tmp_path):
    from tagray.core.artifacts import load_tagset

    save_tagset(sets["chem"], str(tmp_path / "chem"))
    p = Predictor(
        tiny_llama, {"chem": load_tagset(str(tmp_path / "chem"), expect_base=tiny_llama.fingerprint)}
    )
    assert p.predict([qed(SMILES[3])])[0]["prediction"] == pytest.approx(
        pred.predict([qed(SMILES[3], tagset="chem")])[0]["prediction"], abs=1e-6
    )


def test_bf16_shared_base(tiny_llama, sets, pred):
    """A bf16 base rebuilt from exported arrays (how Serve replicas attach it) stays bf16 and predicts."""
    model = import_state(export_state(copy.deepcopy(tiny_llama.model).to(torch.bfloat16)))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    base = Base("bf16", model, tiny_llama.tokenizer, tiny_llama.fingerprint)
    got = Predictor(base, {"chem": sets["chem"]}).predict([qed(s) for s in SMILES])
    want = pred.predict([qed(s, tagset="chem") for s in SMILES])
    for g, w in zip(got, want, strict=True):
        assert g["prediction"] == pytest.approx(w["prediction"], abs=0.05)


def test_stale_ensemble_is_refused_per_request(tiny_llama, sets):
    p = Predictor(tiny_llama, {"chem": sets["chem"]}, {"ok": ["chem"], "stale": ["chem", "gone"]})
    assert p.predict([qed("CCO", ensemble="ok")])[0]["ensemble"] == "ok"
    with pytest.raises(UnknownTagError) as e:
        p.predict([qed("CCO", ensemble="stale")])
    assert e.value.field == "ensemble" and "gone" in e.value.message
    assert p.describe()["rejected"]["stale"]["error"] == "UnknownTagError"


def test_empty_predictor(tiny_llama):
    p = Predictor(tiny_llama, {})
    assert p.catalogue() == []
    with pytest.raises(UnknownTagError):
        p.predict([qed("CCO")])
    out = p.predict([qed("CCO")], return_errors=True)
    assert isinstance(out[0], TagrayError)


# ---- shared prefixes, deduplicated tags, control characters ------------------------------------------


@pytest.fixture(scope="module")
def trials(tiny_llama):
    """Four search trials: the same stage-1 ``<SMILES>`` (inherited, identical values), their own <QED>."""
    out = {f"trial{i}": random_tagset(tiny_llama, ["qed"], seed=20 + i) for i in range(4)}
    shared = out["trial0"].tags["<SMILES>"]
    for ts in out.values():
        ts.tags["<SMILES>"] = shared.clone()
    return out


def test_merge_dedupes_identical_tags_and_keeps_aliases(trials):
    from tagray.core.artifacts import merge_tagsets

    m = merge_tagsets(trials)
    assert [n for n in m.tags if n.endswith("<SMILES>")] == ["trial0/<SMILES>"]  # one entry for 4 sets
    assert len([n for n in m.tags if n.endswith("<QED>")]) == 4  # different values: kept apart
    aliases = m.meta["aliases"]
    assert {aliases[f"trial{i}/<SMILES>"] for i in range(4)} == {"trial0/<SMILES>"}
    assert all(aliases[f"trial{i}/<QED>"] == f"trial{i}/<QED>" for i in range(4))
    assert set(m.heads) == {f"trial{i}/<QED>" for i in range(4)}  # heads are never merged


def test_ensemble_computes_its_shared_prefix_once(tiny_llama, trials):
    names = sorted(trials)
    p = Predictor(tiny_llama, trials, {"top4": names})
    off = Predictor(tiny_llama, trials, {"top4": names}, prefix_cache_bytes=0)  # no split at all
    assert off.model.prefix == "off" and p.model.prefix == "auto"
    (e,) = p.predict([qed(SMILES[3], ensemble="top4")])
    assert p.model.last_split["computed_rows"] == 1  # 4 member rows, one prompt prefix
    assert p.stats["prefix_rows_computed"] == 1 and p.stats["prefix_rows_reused"] == 3
    # the suffix is the function tag only: 3 vectors of <QED> per member
    assert p.model.last_split["tokens"] - p.model.last_split["prefix_tokens"] == 4 * 3
    singles = {n: p.predict([qed(SMILES[3], tagset=n)])[0]["prediction"] for n in names}
    assert e["members"] == pytest.approx(singles, abs=1e-5)
    assert len({round(v, 4) for v in singles.values()}) == 4  # the members really differ
    (full,) = off.predict([qed(SMILES[3], ensemble="top4")])
    assert same(e, full), (e, full)
    assert e["composition"]["trial2"]["<SMILES>"] == "trial2/<SMILES>"  # the alias is what clients see
    # the same request again: its prefix comes from the store
    (again,) = p.predict([qed(SMILES[3], ensemble="top4")])
    assert p.model.last_split["computed_rows"] == 0 and same(again, e)


def test_split_equals_full_forward_on_a_mixed_batch(tiny_llama, sets):
    """Isolated spans, compositions, ensembles, proteins: the shared-prefix path = the full forward."""
    iso = copy.copy(sets["chem2"])
    iso.meta = {"train_config": {"isolate_spans": True}}
    mixed = {**sets, "iso": iso}
    ens = {"e": ["chem", "chem2", "iso"]}
    reqs = [
        qed(SMILES[0], ensemble="e"),
        qed(SMILES[1], tagset="iso"),
        qed(SMILES[2], tagset="iso", compose={"<SMILES>": "chem"}),
        {"task": "logp", "tagset": "iso", "inputs": {"smiles": SMILES[3]}},
        {"tag": "<AMP>", "inputs": {"seq": PEPTIDES[0]}},
        {"tag": "<Descriptor>", "inputs": {"seq": PEPTIDES[1]}},
    ]
    split = Predictor(tiny_llama, mixed, ens).predict(reqs)
    full = Predictor(tiny_llama, mixed, ens, prefix_cache_bytes=0).predict(reqs)
    for a, b in zip(split, full, strict=True):
        assert same(a, b), (a, b)
    plain = Predictor(tiny_llama, mixed).predict([qed(SMILES[1], tagset="chem2")])[0]["prediction"]
    assert abs(plain - split[1]["prediction"]) > 1e-5  # isolation really changed the answer


def test_generate_uses_trainings_decoding_with_isolated_spans(tiny_llama, sets):
    from tagray.train.evaluate import generate_text

    lang = copy.copy(sets["lang"])
    lang.meta = {"train_config": {"isolate_spans": True}}
    row = {"src_lang": "FR", "tgt_lang": "DE", "src": "Bonjour le monde"}
    model = TagLLM(tiny_llama.model, TagBank(lang.tags), isolate_spans=True).eval()
    spec = load_task("translate")
    want = generate_text(model, tiny_llama.tokenizer, spec, [{**row, "tgt": ""}], "cpu", max_new_tokens=8)[0]
    (got,) = Predictor(tiny_llama, {"lang": lang}).generate(
        [{"tag": "<Translate>", "inputs": row, "max_new_tokens": 8}]
    )
    assert got["text"] == want


CONTROL_CHARS = [
    chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cc" and chr(c) not in "\t\n\r"
]


def test_control_characters_are_refused_naming_the_field(pred):
    assert len(CONTROL_CHARS) == 65 - 3  # C0 (32), DEL, C1 (32), less tab / newline / return
    for c in CONTROL_CHARS:
        with pytest.raises(InputError) as e:
            pred.predict([qed(f"CC{c}O")])
        assert e.value.field == "inputs.smiles" and f"U+{ord(c):04X}" in e.value.message, e.value
    for req, field in (
        (qed("CCO", tagset="chem\x00"), "tagset"),
        (qed("CCO", compose={"<SMILES>": "chem2\x1b"}), "compose.<SMILES>"),
        ({"tag": "<QED>", "inputs": {"smiles": "CCO", "note\x00": "x"}}, "inputs.note\x00.[key]"),
        ({"task": "qed\x7f", "inputs": {"smiles": "CCO"}}, "task"),
    ):
        with pytest.raises(InputError) as e:
            pred.predict([req])
        assert e.value.field == field and e.value.status == 422, e.value
    ok = {"src_lang": "FR", "tgt_lang": "DE", "src": "Bonjour\tle\nmonde\r"}  # whitespace controls are text
    assert pred.generate([{"tag": "<Translate>", "inputs": ok, "max_new_tokens": 2}])[0]["text"] is not None


def test_encoders_are_bounded(tiny_llama, sets):
    """Compositions are user input: the template encoders they create are kept in a bounded LRU."""
    p = Predictor(tiny_llama, sets)
    p.resolver.encoders.size = 3
    for src in ("chem", "chem2", "lang/<FR>", "lang/<DE>", "prot/<Protein>"):
        p.predict([qed("CCO", tagset="chem", compose={"<SMILES>": src})])
    assert len(p.resolver.encoders) == 3
    assert p.predict([qed("CCO", tagset="chem", compose={"<SMILES>": "chem2"})])[0][
        "prediction"
    ] == pytest.approx(
        Predictor(tiny_llama, sets).predict([qed("CCO", tagset="chem", compose={"<SMILES>": "chem2"})])[0][
            "prediction"
        ],
        abs=1e-6,
    )


def test_regression_answers_are_clipped_and_flagged_out_of_distribution(tiny_llama, tmp_path):
    """#14.3: QED lies in [0, 1]; an answer outside it is clipped and flagged, and so is one outside the
    training targets' range or an input longer than any training input. The flags survive a save/load."""
    import dataclasses

    from tagray.core.artifacts import load_tagset, save_tagset

    ts = random_tagset(tiny_llama, ["qed"], seed=5)
    base_spec = ts.head_specs["<QED>"]
    ts.head_specs["<QED>"] = dataclasses.replace(
        base_spec, std=(50.0,), lo=(0.2,), hi=(0.8,), clip=(0.0, 1.0)
    )
    ts.head_specs["<QED>"] = dataclasses.replace(ts.head_specs["<QED>"], input_chars=(2, 12))
    save_tagset(ts, str(tmp_path / "t"))
    p = Predictor(tiny_llama, {"t": load_tagset(str(tmp_path / "t"))}, {})
    answers = p.predict([qed(s) for s in SMILES])
    for a in answers:  # a head with std 50 lands far outside [0, 1]: every answer is clipped and flagged
        assert 0.0 <= a["prediction"] <= 1.0, a
        assert a["out_of_distribution"] and any("clipped" in r for r in a["ood_reasons"]), a
    long = p.predict([qed("C" * 40)])[0]
    assert any("input length 40" in r for r in long["ood_reasons"]), long
    # inside every range: no flag
    calm = dataclasses.replace(
        base_spec, std=(1e-6,), lo=(0.0,), hi=(1.0,), clip=(0.0, 1.0), input_chars=(1, 99)
    )
    ts.head_specs["<QED>"] = calm
    a = Predictor(tiny_llama, {"t": ts}, {}).predict([qed("CCO")])[0]
    assert (
        not a["out_of_distribution"]
        and a["ood_reasons"] == []
        and a["prediction"] == pytest.approx(0.5, abs=1e-3)
    )


def test_task_range_is_validated_and_reaches_the_head(tiny_llama):
    from tagray.tasks.spec import parse_task

    assert load_task("qed").target.range == (0.0, 1.0)
    raw = load_task("qed").to_json()
    for bad in ([1, 0], [0], "0-1", ["a", 1]):
        with pytest.raises(ConfigError, match=r"target\.range"):
            parse_task({**raw, "target": {**raw["target"], "range": bad}})
