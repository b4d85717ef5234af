"""Ray Train against real local services: a token-auth `ray start` head with the README's `ray job submit`,
a simulated multi-node cluster, a worker killed mid-stage, S3 storage on a local moto server (slow:
minutes), and the storage rules for multi-node runs (fast: no Ray)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import psutil
import pytest
import torch

from tagray.core.artifacts import load_tagset
from tagray.core.errors import ConfigError
from tagray.pipeline import plan, run_pipeline
from tagray.ray import storage
from tagray.ray.train import fit_stage

from . import factories
from .conftest import free_port
from .hooks import fail_at_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
slow = pytest.mark.slow


def tiny_pipeline(base_dir, output, **scaling):
    return factories.tiny_pipeline(
        base_dir,
        output,
        name="raytest",
        train={"max_steps": 4},
        scaling={"num_workers": 1, "cpus_per_worker": 1, "max_failures": 2, **scaling},
    )


def isolated_env(home: str, **extra: str) -> dict[str, str]:
    """This process's environment for a separate Ray: its own HOME (auth token) and temp dir, token auth
    on, no token or address inherited (the shared in-process Ray exports RAY_AUTH_MODE and its token)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    }
    os.makedirs(home, exist_ok=True)
    env.update(
        HOME=home,
        RAY_TMPDIR=tempfile.mkdtemp(prefix="tr", dir="/tmp"),  # short: socket paths must stay < 108 bytes
        RAY_AUTH_MODE="token",
        # Ray's 60 s start-up limits (dashboard, worker registration) are too short on a loaded 2-core machine
        RAY_DASHBOARD_STARTUP_TIMEOUT_S="300",
        RAY_worker_register_timeout_seconds="300",
        PATH=BIN + os.pathsep + os.environ["PATH"],  # jobs and workers run this venv's python
        **extra,
    )
    return env


# ---- what workers are sent (no Ray) --------------------------------------------------------------------


