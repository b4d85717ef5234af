"""Connect to Ray: the cluster at ``address`` / ``RAY_ADDRESS`` (inside ``ray job submit``), else a local one."""

from __future__ import annotations

import logging
import os

import ray

from ..util import worker_env

log = logging.getLogger("tagray")


def ensure_ray(address: str | None = None) -> None:
    """Connect once. Workers get :func:`tagray.util.worker_env` (never credentials: those would be
    stored in the job's runtime_env for anyone who can list jobs; nodes read their own)."""
    if ray.is_initialized():
        return
    env = worker_env()
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
