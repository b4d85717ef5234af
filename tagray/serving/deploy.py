"""What a deployment of the HTTP API is configured with, without Ray: the app builder's arguments
(:class:`AppArgs`), a model replica's ``user_config`` (:class:`ReplicaSettings`), the ``tagray serve``
options, and how a replica answers a batch (one result or error per request, never a failed batch).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.errors import ConfigError, TagrayError
from .http import TOKEN_ENV
from .schema import from_validation_error

log = logging.getLogger("tagray.serve")


def _config_error(e: ValidationError, where: str) -> ConfigError:
    err = from_validation_error(e, root=where)
    return ConfigError(f"{where}.{err.field}" if err.field != where else where, err.message)


class ReplicaSettings(BaseModel):
    """The ``TagModel`` deployment's ``user_config``: changing it reloads replicas in place."""

    model_config = ConfigDict(extra="forbid")
    registry: str | None = None
    """Registry folder or ``s3://`` prefix (required)."""
    version: Any = None
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_generate_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    max_batch_rows: int = Field(64, ge=1, le=4096)
    """Rows (ensemble members count one each) per forward pass."""
    prefix_cache_mb: float = Field(256, ge=0)
    """RAM for prompt prefixes reused across requests; 0 turns the shared-prefix split off."""

    @classmethod
    def parse(cls, config: Mapping | None) -> ReplicaSettings:
        try:
            s = cls.model_validate(dict(config or {}))
        except ValidationError as e:
            raise _config_error(e, "user_config") from None
        if not s.registry:
            raise ConfigError(
                "registry",
                "no registry: give args.registry or the TagModel deployment's user_config.registry",
            )
        return s


USER_CONFIG_KEYS = set(ReplicaSettings.model_fields)


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (``serve run tagray.ray.serve:build_app key=value ...``)."""

    model_config = ConfigDict(extra="forbid")
    registry: str | None = None
    """Registry folder or s3:// prefix (or give it as the TagModel ``user_config`` of a config file)."""
    base: str = "smollm2-135m"
    dtype: str = "auto"
    replicas: int = Field(1, ge=1)
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    token: str | None = None
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)
    """Requests the ingress queues for TagModel replicas before answering 503 + Retry-After (-1: no limit)."""
    autoscaling_config: dict[str, Any] | None = None
    """Serve's autoscaling of TagModel (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``,
    ...); replaces ``replicas``."""

    @classmethod
    def parse(cls, args: Mapping) -> AppArgs:
        try:
            return cls.model_validate(dict(args))
        except ValidationError as e:
            raise _config_error(e, "args") from None


def answer_batch(fn: Callable[..., list], reqs: list[dict]) -> list[dict]:
    """``fn(reqs, return_errors=True)`` as one ``{"result"}`` or ``{"error", "status"}`` per request.

    An unexpected exception (a bug, not bad input) is retried request by request, so one poisoned request
    fails alone (500) and its neighbours in the batch are answered.
    """
    try:
        outs = fn(reqs, return_errors=True)
    except Exception:
        log.exception("batch of %d failed; answering one by one", len(reqs))
        outs = []
        for r in reqs:
            try:
                outs += fn([r], return_errors=True)
            except Exception as e:  # noqa: BLE001
                outs.append(e)
    return [_wrap(o) for o in outs]


def _wrap(out: Any) -> dict:
    if isinstance(out, TagrayError):
        return {"error": out.to_dict(), "status": out.status}
    if isinstance(out, Exception):
        message = f"{type(out).__name__}: {out}"
        return {"error": {"error": "InternalError", "field": "", "message": message}, "status": 500}
    return {"result": out}


SERVE_HELP = "serve a tag registry over HTTP (Ray Serve)"
SERVE_DESCRIPTION = (
    "Serve every tag set and ensemble of a registry: POST /v1/predict, POST /v1/generate, GET /v1/tags, "
    "GET /healthz."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``tagray serve`` options to ``parser`` (the CLI builds the sub-parser itself)."""
    p = parser
    p.add_argument("--registry", required=True, help="registry folder (local or s3://)")
    p.add_argument("--base", default="smollm2-135m", help="base model the tags were trained on")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="model replicas (they share the base)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale between --replicas and this")
    p.add_argument(
        "--max-queued-requests", type=int, default=-1, help="queued requests before 503 (-1: no limit)"
    )
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument(
        "--token", default=None, help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV})"
    )
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a new local Ray)")


def add_parser(parent, handler: Callable[[argparse.Namespace], int] | None = None) -> argparse.ArgumentParser:
    """``tagray serve``'s options, on either kind of ``parent``:

    - an :class:`argparse.ArgumentParser` (the CLI's own ``serve`` sub-parser): the options are added to
      it (:func:`add_arguments`);
    - a sub-parser set (``parser.add_subparsers()``): a ``serve`` sub-parser is created on it.

    With ``handler``, ``args.fn`` / ``args.func`` run it (:mod:`tagray.cli` dispatches on ``fn``).
    """
    if isinstance(parent, argparse.ArgumentParser):
        p = parent
    else:
        p = parent.add_parser("serve", help=SERVE_HELP, description=SERVE_DESCRIPTION)
    add_arguments(p)
    if handler is not None:
        p.set_defaults(func=handler, fn=handler)
    return p


def app_args(args: argparse.Namespace, token: str | None) -> dict:
    """``tagray serve``'s options as :class:`AppArgs` keys."""
    out = {
        "registry": args.registry,
        "base": args.base,
        "dtype": args.dtype,
        "replicas": args.replicas,
        "cpus": args.cpus,
        "gpus": args.gpus,
        "token": token,
        "max_queued_requests": args.max_queued_requests,
    }
    if args.max_replicas is not None and args.max_replicas > args.replicas:
        out["autoscaling_config"] = {"min_replicas": args.replicas, "max_replicas": args.max_replicas}
    return out
