"""The one request schema of ``tagray predict`` and the HTTP API, and the answers' shapes.

A request (a plain dict on the command line, a JSON body over HTTP)::

    {"tag": "<QED>",                    # a function tag, or "task": "qed" (a task the tag set knows)
     "tagset": "chem",                  # or "ensemble": "chem-top3"; default: the first set providing it
     "inputs": {"smiles": "CCO"},       # the task template's fields (other keys are ignored)
     "compose": {"<SMILES>": "other"},  # optional: template tag -> "set" or "set/<Tag>" providing it
     "max_new_tokens": 12}              # generation only

:func:`parse_request` validates it with the same pydantic models FastAPI documents and checks, and turns
every failure into an :class:`~tagray.core.errors.InputError` naming the field (``inputs.smiles``), so
the CLI (exit code 2) and HTTP (422) refuse the same requests with the same field names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ..core.errors import InputError

MAX_CHARS = 10_000  # per text value, for the whole project: refuse before tokenising or parsing
MAX_NEW_TOKENS = 256
MAX_ENTRIES = 16  # inputs / compose entries per request
TAG_NAME = re.compile(r"^[A-Za-z][\w\-.]{0,63}$")  # what may stand inside <...> (template.py's rule)
# Unicode category Cc (C0, DEL, C1) except tab, newline and carriage return, which real text carries
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def check_text(value: str) -> str:
    """``value`` if a tokenizer, RDKit and a log line can take it, else ``ValueError``.

    Refused: lone surrogates (JSON can carry ``"\\ud800"``; UTF-8 cannot encode them) and control
    characters other than ``\\t \\n \\r`` (NUL truncates C strings, ESC rewrites terminals).
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (lone surrogate)") from None
    m = CONTROL.search(value)
    if m:
        raise ValueError(f"control character U+{ord(m.group()):04X} at position {m.start()} (not accepted)")
    return value


def norm_tag(tag: str, field: str = "tag") -> str:
    """``"QED"`` and ``"<QED>"`` both name the tag ``<QED>``."""
    inner = tag[1:-1] if tag.startswith("<") and tag.endswith(">") else tag
    if not TAG_NAME.match(inner):
        raise InputError(field, f"not a tag name: {tag[:80]!r} (expected like <QED>)")
    return f"<{inner}>"


# ---- pydantic models (OpenAPI + validation) ---------------------------------------------------------

Text = Annotated[str, AfterValidator(check_text)]
Name = Annotated[Text, StringConstraints(min_length=1, max_length=128)]
TagName = Annotated[Text, StringConstraints(min_length=1, max_length=66)]
FieldName = Annotated[Text, StringConstraints(min_length=1, max_length=64)]
Value = Annotated[Text, StringConstraints(max_length=MAX_CHARS)]


class PredictRequest(BaseModel):
    """One prediction: a function tag or task, a tag set or ensemble, the task's inputs."""

    model_config = ConfigDict(extra="forbid")
    tag: TagName | None = Field(None, description="Function tag, e.g. <QED> (or give `task`).")
    task: Name | None = Field(None, description="Task name, e.g. qed (or give `tag`).")
    tagset: Name | None = Field(None, description="Tag set to use; default: the first that provides the tag.")
    ensemble: Name | None = Field(None, description="Ensemble of tag sets (mean prediction and spread).")
    inputs: dict[FieldName, Value] = Field(
        ..., max_length=MAX_ENTRIES, description="The task template's fields."
    )
    compose: dict[TagName, Name] = Field(
        default_factory=dict,
        max_length=MAX_ENTRIES,
        description='Template tag -> "set" or "set/<Tag>" providing it.',
    )


class GenerateRequest(PredictRequest):
    max_new_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_NEW_TOKENS)] | None = Field(
        None, description="Default: the task's setting."
    )


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
    out_of_distribution: bool = Field(
        False,
        description="Regression: the prediction (before clipping to the task's declared range) lies outside "
        "the training targets' range or the task's range, or the input's length outside the training inputs'.",
    )
    ood_reasons: list[str] = Field(default_factory=list, description="Why out_of_distribution is set.")


class GenerateResponse(Answer):
    text: str = Field(description="The generation (an ensemble's most common one).")
    members: dict[str, str]
    composition: dict[str, dict[str, str]] = Field(description=COMPOSITION)


class ErrorBody(BaseModel):
    error: str
    field: str
    message: str


# ---- plain-dict validation --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A validated request: tag names normalised (``<QED>``), every string checked."""

    tag: str | None
    task: str | None
    tagset: str | None
    ensemble: str | None
    inputs: dict[str, str]
    compose: dict[str, str]  # template tag -> "set" or "set/<Tag>"
    max_new_tokens: int | None = None


def safe_text(s: object) -> str:
    """Text that survives UTF-8 encoding (error messages may quote lone surrogates of the input)."""
    return str(s).encode("utf-8", "backslashreplace").decode("utf-8")


def field_of(loc: tuple) -> str:
    """pydantic's error location -> our field name (``("inputs", "smiles")`` -> ``inputs.smiles``)."""
    loc = tuple(loc[1:]) if loc[:1] == ("body",) else tuple(loc)
    return ".".join(safe_text(x) for x in loc) or "body"


def from_validation_error(e: ValidationError, root: str = "request") -> InputError:
    """The first error of a pydantic validation as an :class:`InputError` naming its field."""
    err = e.errors()[0]
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return InputError(field_of(err.get("loc", ())) if err.get("loc") else root, safe_text(msg))


def parse_request(req: object, generate: bool = False) -> Request:
    """Validate one request (``generate``: the generation schema); raises :class:`InputError`."""
    if not isinstance(req, Mapping):
        raise InputError("request", f"expected an object, got {type(req).__name__}")
    try:
        r = (GenerateRequest if generate else PredictRequest).model_validate(dict(req))
    except ValidationError as e:
        raise from_validation_error(e) from None
    if r.tag is None and r.task is None:
        raise InputError("tag", "give a function tag (e.g. <QED>) or a task name")
    if r.tagset is not None and r.ensemble is not None:
        raise InputError("ensemble", "give a tag set or an ensemble, not both")
    return Request(
        tag=norm_tag(r.tag) if r.tag is not None else None,
        task=r.task,
        tagset=r.tagset,
        ensemble=r.ensemble,
        inputs=dict(r.inputs),
        compose={norm_tag(k, f"compose.{k}"): v for k, v in r.compose.items()},
        max_new_tokens=getattr(r, "max_new_tokens", None),
    )
