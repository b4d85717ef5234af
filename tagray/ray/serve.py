"""Ray Serve deployments of the HTTP API (:mod:`tagray.serving.http`): a thin ingress in front of model
replicas that share one frozen base.

- ``TagModel`` replicas attach the cluster's shared base (:mod:`tagray.ray.shared`: zero-copy on CPU,
  one host-to-device copy on GPU, bf16 kept) and hold a :class:`~tagray.serving.predictor.Predictor`
  over the whole tag registry. ``@serve.batch`` groups requests; rows of different tag sets,
  compositions and ensembles share one forward pass. The registry path is the deployment's
  ``user_config``: ``reconfigure()`` reloads it in place (no replica restart).
- ``TagrayAPI`` (ingress, no torch) serves the FastAPI app and retries requests whose replica died
  (they are idempotent), so a lost replica loses no request; an overloaded one (``max_queued_requests``)
  is answered 503 + ``Retry-After`` at once.

``serve run tagray.ray.serve:build_app registry=/abs/registry`` or ``tagray serve --registry PATH``.
"""

import argparse
import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import AutoscalingConfig
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)

from ..core.errors import ConfigError
from ..serving.deploy import USER_CONFIG_KEYS, AppArgs, ReplicaSettings, add_parser, answer_batch, app_args
from ..serving.http import TOKEN_ENV, create_app, error, memory_report, unavailable, uss
from ..util import abs_uri

__all__ = ["USER_CONFIG_KEYS", "AppArgs", "TagModel", "TagrayAPI", "add_cli", "build_app", "cmd_serve"]
log = logging.getLogger("tagray.serve")
RETRYABLE = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)  # died or restarting


def _ingress():
    """The ingress instance serving this request: Serve runs a pickled copy of ``app``, so the token and
    the model handle live on the replica's instance, not in module state."""
    try:
        return serve.get_replica_context().servable_object
    except RayServeException:  # not inside a replica (e.g. a unit test of the app's validation)
        return None


app = create_app(_ingress)


@serve.deployment(name="TagrayAPI", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class TagrayAPI:
    """HTTP front: schemas, auth, error mapping, retries. Holds no model (and imports no torch)."""

    def __init__(self, model, token: str | None = None, retries: int = 5):
        self.model = model  # DeploymentHandle of TagModel
        self.retries = retries
        self.retried = 0  # calls retried after a replica failure (reported by /healthz)
        self.token = token or os.environ.get(TOKEN_ENV) or None

    async def call(self, method: str, *args: Any, timeout_s: float | None = None):
        """TagModel's answer (``{"result"}`` or ``{"error", "status"}``) as the HTTP response."""
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                resp = getattr(self.model, method).remote(*args)
                out = await (asyncio.wait_for(resp, timeout_s) if timeout_s else resp)
                break
            except BackPressureError:  # the queue bound is there to shed load: do not retry into it
                return unavailable("overloaded (max_queued_requests); retry")
            except RETRYABLE as e:
                log.warning("TagModel.%s failed (%s), attempt %d", method, type(e).__name__, attempt + 1)
                self.retried += 1
                if attempt == self.retries:
                    return unavailable(f"no replica answered ({type(e).__name__}); retry")
                await asyncio.sleep(delay)
                delay *= 2
            except asyncio.TimeoutError:
                return unavailable("timed out; retry")
        if "status" in out:
            e = out["error"]
            return error(out["status"], e["error"], e["field"], e["message"])
        return out["result"]


@serve.deployment(
    name="TagModel", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1}, health_check_period_s=10
)
class TagModel:
    """One shared frozen base + every tag of the registry; batched predict / generate.

    Args:
        base: base model spec (alias, folder, ``s3://``) the tag sets were trained on.
        dtype: ``float32`` / ``bfloat16`` / ``float16`` (resolved from ``auto`` by :func:`build_app`).
    """

    def __init__(self, base: str, dtype: str = "float32"):
        import torch
        import transformers  # noqa: F401 - imported before measuring, so the delta below is the base only

        from ..serving.predictor import Predictor  # noqa: F401 - likewise
        from .shared import attach_base, base_info

        self.uss_before_base = uss()
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))  # do not oversubscribe the cores other replicas use
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES
        self.base = attach_base(base_info(base, dtype), device)
        self.uss_after_base = uss()
        self.predictor = self.registry = self.registry_error = self.version = None
        self.loaded_at = 0.0

    def reconfigure(self, config: dict) -> None:
        """``user_config`` (:class:`~tagray.serving.deploy.ReplicaSettings`): reload the registry.

        A failed reload keeps serving the previous registry and reports the error in ``/healthz``; only a
        replica without any registry fails (so a bad first deploy is visible at once).
        """
        from ..serving.predictor import Predictor

        try:
            s = ReplicaSettings.parse(config)
            pred = Predictor.from_registry(
                self.base,
                s.registry,
                max_batch_rows=s.max_batch_rows,
                prefix_cache_bytes=int(s.prefix_cache_mb * 2**20),
            )
        except Exception as e:
            if self.predictor is None:  # plain RuntimeError: TagrayError subclasses do not unpickle
                raise RuntimeError(f"cannot load the tag registry: {type(e).__name__}: {e}") from None
            self.registry_error = f"{type(e).__name__}: {e}"
            log.error(
                "reload of %s failed, still serving %s: %s", (config or {}).get("registry"), self.registry, e
            )
            return
        self.predictor, self.registry, self.registry_error = pred, s.registry, None
        self.version, self.loaded_at = s.version, time.time()
        for fn, size in ((self.predict, s.max_batch_size), (self.generate, s.max_generate_batch_size)):
            fn.set_max_batch_size(size)
            fn.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    # one batch of each kind at a time (Serve's default): only predict touches the prefix store, and
    # a worker thread keeps the replica's event loop free (health checks, batching)
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict(self, reqs: list[dict]) -> list[dict]:
        return await asyncio.to_thread(answer_batch, self.predictor.predict, reqs)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def generate(self, reqs: list[dict]) -> list[dict]:
        return await asyncio.to_thread(answer_batch, self.predictor.generate, reqs)

    def describe(self) -> dict:
        return {"result": {**self.predictor.describe(), "registry": self.registry}}

    def health(self) -> dict:
        p = self.predictor
        status = {"status": "ok", "registry": self.registry, "version": self.version}
        status |= {
            "registry_error": self.registry_error,
            "tagsets": len(p.sets),
            "ensembles": len(p.ensembles),
        }
        return {
            "result": status | {"loaded_at": self.loaded_at, "base": self.base.name, "stats": dict(p.stats)}
        }

    def memory(self) -> dict:
        """USS before / after attaching the base (private bytes), RSS, the base's bytes and mapping."""
        out = memory_report(self.base.model, self.uss_before_base, self.uss_after_base)
        stats = dict(self.predictor.stats) if self.predictor else {}
        return out | {"replica": serve.get_replica_context().replica_id.unique_id, "stats": stats}

    def check_health(self) -> None:
        if self.predictor is None:
            raise RuntimeError("no registry loaded")


