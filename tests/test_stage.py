"""The stage recipe without Ray: three stages as data, frozen tags, resume, mixed domains, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tagray.config import parse_pipeline
from tagray.core.artifacts import load_tagset
from tagray.core.errors import ConfigError
from tagray.pipeline import plan, run_pipeline
from tagray.train import Runtime, StageJob, run_stage

from .factories import stage_dict, tiny_pipeline

SMALL = {"train": 24, "valid": 8, "test": 8}


def pipeline(base_dir, out, **train):
    return tiny_pipeline(
        base_dir,
        str(out),
        train={
            "max_steps": 3,
            "eval_every": 3,
            "batch_size": 4,
            "eval_rows": 8,
            "lr": 1e-2,
            "probe_rows": 16,
            **train,
        },
        stages=[
            stage_dict("domain", "smiles_lm", "protein_lm", limits=SMALL),
            stage_dict("single", "qed", "amp", limits=SMALL),
            stage_dict(
                "cross",
                "tanimoto",
                "translate",
                limits=SMALL,
                train_tags=["<Similarity>", "<Translate>", "<EN>", "<FR>", "<DE>", "<ES>"],
            ),
        ],
    )


@pytest.fixture(scope="module")
def three_stages(tiny_base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = pipeline(tiny_base_dir, out)
    return cfg, run_pipeline(cfg)


def test_three_stages_chain_and_freeze(three_stages):
    cfg, res = three_stages
    d, s, c = (load_tagset(res[n]["path"]) for n in ("domain", "single", "cross"))
    assert set(d.tags) == {"<SMILES>", "<Protein>"}
    assert set(s.tags) == {"<SMILES>", "<Protein>", "<QED>", "<AMP>"}
    assert {"<Similarity>", "<Translate>", "<FR>"} <= set(c.tags)
    # earlier-stage tags are bit-identical in later stages
    for n in d.tags:
        assert torch.equal(d.tags[n], s.tags[n]) and torch.equal(d.tags[n], c.tags[n])
    for n in ("<QED>", "<AMP>"):
        assert torch.equal(s.tags[n], c.tags[n]) and torch.equal(s.heads[n], c.heads[n])
    assert s.tag_info["<SMILES>"]["stage"] == "domain" and s.tag_info["<QED>"]["kind"] == "function"
    assert s.head_specs["<AMP>"].kind == "classification" and s.head_specs["<AMP>"].classes == (
        "AMP",
        "UniProt",
    )
    # each stage recorded its test metrics
    assert "mse" in s.metrics["qed"]["test"] and "accuracy" in s.metrics["amp"]["test"]
    assert "perplexity" in d.metrics["smiles_lm"]["test"] and "bleu" in c.metrics["translate"]["test"]


def test_rerun_skips_finished_stages(three_stages):
    cfg, _ = three_stages
    assert all(done for _, _, done in plan(cfg))
    res = run_pipeline(cfg)
    assert all(r.get("skipped") for r in res.values())
    # a subset run leaves the run folder's summary describing every current stage, in pipeline order
    assert list(run_pipeline(cfg, only=["cross"])) == ["cross"]
    summary = json.loads((Path(cfg.run_dir()) / "summary.json").read_text())
    assert list(summary) == ["domain", "single", "cross"] and summary["single"]["kept_step"]


def test_resume_from_checkpoint_continues_the_run(tiny_llama, tmp_path):
    cfg = pipeline("unused", tmp_path, max_steps=4, eval_every=2)
    st = cfg.stages[0]
    ckpt = str(tmp_path / "ckpt")
    rt = Runtime(checkpoint_dir=ckpt)
    run_stage(StageJob(stage=st, output=str(tmp_path / "a")), rt, base=tiny_llama)
    assert [r["step"] for r in rt.reports] == [2, 4]
    # a new run over the same checkpoint directory starts at step 4: nothing left to do but evaluate
    rt2 = Runtime(checkpoint_dir=ckpt)
    ts, _ = run_stage(StageJob(stage=st, output=str(tmp_path / "b")), rt2, base=tiny_llama)
    assert rt2.reports == []
    assert torch.equal(ts.tags["<SMILES>"], load_tagset(str(tmp_path / "a")).tags["<SMILES>"])


@pytest.mark.slow
def test_real_smollm2_learns_a_domain_tag(smollm2):
    """Training the real SmolLM2's <SMILES> tag lowers the held-out LM loss on real molecules."""
    cfg = parse_pipeline(
        {
            "name": "x",
            "stages": [
                {
                    "name": "s",
                    "tasks": [{"task": "smiles_lm", "limits": {"train": 64, "valid": 16, "test": 8}}],
                }
            ],
            "train": {
                "max_steps": 12,
                "eval_every": 6,
                "batch_size": 4,
                "eval_rows": 16,
                "tag_length": 4,
                "lr": 1e-2,
            },
        }
    )
    job = StageJob(stage=cfg.stages[0])
    from tagray.train import build_setup
    from tagray.train.evaluate import evaluate

    setup = build_setup(job, smollm2)
    before = evaluate(setup, setup.tasks, "valid", Runtime(), torch.device("cpu"), limit=16)["smiles_lm"][
        "loss"
    ]
    rt = Runtime()
    run_stage(job, rt, base=smollm2)
    after = rt.reports[-1]["val/smiles_lm/loss"]
    assert after < before - 0.05, (before, after)
    assert not any(p.requires_grad for p in smollm2.model.parameters())


