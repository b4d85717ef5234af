"""The benchmark scripts run end to end on tiny random models and write their JSON (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tagray.core.tiny import tiny_base
from tagray.train.job import Runtime, StageJob
from tagray.train.recipe import run_stage

from .factories import stage_dict, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]

# A bare GPU machine: torch, transformers and peft only. Imports of Ray, RDKit or datasets fail.
BARE = """
import runpy, sys
class _Bare:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "rdkit", "datasets", "s3fs"}:
            raise ModuleNotFoundError(f"no module named {name!r}", name=name)
sys.meta_path.insert(0, _Bare())
sys.argv = ["bench/gpu_bench.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_bench.py", run_name="__main__")
"""
# tagray's core needs torch + transformers + safetensors only: no Ray, no fsspec (peft itself needs fsspec)
CORE_WITHOUT_FSSPEC = """
import sys
class _Bare:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "rdkit", "datasets", "fsspec", "s3fs"}:
            raise ModuleNotFoundError(f"no module named {name!r}", name=name)
sys.meta_path.insert(0, _Bare())
import tagray.core.model, tagray.core.prefix, tagray.core.data, tagray.core.heads, tagray.core.tags
"""
PREFIX_SUITE = {
    "tagray cache fill",
    "tagray cache reuse",
    "tagray prefix recompute",
    "tagray full forward",
    "peft-head",
}
LEVERS = {"peft-lm (random)", "peft-head +logits (random)", "tagray full (random)", "tagray full +logits"}


def _check_prefix_cache(res: dict) -> None:
    """Every variant timed on the same rows; the cache filled in epoch 1 and was only read afterwards."""
    by = {v["name"]: v for v in res["variants"]}
    steps, epochs = res["config"]["steps"], res["config"]["epochs"]
    assert by["tagray cache fill"]["steps"] == steps and by["tagray cache reuse"]["steps"] == steps * (
        epochs - 1
    )
    assert all(
        by[n]["steps"] == steps * epochs for n in PREFIX_SUITE - {"tagray cache fill", "tagray cache reuse"}
    )
    assert all(v["rows_per_s"] > 0 and math.isfinite(v["last_loss"]) for v in by.values())
    # the same rows: tagray variants see the same tokens; PEFT sees them without tag slots, + virtual tokens
    tagray = {by[n]["useful_tokens"] / by[n]["steps"] for n in PREFIX_SUITE - {"peft-head"}}
    assert len(tagray) == 1
    assert (
        by["tagray full forward"]["nograd_slots"] == 0 and by["tagray prefix recompute"]["nograd_slots"] > 0
    )
    assert by["tagray cache reuse"]["nograd_slots"] == 0  # every prefix came from the store
    pc = res["prefix_cache"]
    assert set(pc["rows_per_s"]) == {"cache_reuse", "cache_fill", "prefix_recompute", "full_forward", "peft"}
    assert set(pc["speedup_vs_peft_same_batches"]) == set(pc["rows_per_s"]) - {"peft"}
    assert set(pc["rows_per_cpu_s"]) == set(pc["rows_per_s"])  # and the same on process CPU time
    assert set(pc["speedup_vs_peft_same_batches_cpu"]) == set(pc["speedup_vs_peft_same_batches"])
    c = pc["cache"]
    rows = steps * res["config"]["batch_size"]
    assert c["rows"] == rows and c["stats"] == {
        "hits": rows * (epochs - 1),
        "misses": rows,
        "spilled": 0,
        "evicted": 0,
        "shared_hits": 0,
        "shared_writes": 0,
    }
    # the measured bytes per row are the formula: layers x 2 x kv heads x head dim x dtype bytes x prefix tokens
    assert c["bytes_per_row_measured"] == pytest.approx(c["bytes_per_row_formula"], rel=1e-9)


def test_train_vs_peft_smoke(tmp_path, capsys):
    from bench import train_vs_peft

    out = tmp_path / "train_vs_peft.json"
    threads = torch.get_num_threads()
    try:
        assert train_vs_peft.main(["--smoke", "--levers", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets --threads for the whole process
    res = json.loads(out.read_text())
    assert res["config"]["base"] == "tiny-llama"  # tagray.core.tiny: no converted SmolLM2 needed
    assert {v["name"] for v in res["variants"]} == PREFIX_SUITE | LEVERS
    _check_prefix_cache(res)
    assert res["memory"]["peak_rss_gib"] > 0 and set(res["levers_rows_per_s_ratio"]) == set(
        train_vs_peft.PAIRS
    )
    printed = capsys.readouterr().out
    assert "tagray cache reuse" in printed and "B/token" in printed
    doc = tmp_path / "doc.md"
    doc.write_text("# x\n<!-- begin:train_vs_peft -->\nold\n<!-- end:train_vs_peft -->\n")
    train_vs_peft.DOC = doc  # --render writes the JSON's tables into the doc between the markers
    try:
        assert train_vs_peft.main(["--render", "--out", str(out)]) == 0
    finally:
        train_vs_peft.DOC = ROOT / "docs" / "benchmarks.md"
    assert "| tagray cache reuse |" in doc.read_text() and "old" not in doc.read_text()


@pytest.mark.slow  # two fresh interpreters importing torch + transformers: the integration tier
def test_gpu_bench_smoke_on_a_bare_machine(tmp_path):
    out = tmp_path / "gpu_bench.json"
    env = {**os.environ, "PYTHONPATH": ""}
    run = lambda code, *a: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, *a], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    core = run(CORE_WITHOUT_FSSPEC)
    assert core.returncode == 0, core.stderr[-3000:]
    r = run(BARE, "--smoke", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {v["name"] for v in res["variants"]} == PREFIX_SUITE
    _check_prefix_cache(res)
    assert res["params"]["n_block"] > 0 and set(res["mfu_definition"]) == {
        "N",
        "trained_tokens",
        "mfu_4n",
        "mfu_hw",
    }
    assert "tagray cache reuse" in r.stdout and "vs peft-head" in r.stdout


def test_gpu_bench_lengths_match_the_measured_smiles_distribution():
    from bench.gpu_bench import sample_lengths

    xs = sorted(sample_lengths(20000, random.Random(0)))
    assert 53 <= sum(xs) / len(xs) <= 57  # measured: mean 55, median 52, p95 80, max 287
    assert abs(xs[len(xs) // 2] - 52) <= 1 and abs(xs[int(0.95 * len(xs))] - 80) <= 2
    assert 30 <= xs[0] and xs[-1] <= 287


def test_reproduce_smoke(tmp_path):
    """Every method, ablation, sweep and the translation comparison on a tiny model: a regression and a
    classification task, two split seeds (mean and std), the page generated from the JSON."""
    from bench import reproduce

    out, doc = tmp_path / "reproduce.json", tmp_path / "reproduction.md"
    threads = torch.get_num_threads()
    cross = tmp_path / "cross"  # a stage-3-like artifact: language tags + <Translate>
    cfg = tiny_pipeline(stages=[stage_dict("cross", "lang_lm", "translate")])
    run_stage(StageJob(cfg.stages[0], output=str(cross)), Runtime(), base=tiny_base())  # the smoke's base
    try:
        argv = ["--smoke", "--out", str(out), "--doc", str(doc), "--work", str(tmp_path / "w")]
        assert reproduce.main([*argv, "--cross", str(cross)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    methods = {"tag-llm", "step 0", "ridge probe", "prompt-tuning+head", "lora+head", "expert", "train-mean"}
    assert set(res["runs"]) == methods
    for method, per in res["runs"].items():
        assert set(per) == {"qed", "amp"}, method
        assert all(set(seeds) == {"1", "2"} for seeds in per.values())
        assert all(math.isfinite(m["mse"]) and m["mse"] > 0 for m in per["qed"].values()), method
        assert all(0 <= m["accuracy"] <= 1 for m in per["amp"].values()), method
    assert res["summary"]["runs"]["tag-llm"]["qed"]["mse"]["n"] == 2
    assert len(res["ablations"]) == 2 and set(res["sweep"]) == {"1", "3"}
    tr = res["translation"]
    assert set(tr) == {"translate", "translate_zeroshot"}
    assert all(math.isfinite(v) for t in tr.values() for k, v in t.items() if k not in ("pairs", "n"))
    text = doc.read_text()
    assert "| tag-llm |" in text and "## Ablations" in text and "python bench/reproduce.py --smoke" in text
    assert " ± " in text and "## Translation" in text


def test_rendered_pages_match_their_json():
    """Every number in README.md and docs/*.md between render markers comes from bench/results/*.json:
    a committed JSON and its page cannot drift apart."""
    from bench import render

    assert render.main(["--check"]) == 0
