"""Smoke tests of ``bench/serve_bench.py``: ``--smoke`` runs end to end and writes its JSON, and
``--ensemble-only`` merges its measurement into an existing JSON and renders the docs block (no timing
checks).

The full script starts its own local Ray in a subprocess (tiny random model, 50 requests per scenario), so
it does not touch the Ray instance other tests share; ``--ensemble-only`` needs no Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[1]


def test_serve_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "serve_bench.json"
    env = {**os.environ, "TAGRAY_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve_bench.py"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["config"]["model"] == "tiny" and res["config"]["smoke"]
    for name in ("homogeneous", "mixed", "unbatched"):
        s = res["scenarios"][name]
        assert s["requests"] == 50 and s["errors"] == 0, (name, s["error_statuses"])
        assert s["rps"] > 0 and s["p50_ms"] <= s["p99_ms"]
    assert res["scenarios"]["unbatched"]["rows_per_forward_pass"] == 1.0  # batching really was off
    assert res["scenarios"]["_workload"]["compositions"] > 10  # tag sets x tasks, compositions, ensembles
    assert {"mixed_over_homogeneous_rps", "batched_over_unbatched_rps"} <= set(res["ratios"])
    mem = res["memory"]
    assert len(mem["one_replica"]) == 1 and len(mem["two_replicas"]) == 2 and mem["first_replica_kept"]
    assert mem["extra_replica"]["weights_private"] < 0.01 * mem["base_bytes"]  # shared, not copied
    assert "homogeneous" in proc.stdout and "batched / unbatched" in proc.stdout
    assert res["ensemble4_over_single"] == res["ensemble_micro"]["batch"]["ensemble_over_single_cpu"] > 0


def test_ensemble_only_merges_into_the_json_and_renders(tmp_path, capsys):
    from bench import serve_bench

    out = tmp_path / "serve_bench.json"
    out.write_text(
        json.dumps({"config": {"model": "earlier run"}, "scenarios": {"homogeneous": {"rps": 2.5}}})
    )
    threads = torch.get_num_threads()
    assert serve_bench.main(["--ensemble-only", "--smoke", "--ensemble-rounds", "1", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the measurement's thread count does not leak
    res = json.loads(out.read_text())
    assert res["config"] == {"model": "earlier run"} and res["scenarios"]["homogeneous"]["rps"] == 2.5  # kept
    m = res["ensemble_micro"]
    assert m["members"] == 4 and m["prefix_rows_computed_per_ensemble_request"] == 1.0  # one prefix each
    assert m["max_abs_member_vs_alone"] < 1e-4 and m["max_abs_shared_vs_full_rows"] < 1e-4
    assert res["ensemble4_over_single"] == m["batch"]["ensemble_over_single_cpu"] > 0
    assert m["positions_model"] == pytest.approx(
        (m["positions_per_row"]["prefix"] + 4 * m["positions_per_row"]["suffix"])
        / (m["positions_per_row"]["prefix"] + m["positions_per_row"]["suffix"])
    )
    short = res["ensemble_micro_by_tag_length"]["2"]  # the shipped stage-2 function tag length, too
    assert short["tag_length"] == 2 and short["positions_per_row"]["suffix"] == 2
    assert res["ensemble4_over_single_by_tag_length"] == {
        str(res["ensemble_micro"]["tag_length"]): res["ensemble4_over_single"],
        "2": short["ensemble4_over_single"],
    }
    doc = tmp_path / "doc.md"
    begin, end = f"<!-- begin:{serve_bench.MARKER} -->", f"<!-- end:{serve_bench.MARKER} -->"
    doc.write_text(f"intro\n{begin}\nstale\n{end}\noutro\n")
    serve_bench.render_docs(res, doc)
    text = doc.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert f"**{res['ensemble4_over_single']:.2f}x**" in text
    assert f"**{short['ensemble4_over_single']:.2f}x**" in text and "tag length 2" in text