@pytest.mark.slow
def test_real_smollm2_function_tag_ends_below_step0(smollm2, tmp_path):
    """The shipped stage-2 recipe (varpro: full-batch leave-one-out gradient, normalised steps of lr 1e-2,
    p = 2) on the real SmolLM2 at a small budget (1000 rows, 3 steps): the kept <QED> state is a trained step,
    and its validation loss is below the step-0 ridge probe's (which it could fail: the probe is a strong
    start, and on 400 rows the same steps made validation worse at every step)."""
    cfg = parse_pipeline(
        {
            "name": "x",
            "stages": [
                {"name": "s", "tasks": [{"task": "qed", "limits": {"train": 1000, "valid": 100, "test": 8}}]}
            ],
            "train": {
                "head_mode": "varpro",
                "optimizer": "ngd",
                "lr": 1e-2,
                "batch_size": 1000,
                "epochs": 3,
                "eval_every": 1,
                "eval_rows": 100,
                "tag_length": 2,
            },
        }
    )
    rt = Runtime()
    ts, _ = run_stage(StageJob(stage=cfg.stages[0], output=str(tmp_path / "s")), rt, base=smollm2)
    history = json.loads((tmp_path / "s" / "curves.json").read_text())  # step 0 first, then every step
    vals = [h["val/qed/loss"] for h in history]
    assert history[0]["step"] == 0 and len(vals) == 4, history
    assert min(vals[1:]) < vals[0], vals
    assert (tmp_path / "s" / "curves.png").exists()
    assert ts.metrics["qed"]["kept_step"] > 0, (ts.metrics["qed"], vals)


def test_stage_config_errors_name_the_key(tiny_llama):
    with pytest.raises(ConfigError) as e:
        parse_pipeline({"name": "x", "stages": [{"name": "s", "tasks": ["qed"], "train": {"lrr": 1}}]})
    assert e.value.field == "stages[0].train.lrr"
    with pytest.raises(ConfigError) as e:
        parse_pipeline({"name": "x", "stages": [{"name": "s", "tasks": ["qed"], "train": {"tag_length": 0}}]})
    assert e.value.field == "stages[0].train.tag_length"
    with pytest.raises(ConfigError) as e:
        parse_pipeline(
            {"name": "x", "stages": [{"name": "s", "tasks": ["qed"], "train": {"max_steps": "many"}}]}
        )
    assert e.value.field == "stages[0].train.max_steps"
    cfg = parse_pipeline(
        {
            "name": "x",
            "stages": [{"name": "s", "tasks": [{"task": "qed", "limits": SMALL}], "train_tags": ["<Nope>"]}],
        }
    )
    with pytest.raises(ConfigError) as e:
        run_stage(StageJob(stage=cfg.stages[0]), Runtime(), base=tiny_llama)
    assert e.value.field == "train_tags"


def test_untrained_tags_stay_at_init_while_the_head_trains(tiny_llama, tmp_path):
    def stage(**extra):
        return tiny_pipeline(
            name="x",
            train={"max_steps": 3, "eval_every": 3, "batch_size": 4, "eval_rows": 8, "tag_length": 1},
            tiny_train=False,
            stages=[stage_dict("s", "qed", limits=SMALL, **extra)],
        ).stages[0]

    ck = tmp_path / "ck"  # the last step's state (the returned tag set is the best one, maybe step 0's)
    ts, _ = run_stage(
        StageJob(stage=stage(untrained_tags=["<QED>"], train_tags=["<SMILES>"])),
        Runtime(checkpoint_dir=str(ck)),
        base=tiny_llama,
    )
    last = load_tagset(str(ck))
    emb = tiny_llama.model.get_input_embeddings().weight
    from tagray.core.tags import mean_embedding_init

    init = mean_embedding_init(emb, 1, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(last.tags["<QED>"], init) and torch.equal(ts.tags["<QED>"], init)  # never trained
    assert not torch.equal(last.tags["<SMILES>"], init)  # trained beside it
    assert "<QED>" in ts.heads
    for bad, field in (
        ({"untrained_tags": ["<Nope>"]}, "untrained_tags"),
        ({"untrained_tags": ["<QED>"], "train_tags": ["<QED>"]}, "untrained_tags"),
    ):
        with pytest.raises(ConfigError) as e:
            run_stage(StageJob(stage=stage(**bad)), Runtime(), base=tiny_llama)
        assert e.value.field == field


def test_format_decimal_label():
    from tagray.tasks.labels import compute

    assert compute("format.decimal", 0.12345) == "0.123"
    assert compute("format.decimal", "x") is None


def test_pipeline_publishes_its_last_stage_to_the_registry(three_stages, tiny_llama):
    from tagray.registry import list_tagsets
    from tagray.serving import Predictor

    cfg, res = three_stages
    registry = cfg.registry_dir()
    assert registry == cfg.output + "/registry" and list_tagsets(registry) == ["t"]
    cross = load_tagset(res["cross"]["path"])
    served = load_tagset(registry + "/tagsets/t")
    assert set(served.tags) == set(cross.tags) and torch.equal(served.heads["<QED>"], cross.heads["<QED>"])
    # what `tagray serve --registry` loads answers a stage-2 task from the published last stage
    pred = Predictor.from_registry(tiny_llama, registry)
    (out,) = pred.predict([{"tag": "<QED>", "inputs": {"smiles": "CCO"}}])
    assert out["tagset"] == "t" and isinstance(out["prediction"], float)


def test_stage_hash_ignores_execution_only_keys():
    """Sharing the prefix store or logging more often cannot change an artifact, so neither re-runs
    finished stages."""
    from dataclasses import replace

    from tagray.config import stage_hash

    cfg = pipeline("unused", "out")
    st = cfg.stages[1]
    shared = replace(st, train=replace(st.train, prefix_cache_shared="auto", progress_s=5.0))
    other_lr = replace(st, train=replace(st.train, lr=st.train.lr * 2))
    assert stage_hash(cfg, shared) == stage_hash(cfg, st) != stage_hash(cfg, other_lr)