def _autoscaling(cfg: dict) -> dict:
    unknown = sorted(set(cfg) - set(AutoscalingConfig.model_fields))
    if unknown:
        allowed = sorted(AutoscalingConfig.model_fields)
        raise ConfigError(f"args.autoscaling_config.{unknown[0]}", f"unknown key; allowed: {allowed}")
    try:
        AutoscalingConfig(**cfg)
    except ValueError as e:  # pydantic's ValidationError
        raise ConfigError("args.autoscaling_config", str(e).splitlines()[1].strip()) from None
    return cfg


def build_app(args: dict):
    """Serve application builder: ``TagrayAPI`` -> ``TagModel`` (replicas sharing the base; a fixed
    number, or autoscaled with ``autoscaling_config``)."""
    a = AppArgs.parse(args)
    registry = abs_uri(a.registry) if a.registry else None  # replicas run in another working directory
    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if a.gpus > 0 else "float32")
    scale = {"autoscaling_config": _autoscaling(a.autoscaling_config)} if a.autoscaling_config else {}
    model = TagModel.options(
        **(scale or {"num_replicas": a.replicas}),
        max_ongoing_requests=max(a.max_ongoing_requests, 2 * a.max_batch_size),
        max_queued_requests=a.max_queued_requests,
        ray_actor_options={"num_cpus": a.cpus, "num_gpus": a.gpus},
        user_config={"registry": registry, "max_batch_size": a.max_batch_size},
    ).bind(a.base, dtype)
    return TagrayAPI.bind(model, a.token)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``tagray serve`` to an argparse sub-parser set (:func:`tagray.serving.deploy.add_parser`)."""
    return add_parser(subparsers, cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the app until SIGINT / SIGTERM, then shut Serve down."""
    ray.init(address=args.address, ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    app_ = build_app(app_args(args, args.token or os.environ.get(TOKEN_ENV)))
    serve.run(app_, name="tagray", route_prefix="/", blocking=False)
    print(
        f"tagray serving {args.registry} on http://{args.host}:{args.port} (docs: /docs); Ctrl-C stops",
        flush=True,
    )
    stop = threading.Event()
    # backgrounded processes ignore SIGINT in non-interactive shells: SIGTERM stops it too
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="tagray")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *__import__("sys").argv[1:]])
    raise SystemExit(args.func(args))
