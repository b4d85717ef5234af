"""Connect to Ray: the cluster at ``address`` / ``RAY_ADDRESS`` (inside ``ray job submit``), else a local one.

Token authentication (on by default for clusters ``ray.init()`` starts; ``cluster.yaml`` turns it on for
``ray start``): a client sends the token only when ``RAY_AUTH_MODE=token`` is set. Ray sets it itself for
a local cluster it finds or starts, never for an explicit address, so a shell without it gets an opaque
``ConnectionError`` from a token cluster. :func:`ensure_ray` uses the token whenever one is available
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and the mode is not set; sending a
token to a cluster without auth is harmless.
"""

from __future__ import annotations

import logging
import os

import ray

from ..core.errors import ConfigError
from ..util import worker_env

log = logging.getLogger("tagray")

AUTH_HINT = (
    "a cluster with token authentication needs RAY_AUTH_MODE=token and its token in ~/.ray/auth_token "
    "(or RAY_AUTH_TOKEN_PATH): `ray get-auth-token` on any node of the cluster prints it"
)


def use_token_if_available() -> bool:
    """Turn on token auth for this process (and its children) if a token exists and the mode is unset."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"].lower() == "token"  # set explicitly: respect it
    try:  # private API, pinned with Ray: the rule Ray itself applies to `ray start` and address="auto"
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def ensure_ray(address: str | None = None) -> None:
    """Connect once. Workers get :func:`tagray.util.worker_env` (never credentials: those would be
    stored in the job's runtime_env for anyone who can list jobs; nodes read their own)."""
    if ray.is_initialized():
        return
    env = worker_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        token = use_token_if_available()
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        except ConnectionError as e:
            hint = "" if token else f"; {AUTH_HINT}"
            raise ConfigError("address", f"cannot connect to Ray at {address}: {e}{hint}") from e
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
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            log.info("ray: local cluster with token auth (`ray get-auth-token` prints the dashboard's token)")
    log.info("ray: %s", ray.cluster_resources())


def on_every_node(fn, *args, timeout_s: float = 300.0) -> list:
    """``fn(*args)`` once on every alive node (a zero-CPU task pinned to it, with the workers' environment,
    so node-local paths resolve as the trials resolved them); the results in node order."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(fn)
    refs = [
        task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            runtime_env={"env_vars": worker_env()},
        ).remote(*args)
        for n in ray.nodes()
        if n.get("Alive")
    ]
    return ray.get(refs, timeout=timeout_s)