def test_ensure_ray_sends_workers_no_credentials(monkeypatch):
    """The runtime_env of every job tagray connects is stored on the cluster for anyone who lists jobs,
    actors or tasks: it carries where data lives (endpoint, region), never a credential."""
    import ray

    from tagray.ray import session

    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIATAGRAYTEST",
        "AWS_SECRET_ACCESS_KEY": "tagray-secret",
        "AWS_SESSION_TOKEN": "tagray-session",
        "HF_TOKEN": "hf_tagray",
        "RAY_AUTH_TOKEN": "tagray-ray-token",
    }
    for k, v in {**secrets, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "us-west-2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # explicit: ensure_ray leaves it alone
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    session.ensure_ray("127.0.0.1:6379")
    env = calls[0]["runtime_env"]["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["AWS_REGION"] == "us-west-2"
    leaked = [k for k, v in env.items() if k in secrets or v in secrets.values()]
    assert not leaked, f"credentials in the job's runtime_env: {leaked}"


# ---- storage rules (no Ray) ----------------------------------------------------------------------------


def _node(node_id: str, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": 8.0, **resources}}


def test_spread_reason_counts_alive_nodes_and_missing_resources():
    one = [_node("a"), _node("b", alive=False), _node("c", alive=False)]
    assert storage.spread_reason(one, "a", {"CPU": 1}) is None, "dead nodes do not count"
    assert storage.spread_reason([_node("a"), _node("b")], "a", {"CPU": 1}) == "the cluster has 2 nodes"
    # a CPU-only head with GPU workers to come: the autoscaler will put them on other nodes
    reason = storage.spread_reason([_node("a")], "a", {"CPU": 1, "GPU": 1})
    assert reason and "no GPU" in reason
    assert storage.spread_reason([_node("a", GPU=1.0)], "a", {"CPU": 1, "GPU": 1}) is None


def test_fs_type_takes_the_longest_mount_point():
    mounts = [("/", "ext4"), ("/mnt/efs", "nfs4"), ("/mnt/efs/scratch", "ext4")]
    assert storage.fs_type("/mnt/efs/runs/x", mounts) == "nfs4"
    assert storage.fs_type("/mnt/efs/scratch/x", mounts) == "ext4"
    assert storage.fs_type("/mnt/efsx/runs", mounts) == "ext4", "a name prefix is not a parent folder"


def test_require_shared_storage_refuses_node_local_paths(monkeypatch, tmp_path):
    nfs = str(tmp_path / "nfs")
    monkeypatch.setattr(storage, "_mounts", lambda: [("/", "ext4"), (nfs, "nfs4")])
    monkeypatch.setattr(storage, "cluster_spread_reason", lambda needs: "the cluster has 3 nodes")
    ok = {"output": "s3://bucket/runs", "init_from": None, "storage": f"{nfs}/runs/_ray"}
    storage.require_shared_storage(ok, {"CPU": 1})
    with pytest.raises(ConfigError) as info:
        storage.require_shared_storage({"output": "s3://b/r", "init_from": f"file://{tmp_path}/tags"})
    assert info.value.field == "init_from" and "file://" not in str(info.value)
    with pytest.raises(
        ConfigError, match=r"^output: /\S+/runs is on this node's local disk, but the cluster"
    ):
        storage.require_shared_storage({"output": str(tmp_path / "runs")})
    monkeypatch.setattr(storage, "cluster_spread_reason", lambda needs: None)
    storage.require_shared_storage({"output": str(tmp_path / "runs")})  # one node: local paths are fine


# ---- Ray Train -----------------------------------------------------------------------------------------


@slow
def test_worker_killed_mid_stage_resumes_from_checkpoint(ray_local, tiny_base_dir, tmp_path):
    cfg = tiny_pipeline(tiny_base_dir, str(tmp_path), num_workers=2)
    job, h, _ = plan(cfg)[0]
    marker = str(tmp_path / "killed")
    result = fit_stage(
        job,
        storage=str(tmp_path / "_ray"),
        config_hash=h,
        worker_setup=fail_at_step,
        extra={"fail_at_step": 2, "fail_marker": marker},
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


@slow
def test_rerun_with_same_run_name_resumes(ray_local, tiny_base_dir, tmp_path):
    cfg = tiny_pipeline(tiny_base_dir, str(tmp_path))
    job, h, _ = plan(cfg)[0]
    first = fit_stage(job, storage=str(tmp_path / "_ray"), config_hash=h)
    assert load_tagset(job.output).meta["resumed_from_step"] is None
    # the same run name and storage: Ray Train restores the run and the stage continues from step 4 (done)
    second = fit_stage(job, storage=str(tmp_path / "_ray"), config_hash=h)
    assert load_tagset(job.output).meta["resumed_from_step"] == 4
    assert first.path == second.path


@slow
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


@slow
def test_two_workers_on_two_nodes_with_shared_storage(tiny_base_dir, tmp_path, s3_bucket):
    home = str(tmp_path / "home")
    env = isolated_env(home)
    os.makedirs(f"{home}/.ray")
    with open(f"{home}/.ray/auth_token", "w") as f:  # the simulated cluster's token, under its own HOME
        f.write(uuid.uuid4().hex * 2)
    script = os.path.join(REPO, "tests", "scripts", "multinode_stage.py")
    output = f"s3://{s3_bucket}/multinode"
    args = [sys.executable, script, tiny_base_dir, output, str(tmp_path / "local")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["cluster_nodes"] == 3
    # a local output on this 3-node cluster is refused before anything runs, naming the field
    assert doc["refused"] and doc["refused"].startswith("output: "), doc["refused"]
    assert "the cluster has 3 nodes" in doc["refused"] and "s3://" in doc["refused"]
    # and so is the user's path (run_pipeline on the Ray executor), before the trainer starts. Fails until
    # fit_stage calls require_shared_storage({"output": ..., "init_from": ..., "storage": ...}, resources)
    refused = doc["pipeline_refused"] or "run_pipeline with a node-local output was not refused"
    assert refused.startswith("output: ") and "the cluster has 3 nodes" in refused, refused
    assert len(doc["nodes"]) == 2 and len(set(doc["nodes"].values())) == 2, (
        "STRICT_SPREAD put ranks on 2 nodes"
    )
    assert doc["path"] == f"{output}/multinode/single"
    assert load_tagset(doc["path"]).meta["steps"] == 2
    # Ray Data ingest: one rank per node, equal disjoint shards, and together they are the split
    ing = doc["ingest"]
    assert len(set(ing["nodes"])) == 3, ing["nodes"]
    shards = [set(ing["shards"][str(r)]) for r in range(3)]
    assert [len(ing["shards"][str(r)]) for r in range(3)] == [6, 6, 6]
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2]), "disjoint shards"
    assert shards[0] | shards[1] | shards[2] == set(ing["split"]) and len(ing["split"]) == 18
    assert ing["meta"]["sharded"] and ing["meta"]["train_rows"] == {"qed": 18}


# ---- `ray job submit` against a token-auth head ------------------------------------------------------


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray processes: those naming its temp dir and their children (the dashboard's
    forkserver modules do not name it). Never a bare `ray stop`: it kills every Ray of the user."""
    procs: set[psutil.Process] = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                procs.update([p, *p.children(recursive=True)])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=10)
    for p in alive:
        p.kill()


def _start_head(env: dict[str, str], dash: int, gcs: int) -> subprocess.CompletedProcess:
    """`ray start --head` as cluster.yaml runs it (token auth from the environment), every port explicit:
    another Ray on this machine (the shared test instance) already holds the default ports."""
    ports = [
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    args = [
        f"{BIN}/ray",
        "start",
        "--head",
        "--num-cpus",
        "2",
        "--temp-dir",
        env["RAY_TMPDIR"],
        "--port",
        str(gcs),
    ]
    args += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true"]
    args += ["--disable-usage-stats"] + [a for p in ports for a in (p, str(free_port()))]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


# tagray's own connection (`tagray pipeline --address`, `tagray serve --address`) from a shell without
# RAY_AUTH_MODE: Ray alone fails with an opaque ConnectionError; ensure_ray uses the token when there is one.
_CONNECT = """
import sys
from tagray.core.errors import ConfigError
from tagray.ray.session import ensure_ray
try:
    ensure_ray(sys.argv[1])
    print("CONNECTED")
except ConfigError as e:
    print(e)
"""


# Everything a job-list user can read about the cluster's jobs: job info (entrypoint, metadata,
# runtime_env) and logs from the job API, and the runtime_env of every actor and task from the State API.
_JOB_INFO_DUMP = """
import json, sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_tasks
url = sys.argv[1]
c = JobSubmissionClient(url)
jobs = [j.model_dump() for j in c.list_jobs()]
logs = [c.get_job_logs(j["submission_id"]) for j in jobs if j.get("submission_id")]
actors = [a.__dict__ if hasattr(a, "__dict__") else a for a in list_actors(address=url, detail=True, limit=10000)]
tasks = [t.__dict__ if hasattr(t, "__dict__") else t for t in list_tasks(address=url, detail=True, limit=10000)]
print(json.dumps({"jobs": jobs, "logs": logs, "actors": actors, "tasks": tasks}, default=str))
"""


def _submit(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    for _ in range(20):  # the dashboard's job agent needs a few seconds after `ray start` on a busy machine
        sub = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
        if "No available agent" not in sub.stderr + sub.stdout:
            return sub
        time.sleep(3)
    return sub


@slow
def test_ray_job_submit_to_token_auth_head_keeps_secrets_out(tiny_base_dir, tmp_path):
    """README: `ray get-auth-token --generate`, `export RAY_AUTH_MODE=token`, then the submit command as
    written. A credential in the submitting (and the head's) environment appears in no job metadata.
    tagray's own connection needs no RAY_AUTH_MODE when a token is there, and names the fix when not."""
    secret = f"tagray-test-secret-{uuid.uuid4().hex}"
    env = isolated_env(str(tmp_path / "home"), AWS_SECRET_ACCESS_KEY=secret)
    token = subprocess.run(
        [f"{BIN}/ray", "get-auth-token", "--generate"], capture_output=True, text=True, env=env
    )
    assert token.returncode == 0 and len(token.stdout.strip()) >= 32, token.stderr
    dash, gcs = free_port(), free_port()
    start = _start_head(env, dash, gcs)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        url = f"http://127.0.0.1:{dash}"
        with pytest.raises(urllib.error.HTTPError) as denied:  # token auth is really on
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=30)
        assert denied.value.code == 401
        # why the README exports RAY_AUTH_MODE=token: without it the job CLI sends no token, even with one
        # in ~/.ray/auth_token (the message docs/cluster.md quotes)
        plain = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        bare = subprocess.run(
            [f"{BIN}/ray", "job", "list", "--address", url],
            capture_output=True,
            text=True,
            timeout=300,
            env=plain,
        )
        assert bare.returncode != 0 and "Authentication required" in bare.stdout + bare.stderr, bare
        out = tmp_path / "runs"
        cmd = [f"{BIN}/ray", "job", "submit", "--address", url, "--working-dir", ".", "--"]
        cmd += ["python", "jobs/pipeline.py", "jobs/smoke.yaml", "--set", f"base={tiny_base_dir}"]
        cmd += ["--set", f"output={out}", "--set", "train.progress_s=0"]  # every progress line, to check them
        t = time.time()
        sub = _submit(cmd, env)
        if sub.returncode != 0:  # the job's own traceback, untruncated
            pytest.fail(f"ray job submit failed:\n{sub.stdout[-6000:]}\n{sub.stderr[-2000:]}", pytrace=False)
        assert "succeeded" in re.sub(r"\x1b\[[0-9;]*m", "", sub.stdout + sub.stderr).lower()
        for stage in ("domain", "single", "cross"):
            assert load_tagset(str(out / "smoke" / stage)).stage == stage
        print(f"ray job submit smoke pipeline: {time.time() - t:.0f} s")

        dump = subprocess.run(
            [sys.executable, "-c", _JOB_INFO_DUMP, url], capture_output=True, text=True, timeout=300, env=env
        )
        assert dump.returncode == 0, dump.stderr[-3000:]
        info = json.loads(dump.stdout.strip().splitlines()[-1])
        assert any("jobs/pipeline.py" in j["entrypoint"] for j in info["jobs"]), "the job's info was read"
        assert any("RayTrainWorker" in str(a.get("class_name")) for a in info["actors"]), "and its workers'"
        assert secret not in dump.stdout, "a credential was copied into job metadata or a runtime_env"
        logs = "\n".join(info["logs"])  # `ray job logs`: the workers' progress lines, with an ETA
        assert re.search(r"stage single step 1/4 \(25%\).* ETA \d+m\d\ds", logs), logs[-3000:]
        assert re.search(r"task qed: labelling train rows: \d+/32 rows \(\d+%\), ETA", logs), logs[-3000:]

        for home, expected in [
            (env["HOME"], "CONNECTED"),
            (str(tmp_path / "no-token"), "address: cannot connect"),
        ]:
            args = [sys.executable, "-c", _CONNECT, f"127.0.0.1:{gcs}"]
            conn = subprocess.run(
                args, capture_output=True, text=True, timeout=300, env={**plain, "HOME": home}
            )
            assert conn.stdout.strip().splitlines()[-1:] and expected in conn.stdout, (
                conn.stdout,
                conn.stderr[-2000:],
            )
        assert "RAY_AUTH_MODE=token" in conn.stdout, "the refusal says what to set"
    finally:
        _kill_cluster(env["RAY_TMPDIR"])
