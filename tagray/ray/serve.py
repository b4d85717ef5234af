"""Ray Serve app: a thin FastAPI ingress in front of replicas that share one frozen base.

- ``TagModel`` replicas attach the cluster's shared base (:mod:`tagray.ray.shared`: zero-copy on CPU,
  one host-to-device copy on GPU, bf16 kept) and hold a :class:`~tagray.predict.Predictor` over the
  whole tag registry. ``@serve.batch`` groups requests; rows of different tag sets, compositions and
  ensembles share one forward pass. The registry path is the deployment's ``user_config``:
  ``reconfigure()`` reloads it in place (no replica restart).
- ``TagrayAPI`` (ingress, no torch) validates bodies with pydantic, checks the optional bearer token,
  maps :class:`~tagray.core.errors.TagrayError` to JSON 4xx ``{"error", "field", "message"}`` and retries
  requests whose replica died (idempotent), so bad input never yields a 5xx and a lost replica loses no
  request.

``serve run tagray.ray.serve:build_app registry=/abs/registry`` or ``tagray serve --registry PATH``.
"""

import argparse
import asyncio
import hmac
import logging
import os
import signal
import time
from typing import Annotated, Any

import ray
from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..core.errors import TagrayError

log = logging.getLogger("tagray.serve")
TOKEN_ENV = "TAGRAY_SERVE_TOKEN"
MAX_CHARS = 10_000  # per input value (tagray.predict.MAX_CHARS)
MAX_BODY = 256 * 1024  # bytes
USER_CONFIG_KEYS = {
    "registry",
    "version",
    "max_batch_size",
    "max_generate_batch_size",
    "batch_wait_timeout_s",
    "max_batch_rows",
}
RETRYABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)

# ---- request / response schemas --------------------------------------------------------------------

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TagName = Annotated[str, StringConstraints(min_length=1, max_length=66)]
FieldName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Value = Annotated[str, StringConstraints(max_length=MAX_CHARS)]


class PredictRequest(BaseModel):
    """One prediction: a function tag or task, a tag set or ensemble, the task's inputs."""

    model_config = ConfigDict(extra="forbid")
    tag: TagName | None = Field(None, description="Function tag, e.g. <QED> (or give `task`).")
    task: Name | None = Field(None, description="Task name, e.g. qed (or give `tag`).")
    tagset: Name | None = Field(None, description="Tag set to use; default: the first that provides the tag.")
    ensemble: Name | None = Field(None, description="Ensemble of tag sets (mean prediction and spread).")
    inputs: dict[FieldName, Value] = Field(..., max_length=16, description="The task template's fields.")
    compose: dict[TagName, Name] = Field(
        default_factory=dict, max_length=16, description='Template tag -> "set" or "set/<Tag>" providing it.'
    )


class GenerateRequest(PredictRequest):
    max_new_tokens: int | None = Field(None, ge=1, le=256, description="Default: the task's setting.")


COMPOSITION = "Per member: template tag -> the set/<Tag> that filled it."


class Answer(BaseModel):
    task: str
    tag: str | None
    kind: str = Field(description="regression, classification or lm")
    tagset: str | None
    ensemble: str | None


class PredictResponse(Answer):
    prediction: float | list[float] | str = Field(
        description="Target units; a class label for classification."
    )
    std: float | list[float] = Field(description="Spread of the ensemble members (0 for one tag set).")
    members: dict[str, float | list[float] | str]
    probabilities: dict[str, float] | None = None
    columns: list[str] | None = None
    composition: dict[str, dict[str, str]] = Field(description=COMPOSITION)


class GenerateResponse(Answer):
    text: str = Field(description="The generation (an ensemble's most common one).")
    members: dict[str, str]
    composition: dict[str, dict[str, str]] = Field(description=COMPOSITION)


class ErrorBody(BaseModel):
    error: str
    field: str
    message: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "Unknown tag, task, tag set or ensemble"},
    409: {"model": ErrorBody, "description": "Tag set trained on another base model"},
    422: {"model": ErrorBody, "description": "Invalid input (field named), malformed JSON"},
    503: {"model": ErrorBody, "description": "No replica available; retry (Retry-After)"},
}
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
PREDICT_EXAMPLES = {
    "qed": {"summary": "QED of a molecule", "value": {"tag": "<QED>", "inputs": {"smiles": ASPIRIN}}},
    "ensemble": {
        "summary": "An ensemble: mean and spread",
        "value": {"task": "qed", "ensemble": "qed-top3", "inputs": {"smiles": ASPIRIN}},
    },
    "compose": {
        "summary": "Zero-shot composition: <SMILES> from another tag set",
        "value": {
            "tag": "<QED>",
            "tagset": "stage2",
            "compose": {"<SMILES>": "stage1"},
            "inputs": {"smiles": ASPIRIN},
        },
    },
    "protein": {
        "summary": "Classification of a peptide",
        "value": {"tag": "<AMP>", "inputs": {"seq": "GLFDIVKKVVGALGSL"}},
    },
}
GENERATE_EXAMPLES = {
    "translate": {
        "summary": "A language pair never trained together",
        "value": {
            "tag": "<Translate>",
            "inputs": {"src_lang": "FR", "tgt_lang": "DE", "src": "Enregistrer les modifications"},
        },
    },
}


