"""Shared fixtures: tiny random models (seconds), the real SmolLM2 (minutes), one local Ray, a local S3.

Tiers: tests marked ``slow`` use the real SmolLM2 or a real Ray cluster; the rest run in seconds.
No fixture touches the network: the unit tier's tokenizer is built in-process, S3 is a moto server.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

# Test isolation: Ray's temp files, auth token and tagray's caches stay out of the user's home.
_TMP = tempfile.mkdtemp(prefix="tagray-tests-")
os.environ.setdefault("HF_HOME", os.path.join(_TMP, "hf"))  # hub-loading tests fill this cache themselves
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TAGRAY_PROGRESS", "0")
os.environ.setdefault("TAGRAY_PREFIX_SHARED", os.path.join(_TMP, "prefix-shared"))  # searches share here
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (packaged GGUF converted once into the tagray cache)."""
    from tagray.core.base import load_base

    return load_base("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny byte-level BPE built in-process: the unit tier never needs the real SmolLM2."""
    from tagray.core.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    """A 2-layer random Llama (for fast unit tests of code paths)."""
    from tagray.core.tiny import tiny_base

    return tiny_base("llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer):
    """A 2-layer random GPT-2: a second, non-Llama architecture."""
    from tagray.core.tiny import tiny_base

    return tiny_base("gpt2", tokenizer)


@pytest.fixture(scope="session")
def tiny_base_dir(tiny_llama, tmp_path_factory):
    """The tiny Llama saved as a Hugging Face folder (for path / S3 / hub loading tests)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.model.save_pretrained(d)
    tiny_llama.tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance shared by every Ray test (start-up dominates their cost).

    Workers inherit the S3 endpoint of the local moto server, so ``s3://`` storage works in any Ray test.
    """
    import ray

    if not ray.is_initialized():
        env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
        env.update(
            {
                "TAGRAY_PROGRESS": "0",
                "HF_HUB_OFFLINE": "1",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        if os.environ.get("TAGRAY_CACHE"):
            env["TAGRAY_CACHE"] = os.environ["TAGRAY_CACHE"]
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=os.path.join(_TMP, "ray"),
            runtime_env={"env_vars": env},
        )
    yield ray


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible endpoint on localhost (moto in server mode); yields its URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_REGION": "us-west-2",
        "AWS_ENDPOINT_URL": url,
        "AWS_ENDPOINT_URL_S3": url,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    import uuid

    import boto3

    name = f"tagray-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-west-2").create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
    )
    return name
