"""The benchmark scripts run end to end on tiny random models and write their JSON (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# A bare GPU machine: torch, transformers and peft only. Imports of Ray, RDKit or datasets fail.
BARE = """
import runpy, sys
class _Bare:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "rdkit", "datasets"}:
            raise ModuleNotFoundError(f"no module named {name!r}", name=name)
sys.meta_path.insert(0, _Bare())
sys.argv = ["bench/gpu_bench.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_bench.py", run_name="__main__")
"""


def test_train_vs_peft_smoke(tmp_path, capsys):
    from bench import train_vs_peft

    out = tmp_path / "train_vs_peft.json"
    threads = torch.get_num_threads()
    try:
        assert train_vs_peft.main(["--smoke", "--ablation", "full", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets --threads for the whole process
    res = json.loads(out.read_text())
    by = {v["name"]: v for v in res["variants"]}
    assert set(by) == {
        "tagray",
        "peft-lm",
        "peft-head",
        "tagray -bucketing",
        "tagray +logits",
        "tagray -bucketing +logits",
    }
    for v in by.values():
        assert v["steps"] == 2 and v["useful_tok_per_s"] > 0 and math.isfinite(v["last_loss"])
        assert 0 < v["useful_fraction"] <= 1 and 0 < v["epoch_useful_fraction"] <= 1
    assert len({v["useful_tokens"] for v in by.values()}) == 1  # every variant trained on the same rows
    assert by["tagray"]["batches"] == "bucketed" and by["peft-lm"]["batches"] == "random"
    assert res["config"]["virtual_tokens"] == 2 * res["config"]["tag_length"]
    expected = {"tagray / peft-lm", "tagray / peft-head", "bucketing: tagray / tagray -bucketing"}
    assert all(expected <= set(r) for r in res["ratios"].values())
    assert "tagray / peft-lm" in capsys.readouterr().out


def test_gpu_bench_smoke_on_a_bare_machine(tmp_path):
    out = tmp_path / "gpu_bench.json"
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run(
        [sys.executable, "-c", BARE, "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    by = {v["name"]: v for v in res["variants"]}
    assert {"tagray", "peft-lm", "peft-head", "serve tagray", "serve peft-head"} <= set(by)
    assert all(v["steps"] == 2 and v["useful_tok_per_s"] > 0 for v in by.values())
    assert by["serve tagray"]["kind"] == "serve" and "tagray / peft-head" in res["ratios"]["measured"]
    assert "serve tagray" in r.stdout


def test_gpu_bench_lengths_match_the_measured_smiles_distribution():
    from bench.gpu_bench import sample_lengths

    xs = sorted(sample_lengths(20000, random.Random(0)))
    assert 53 <= sum(xs) / len(xs) <= 57  # measured: mean 55, median 52, p95 80, max 287
    assert abs(xs[len(xs) // 2] - 52) <= 1 and abs(xs[int(0.95 * len(xs))] - 80) <= 2
    assert 30 <= xs[0] and xs[-1] <= 287


def test_reproduce_smoke(tmp_path):
    from bench import reproduce

    out, doc = tmp_path / "reproduce.json", tmp_path / "reproduction.md"
    threads = torch.get_num_threads()
    try:
        argv = ["--smoke", "--out", str(out), "--doc", str(doc), "--work", str(tmp_path / "w"), "--cross", ""]
        assert reproduce.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    methods = {"tag-llm", "train-mean", "prompt-tuning+head", "lora+head", "linear-probe"}
    assert set(res["main"]) == methods
    for per in res["main"].values():
        assert set(per) == {"qed", "logp", "descriptor"}
        assert all(math.isfinite(m["mse"]) and m["mse"] > 0 for m in per.values())
    assert len(res["ablations"]) == 3 and set(res["sweep"]) == {"1", "2"}
    text = doc.read_text()
    assert "| tag-llm |" in text and "## Ablations" in text and "python bench/reproduce.py --smoke" in text