def _safe(s: object) -> str:
    """Text that survives UTF-8 encoding (a JSON body can smuggle lone surrogates into field names)."""
    return str(s).encode("utf-8", "backslashreplace").decode("utf-8")


def error(status: int, err: str, field: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": err, "field": _safe(field), "message": _safe(message)}, status_code=status, headers=headers
    )


# ---- ingress ------------------------------------------------------------------------------------------

app = FastAPI(
    title="tagray",
    version=__version__,
    description="Tag-LLM predictions and generations from learned domain and function tags.",
)
bearer = HTTPBearer(auto_error=False, description=f"Optional: set with --token or ${TOKEN_ENV}")


@app.middleware("http")
async def guard(request: Request, call_next):
    """Body-size limit and bearer token, before any body parsing."""
    try:
        size = int(request.headers.get("content-length") or 0)
    except ValueError:
        return error(400, "BadRequest", "content-length", "not an integer")
    if size > MAX_BODY:
        return error(413, "PayloadTooLarge", "body", f"{size} bytes > {MAX_BODY}")
    # the replica's instance holds the token: Serve runs a pickled copy of `app`, so no module state here
    try:
        token = getattr(serve.get_replica_context().servable_object, "token", None)
    except RayServeException:  # not inside a replica (e.g. a unit test of the app's validation)
        token = None
    if token and request.url.path.startswith("/v1/"):
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return error(
                401,
                "Unauthorized",
                "Authorization",
                "missing or wrong bearer token",
                {"WWW-Authenticate": "Bearer"},
            )
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic / JSON errors -> 422 naming the first bad field (``inputs.smiles``; ``body`` for bad JSON)."""
    errs = exc.errors()
    details = []
    for e in errs[:10]:
        loc = [_safe(x) for x in e.get("loc", ())]
        loc = loc[1:] if loc[:1] == ["body"] else loc
        field = "body" if e.get("type") == "json_invalid" or not loc else ".".join(loc)
        details.append({"field": field, "message": _safe(e.get("msg", "invalid"))})
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    return JSONResponse({"error": "ValidationError", **first, "details": details}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    field = "body" if exc.status_code == 400 else "path"
    return error(exc.status_code, "HTTPError", field, str(exc.detail), getattr(exc, "headers", None))


@app.exception_handler(TagrayError)
async def tagray_error(request: Request, exc: TagrayError) -> JSONResponse:
    return error(exc.status, type(exc).__name__, exc.field, exc.message)


@serve.deployment(name="TagrayAPI", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class TagrayAPI:
    """HTTP front: schemas, auth, error mapping, retries. Holds no model (and imports no torch)."""

    def __init__(self, model, token: str | None = None, retries: int = 5):
        self.model = model  # DeploymentHandle of TagModel
        self.retries = retries
        self.retried = 0  # calls retried after a replica failure (reported by /healthz)
        self.token = token or os.environ.get(TOKEN_ENV) or None

    async def _call(self, method: str, *args: Any, timeout_s: float | None = None):
        """Call TagModel; retry requests whose replica died or is overloaded (they are idempotent)."""
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                resp = getattr(self.model, method).remote(*args)
                out = await (asyncio.wait_for(resp, timeout_s) if timeout_s else resp)
                break
            except RETRYABLE as e:
                log.warning("TagModel.%s failed (%s), attempt %d", method, type(e).__name__, attempt + 1)
                self.retried += 1
                if attempt == self.retries:
                    return error(
                        503,
                        "Unavailable",
                        "replica",
                        f"no replica answered ({type(e).__name__}); retry",
                        {"Retry-After": "1"},
                    )
                await asyncio.sleep(delay)
                delay *= 2
            except asyncio.TimeoutError:
                return error(503, "Unavailable", "replica", "timed out; retry", {"Retry-After": "1"})
        if "status" in out:  # TagModel answers {"result": ...} or {"error": {...}, "status": 4xx}
            e = out["error"]
            return error(out["status"], e["error"], e["field"], e["message"])
        return out["result"]

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        dependencies=[Depends(bearer)],
        summary="Predict with a function tag (regression / classification)",
    )
    async def predict(self, body: Annotated[PredictRequest, Body(openapi_examples=PREDICT_EXAMPLES)]):
        return await self._call("predict", body.model_dump(exclude_none=True))

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses=ERRORS,
        dependencies=[Depends(bearer)],
        summary="Generate text with tags (e.g. translation)",
    )
    async def generate(self, body: Annotated[GenerateRequest, Body(openapi_examples=GENERATE_EXAMPLES)]):
        return await self._call("generate", body.model_dump(exclude_none=True))

    @app.get(
        "/v1/tags",
        responses=ERRORS,
        dependencies=[Depends(bearer)],
        summary="Tags, tag sets, ensembles and rejected tag sets",
    )
    async def tags(self):
        return await self._call("describe")

    @app.get("/healthz", summary="Liveness and registry status (no auth)")
    async def healthz(self):
        out = await self._call("health", timeout_s=10)
        return {**out, "ingress_retries": self.retried} if isinstance(out, dict) else out


# ---- model replicas -------------------------------------------------------------------------------


def _uss() -> int:
    import psutil

    return psutil.Process().memory_full_info().uss


def _mapping_of(ptr: int) -> dict:
    """The ``/proc/self/smaps`` entry holding address ``ptr``: path and kB resident / private / shared.

    Shows where the base's weights live (Ray's object-store mmap) and that they are not private copies.
    """
    out: dict = {}
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    if inside:
                        break
                    inside = lo <= ptr < hi
                    if inside:
                        out = {"path": head[5] if len(head) > 5 else "", "size_kb": (hi - lo) // 1024}
                elif inside and head[0].rstrip(":") in (
                    "Rss",
                    "Private_Clean",
                    "Private_Dirty",
                    "Shared_Clean",
                    "Shared_Dirty",
                ):
                    out[head[0].rstrip(":").lower() + "_kb"] = int(head[1])
    except OSError:  # not Linux
        pass
    return out


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

        from ..predict import Predictor  # noqa: F401
        from .shared import attach_base, base_info

        self.uss_before_base = _uss()
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))  # do not oversubscribe the cores other replicas use
        device = (
            "cuda" if torch.cuda.is_available() else "cpu"
        )  # Ray sets CUDA_VISIBLE_DEVICES for GPU replicas
        self.base = attach_base(base_info(base, dtype), device)
        self.uss_after_base = _uss()
        self.predictor = None
        self.registry: str | None = None
        self.registry_error: str | None = None
        self.version = None
        self.loaded_at = 0.0

    def reconfigure(self, config: dict) -> None:
        """``user_config``: ``registry`` (required), ``max_batch_size``, ``batch_wait_timeout_s``, ...

        A failed reload keeps serving the previous registry and reports the error in ``/healthz``; only a
        replica without any registry fails (so a bad first deploy is visible at once).
        """
        from ..core.errors import ConfigError
        from ..predict import Predictor

        config = dict(config or {})
        registry = config.get("registry")
        try:
            unknown = sorted(set(config) - USER_CONFIG_KEYS)
            if unknown:
                raise ConfigError(
                    f"user_config.{unknown[0]}", f"unknown key; allowed: {sorted(USER_CONFIG_KEYS)}"
                )
            if not registry:
                raise ConfigError(
                    "registry",
                    "no registry: give args.registry or the TagModel deployment's user_config.registry",
                )
            pred = Predictor.from_registry(
                self.base, registry, max_batch_rows=int(config.get("max_batch_rows", 64))
            )
        except Exception as e:
            if self.predictor is None:  # plain RuntimeError: TagrayError subclasses do not unpickle
                raise RuntimeError(f"cannot load the tag registry: {type(e).__name__}: {e}") from None
            self.registry_error = f"{type(e).__name__}: {e}"
            log.error("reload of %s failed, still serving %s: %s", registry, self.registry, e)
            return
        self.predictor, self.registry, self.registry_error = pred, registry, None
        self.version = config.get("version")
        self.loaded_at = time.time()
        self.predict.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self.predict.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))
        self.generate.set_max_batch_size(int(config.get("max_generate_batch_size", 16)))
        self.generate.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    @staticmethod
    def _wrap(out: Any) -> dict:
        if isinstance(out, TagrayError):
            return {"error": out.to_dict(), "status": out.status}
        if isinstance(out, Exception):
            return {
                "error": {"error": "InternalError", "field": "", "message": f"{type(out).__name__}: {out}"},
                "status": 500,
            }
        return {"result": out}

    def _run(self, method: str, reqs: list[dict]) -> list[dict]:
        fn = getattr(self.predictor, method)
        try:
            outs = fn(reqs, return_errors=True)
        except Exception:  # a bug, not bad input: isolate it so the rest of the batch is answered
            log.exception("batch of %d failed; answering one by one", len(reqs))
            outs = []
            for r in reqs:
                try:
                    outs += fn([r], return_errors=True)
                except Exception as e:  # noqa: BLE001
                    outs.append(e)
        return [self._wrap(o) for o in outs]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict(self, reqs: list[dict]) -> list[dict]:
        # a worker thread keeps the replica's event loop free (health checks, batching)
        return await asyncio.to_thread(self._run, "predict", reqs)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def generate(self, reqs: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._run, "generate", reqs)

    def describe(self) -> dict:
        return {"result": {**self.predictor.describe(), "registry": self.registry}}

    def health(self) -> dict:
        p = self.predictor
        return {
            "result": {
                "status": "ok",
                "registry": self.registry,
                "version": self.version,
                "registry_error": self.registry_error,
                "tagsets": len(p.sets),
                "ensembles": len(p.ensembles),
                "loaded_at": self.loaded_at,
                "base": self.base.name,
                "stats": dict(p.stats),
            }
        }

    def memory(self) -> dict:
        """This replica's memory: USS before/after attaching the base (private bytes), RSS, base bytes."""
        import psutil

        from ..core.weights import shared_bytes

        mi = psutil.Process().memory_full_info()
        param = next(self.base.model.parameters())
        emb = self.base.model.get_input_embeddings().weight
        return {
            "pid": os.getpid(),
            "replica": serve.get_replica_context().replica_id.unique_id,
            "uss": mi.uss,
            "rss": mi.rss,
            "uss_before_base": self.uss_before_base,
            "uss_after_base": self.uss_after_base,
            "base_bytes": shared_bytes(self.base.model),
            "weights_mapping": _mapping_of(emb.data_ptr()) if emb.device.type == "cpu" else {},
            "dtype": str(param.dtype).replace("torch.", ""),
            "device": str(param.device),
            "stats": dict(self.predictor.stats) if self.predictor else {},
        }

    def check_health(self) -> None:
        if self.predictor is None:
            raise RuntimeError("no registry loaded")


