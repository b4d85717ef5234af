"""Smoke test of ``bench/serve_bench.py --smoke``: it runs end to end and writes its JSON (no timing checks).

The script starts its own local Ray in a subprocess (tiny random model, 50 requests per scenario), so it
does not touch the Ray instance other tests share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
