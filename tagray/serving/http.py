"""The HTTP API as a FastAPI app, without Ray: routes, bearer token, request-body limit, error mapping;
and the memory report of a model replica (``/proc/self/smaps``).

:func:`create_app` takes a function that returns the *backend* serving the routes (Serve's ingress
deployment: ``token``, ``retried`` and ``async call(method, *args, timeout_s=None)``), so the app is
defined once here and :mod:`tagray.ray.serve` only supplies the replica. Every error is JSON
``{"error", "field", "message"}``; bad input is a 4xx naming the field, never a 5xx.
"""

from __future__ import annotations

import hmac
import inspect
import os
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .schema import (
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    PredictRequest,
    PredictResponse,
    field_of,
    safe_text,
)

TOKEN_ENV = "TAGRAY_SERVE_TOKEN"
MAX_BODY = 256 * 1024  # bytes of request body, counted as they are read (chunked uploads too)
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "Unknown tag, task, tag set or ensemble"},
    409: {"model": ErrorBody, "description": "Tag set trained on another base model"},
    413: {"model": ErrorBody, "description": f"Request body over {MAX_BODY} bytes"},
    422: {"model": ErrorBody, "description": "Invalid input (field named), malformed JSON"},
    503: {"model": ErrorBody, "description": "No replica available or overloaded; retry (Retry-After)"},
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


def error(status: int, err: str, field: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": err, "field": safe_text(field), "message": safe_text(message)},
        status_code=status,
        headers=headers,
    )


def unavailable(message: str) -> JSONResponse:
    return error(503, "Unavailable", "replica", message, {"Retry-After": "1"})


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once more than the limit was read (FastAPI re-raises HTTP exceptions)."""

    def __init__(self, size: int, limit: int):
        super().__init__(413, f"more than {limit} bytes (read {size})")


class Guard:
    """ASGI middleware: bearer token on ``/v1/*``, and the body limit on the bytes actually read.

    A ``Content-Length`` over the limit is refused before reading; a chunked upload (no length) is
    counted as it arrives and refused as soon as it passes the limit, so a client cannot stream an
    unbounded body into the JSON parser.
    """

    def __init__(self, app, backend: Callable[[], Any], max_bytes: int = MAX_BODY):
        self.app, self.backend, self.max_bytes = app, backend, max_bytes

    def _refusal(self, scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error(400, "BadRequest", "content-length", "not an integer")
            if int(length) > self.max_bytes:
                return error(413, "PayloadTooLarge", "body", f"{length} bytes > {self.max_bytes}")
        token = getattr(self.backend(), "token", None)
        if token and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(
                    401,
                    "Unauthorized",
                    "Authorization",
                    "missing or wrong bearer token",
                    {"WWW-Authenticate": "Bearer"},
                )
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        read, started = 0, False

        async def counted():
            nonlocal read
            msg = await receive()
            if msg["type"] == "http.request":
                read += len(msg.get("body", b""))
                if read > self.max_bytes:
                    raise BodyTooLarge(read, self.max_bytes)
            return msg

        async def watched(msg) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as e:  # read outside a route (FastAPI's handlers answer it inside one)
            if started:
                raise
            await error(413, "PayloadTooLarge", "body", str(e.detail))(scope, receive, send)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic / JSON errors -> 422 naming the first bad field (``inputs.smiles``; ``body`` for bad JSON)."""
    details = [
        {
            "field": "body" if e.get("type") == "json_invalid" else field_of(tuple(e.get("loc", ()))),
            "message": safe_text(str(e.get("msg", "invalid")).removeprefix("Value error, ")),
        }
        for e in exc.errors()[:10]
    ]
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    return JSONResponse({"error": "ValidationError", **first, "details": details}, status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, BodyTooLarge):
        return error(413, "PayloadTooLarge", "body", str(exc.detail))
    field = "body" if exc.status_code == 400 else "path"
    return error(exc.status_code, "HTTPError", field, str(exc.detail), getattr(exc, "headers", None))


def _forward(backend: Callable, kind: str, body_type: Any) -> Callable:
    """A POST route that validates its JSON body as ``body_type`` and hands it to the backend's ``kind``.
    The signature is set explicitly: FastAPI reads the body model from it (this module's annotations
    are strings, which could not name a per-route type)."""

    async def route(body):
        return await backend().call(kind, body.model_dump(exclude_none=True))

    route.__name__ = kind
    route.__signature__ = inspect.Signature(
        [inspect.Parameter("body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=body_type)]
    )
    return route


def create_app(backend: Callable[[], Any], max_body: int = MAX_BODY) -> FastAPI:
    """The API over ``backend()`` (see the module docstring); ``backend()`` may return None outside a
    replica (then no token is required and the routes are not callable)."""
    app = FastAPI(
        title="tagray",
        version=__version__,
        description="Tag-LLM predictions and generations from learned domain and function tags.",
    )
    app.add_middleware(Guard, backend=backend, max_bytes=max_body)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    auth = [Depends(HTTPBearer(auto_error=False, description=f"Optional: set with --token or ${TOKEN_ENV}"))]

    for path, kind, req, resp, examples, summary in (
        ("/v1/predict", "predict", PredictRequest, PredictResponse, PREDICT_EXAMPLES,
         "Predict with a function tag (regression / classification)"),
        ("/v1/generate", "generate", GenerateRequest, GenerateResponse, GENERATE_EXAMPLES,
         "Generate text with tags (e.g. translation)"),
    ):  # fmt: skip
        app.post(path, response_model=resp, responses=ERRORS, dependencies=auth, summary=summary)(
            _forward(backend, kind, Annotated[req, Body(openapi_examples=examples)])
        )

    @app.get(
        "/v1/tags", responses=ERRORS, dependencies=auth, summary="Tags, tag sets, ensembles, rejected sets"
    )
    async def tags():
        return await backend().call("describe")

    @app.get("/healthz", summary="Liveness and registry status (no auth)")
    async def healthz():
        b = backend()
        out = await b.call("health", timeout_s=10)
        return {**out, "ingress_retries": b.retried} if isinstance(out, dict) else out

    return app


# ---- replica memory -----------------------------------------------------------------------------------


def uss() -> int:
    """This process's unique set size (bytes only it holds)."""
    import psutil

    return psutil.Process().memory_full_info().uss


def mapping_of(ptr: int) -> dict:
    """The ``/proc/self/smaps`` entry holding address ``ptr``: path and kB resident / private / shared.

    Shows where the base's weights live (Ray's object-store mmap) and that they are not private copies.
    """
    keys = ("Rss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty")
    out: dict = {}
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    if inside:
                        break
                    inside = lo <= ptr < hi
                    if inside:
                        out = {"path": head[5] if len(head) > 5 else "", "size_kb": (hi - lo) // 1024}
                elif inside and head[0].rstrip(":") in keys:
                    out[head[0].rstrip(":").lower() + "_kb"] = int(head[1])
    except OSError:  # not Linux
        pass
    return out


def memory_report(model, uss_before_base: int, uss_after_base: int) -> dict:
    """A replica's memory: USS before / after attaching the base, RSS, the base's bytes and mapping."""
    import psutil

    from ..core.weights import shared_bytes

    mi = psutil.Process().memory_full_info()
    param = next(model.parameters())
    emb = model.get_input_embeddings().weight
    return {
        "pid": os.getpid(),
        "uss": mi.uss,
        "rss": mi.rss,
        "uss_before_base": uss_before_base,
        "uss_after_base": uss_after_base,
        "base_bytes": shared_bytes(model),
        "weights_mapping": mapping_of(emb.data_ptr()) if emb.device.type == "cpu" else {},
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
    }