# ---- app builder and CLI ------------------------------------------------------------------------------


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (``serve run tagray.ray.serve:build_app key=value ...``)."""

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


def build_app(args: dict):
    """Serve application builder: ``TagrayAPI`` -> ``TagModel`` (``replicas`` copies sharing the base)."""
    a = AppArgs.model_validate(args)
    registry = a.registry if a.registry is None or "://" in a.registry else os.path.abspath(a.registry)
    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if a.gpus > 0 else "float32")
    model = TagModel.options(
        num_replicas=a.replicas,
        max_ongoing_requests=max(a.max_ongoing_requests, 2 * a.max_batch_size),
        ray_actor_options={"num_cpus": a.cpus, "num_gpus": a.gpus},
        user_config={"registry": registry, "max_batch_size": a.max_batch_size},
    ).bind(a.base, dtype)
    return TagrayAPI.bind(model, a.token)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``tagray serve`` to an argparse sub-parser set; the handler is ``args.func(args)``."""
    p = subparsers.add_parser(
        "serve",
        help="serve a tag registry over HTTP (Ray Serve)",
        description="Serve every tag set and ensemble of a registry: POST /v1/predict, "
        "POST /v1/generate, GET /v1/tags, GET /healthz.",
    )
    p.add_argument("--registry", required=True, help="registry folder (local or s3://)")
    p.add_argument("--base", default="smollm2-135m", help="base model the tags were trained on")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="model replicas (they share the base)")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument(
        "--token", default=None, help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV})"
    )
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a new local Ray)")
    p.set_defaults(func=cmd_serve, fn=cmd_serve)  # tagray.cli dispatches on `fn`
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the app until SIGINT / SIGTERM, then shut Serve down."""
    ray.init(address=args.address, ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(
        build_app(
            {
                "registry": args.registry,
                "base": args.base,
                "dtype": args.dtype,
                "replicas": args.replicas,
                "cpus": args.cpus,
                "gpus": args.gpus,
                "token": args.token or os.environ.get(TOKEN_ENV),
            }
        ),
        name="tagray",
        route_prefix="/",
        blocking=False,
    )
    print(
        f"tagray serving {args.registry} on http://{args.host}:{args.port} (docs: /docs); Ctrl-C stops",
        flush=True,
    )
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)  # backgrounded processes ignore SIGINT in non-interactive shells
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tagray")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main(["serve", *__import__("sys").argv[1:]]))
