"""Ray Train against real local services: a `ray start` head with `ray job submit`, a simulated multi-node
cluster, a worker killed mid-stage, and S3 storage on a local moto server. Marked slow (minutes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import torch

from tagray.config import parse_pipeline
from tagray.core.artifacts import load_tagset
from tagray.pipeline import plan, run_pipeline
from tagray.ray.train import fit_stage

from .conftest import free_port

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"train": 16, "valid": 4, "test": 4}


def tiny_pipeline(base_dir, output, **scaling):
    return parse_pipeline(
        {
            "name": "raytest",
            "base": base_dir,
            "output": output,
            "train": {
                "max_steps": 4,
                "eval_every": 2,
                "batch_size": 2,
                "eval_rows": 4,
                "tag_length": 2,
                "probe_rows": 8,
            },
            "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 2, **scaling},
            "stages": [
                {"name": "domain", "tasks": [{"task": "smiles_lm", "limits": SMALL}]},
                {"name": "single", "tasks": [{"task": "qed", "limits": SMALL}]},
            ],
        }
    )


def test_worker_killed_mid_stage_resumes_from_checkpoint(ray_local, tiny_base_dir, tmp_path):
    cfg = tiny_pipeline(tiny_base_dir, str(tmp_path), num_workers=2)
    job, h, _ = plan(cfg)[0]
    marker = str(tmp_path / "killed")
    result = fit_stage(
        job, storage=str(tmp_path / "_ray"), config_hash=h, extra={"fail_at_step": 2, "fail_marker": marker}
    )
    assert os.path.exists(marker), "the worker was killed once"
    assert result.error is None
    ts = load_tagset(job.output)
    assert ts.meta["steps"] == 4
    assert ts.meta["resumed_from_step"] == 2, "the restarted workers continued from the step-2 checkpoint"
    # checkpoints hold only tags, heads and optimizer moments: kilobytes, never the base
    ckpt = result.checkpoint.path
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ckpt) for f in fs)
    assert size < 2_000_000 and "model.safetensors" not in str(list(os.walk(ckpt)))


def test_rerun_with_same_run_name_resumes(ray_local, tiny_base_dir, tmp_path):
    cfg = tiny_pipeline(tiny_base_dir, str(tmp_path))
    job, h, _ = plan(cfg)[0]
    first = fit_stage(job, storage=str(tmp_path / "_ray"), config_hash=h)
    assert load_tagset(job.output).meta["resumed_from_step"] is None
    # the same run name and storage: Ray Train restores the run and the stage continues from step 4 (done)
    second = fit_stage(job, storage=str(tmp_path / "_ray"), config_hash=h)
    assert load_tagset(job.output).meta["resumed_from_step"] == 4
    assert first.path == second.path


def test_s3_storage_and_stage_chaining_through_s3(ray_local, tiny_base_dir, s3_bucket):
    import fsspec

    cfg = tiny_pipeline(tiny_base_dir, f"s3://{s3_bucket}/runs")
    from tagray.ray.train import RayExecutor

    res = run_pipeline(cfg, executor=RayExecutor())
    fs = fsspec.filesystem("s3")
    keys = fs.find(f"{s3_bucket}/runs")
    assert any("/_ray/" in k and "checkpoint_" in k and k.endswith("tags.safetensors") for k in keys)
    assert res["single"]["path"] == f"s3://{s3_bucket}/runs/raytest/single"
    d = load_tagset(f"s3://{s3_bucket}/runs/raytest/domain")
    s = load_tagset(res["single"]["path"])
    assert torch.equal(d.tags["<SMILES>"], s.tags["<SMILES>"]), "stage 2 started from stage 1's tags on S3"


def test_two_workers_on_two_nodes(tiny_base_dir, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tests", "scripts", "multinode_stage.py"),
            tiny_base_dir,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="tr", dir="/tmp")},
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["cluster_nodes"] == 3
    assert len(doc["nodes"]) == 2 and len(set(doc["nodes"].values())) == 2, (
        "STRICT_SPREAD put ranks on 2 nodes"
    )
    assert load_tagset(doc["path"]).meta["steps"] == 2


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray processes (found by their temp dir); never a bare `ray stop`."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


def test_ray_job_submit_smoke_pipeline(tiny_base_dir, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="trh", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_TMPDIR": temp_dir,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    env.pop("RAY_ADDRESS", None)
    # the shared in-process Ray (ray.init) sets RAY_AUTH_MODE=token in os.environ and keeps its token under
    # the real HOME: this separate head runs without token auth, and the job client must agree
    env["RAY_AUTH_MODE"] = "disabled"
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    dash = free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--temp-dir",
            temp_dir,
            "--port",
            str(free_port()),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
            # every port explicit: another Ray on this machine (e.g. the shared test
            # instance) already holds the default agent ports
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        out = tmp_path / "runs"
        cmd = [
            ray_bin,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--working-dir",
            REPO,
            "--",
            "python",
            "jobs/pipeline.py",
            "jobs/smoke.yaml",
            "--set",
            f"base={tiny_base_dir}",
            "--set",
            f"output={out}",
        ]
        t = time.time()
        for _ in range(
            20
        ):  # the dashboard's job agent needs a few seconds after `ray start` on a busy machine
            sub = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            if "No available agent" not in sub.stderr + sub.stdout:
                break
            time.sleep(3)
        assert sub.returncode == 0, (sub.stdout[-3000:], sub.stderr[-3000:])
        plain = re.sub(r"\x1b\[[0-9;]*m", "", sub.stdout + sub.stderr).lower()
        assert "succeeded" in plain
        for stage in ("domain", "single", "cross"):
            ts = load_tagset(str(out / "smoke" / stage))
            assert ts.stage == stage
        print(f"ray job submit smoke pipeline: {time.time() - t:.0f} s")
    finally:
        _kill_cluster(temp_dir)
