"""Connect to Ray: the cluster at ``address`` / ``RAY_ADDRESS`` (inside ``ray job submit``), else a local one."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger("tagray")

# passed to every worker and replica: quiet progress bars, offline hub, no preemption watcher
WORKER_ENV = {
    "TAGRAY_PROGRESS": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def ensure_ray(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    env = dict(WORKER_ENV)
    for k in (
        "TAGRAY_CACHE",
        "HF_HUB_OFFLINE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
    ):
        if os.environ.get(k):
            env[k] = os.environ[k]
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # an embedded local Ray, listening on this machine only. The dashboard (http://127.0.0.1:8265) also
        # serves the State API that Ray Train's placement-group cleaner polls: without it every stage
        # logs "Failed to query Ray Train Controller actor state" warnings.
        ray.init(
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": env},
            log_to_driver=True,
        )
    log.info("ray: %s", ray.cluster_resources())
