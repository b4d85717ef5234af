"""Request -> members: which tag sets serve a request, which bank tag fills each template slot, and the
encoded row of every member.

One request becomes one row per member: one for a tag set, one per tag set of an ensemble. A
composition (``compose``) takes template tags from other tag sets; tags compose zero-shot, so any domain
tag can fill any domain slot and the function tag brings its head. Bank names are ``"set/<Tag>"``
(:func:`~tagray.core.artifacts.merge_tagsets`); identical tags of different sets share one bank entry,
which ``slots`` (alias -> :class:`~tagray.core.tags.Slot`) resolves, so rows of ensemble members hold the
same tag rows wherever their tags are equal.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ..core.artifacts import TagSet
from ..core.errors import ConfigError, InputError, TagrayError, UnknownTagError
from ..core.tags import Slot
from ..core.template import Encoded, TemplateEncoder, parse_template, template_tags
from ..tasks.dataset import prepare_row
from ..tasks.spec import TaskSpec, parse_task
from ..train.batches import encoder_for
from .schema import TAG_NAME, Request, norm_tag, parse_request


@dataclass(frozen=True)
class Member:
    """One tag set's resolution of a request: which bank tags fill the template's slots."""

    tagset: str
    spec: TaskSpec
    rename: dict[str, str]  # template tag name (dynamic ones resolved) -> bank name "set/<Tag>"
    head: str | None  # bank name of the head (regression / classification), None for generation
    isolate: bool  # the set was trained with isolated domain spans


@dataclass
class Prepared:
    """A validated request: its members' encoded rows plus what the response echoes."""

    index: int
    kind: str  # regression | classification | lm
    tag: str | None
    task: str
    tagset: str | None
    ensemble: str | None
    members: list[Member]
    rows: list[Encoded]
    max_new_tokens: int = 0
    input_chars: int | None = None  # characters of the input fields (the out-of-distribution check)


class LRU:
    """A bounded mapping that forgets the least recently used entry (keys are user input)."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = make()
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self.items)


def _in_inputs(e: TagrayError, fields: set[str]) -> TagrayError:
    """A field error as ``inputs.<field>``, so HTTP clients see where in the body it is."""
    return type(e)(f"inputs.{e.field}", e.message) if e.field in fields else e


def parse_ensembles(
    docs: Mapping[str, object], sets: Mapping[str, TagSet], rejected: Mapping[str, TagrayError]
) -> tuple[dict[str, list[str]], dict[str, TagrayError]]:
    """Ensemble docs (``{"members": [...]}`` or a list) -> usable ensembles and per-request refusals.

    An ensemble naming a set that is not here is refused per request, so one stale ensemble does not
    take the registry down.
    """
    ok: dict[str, list[str]] = {}
    bad: dict[str, TagrayError] = {}
    for name, doc in docs.items():
        members = list(doc["members"] if isinstance(doc, Mapping) else doc)
        if not members:
            raise ConfigError(f"ensembles.{name}", "an ensemble needs at least one member")
        unknown = [m for m in members if m not in sets and m not in rejected]
        if unknown:
            bad[name] = UnknownTagError(
                "ensemble", f"ensemble {name!r} has members that are not tag sets here: {unknown}"
            )
        else:
            ok[name] = members
    return ok, bad


class Resolver:
    """Validates requests and encodes one row per member against one tag bank.

    Args:
        tokenizer: the base's tokenizer.
        sets: name -> :class:`TagSet` (trained on the served base).
        ensembles: name -> registry ensemble doc or a list of set names.
        rejected: set name -> the error a request naming it gets (e.g. trained on another base).
        slots: bank name ``"set/<Tag>"`` -> where its vectors are in the bank (aliases included).
        max_encoders: template encoders kept (one per task x composition; compositions are user input).
    """

    def __init__(
        self,
        tokenizer,
        sets: Mapping[str, TagSet],
        ensembles: Mapping[str, object],
        rejected: Mapping[str, TagrayError],
        slots: Mapping[str, Slot],
        max_encoders: int = 512,
    ):
        self.tok = tokenizer
        self.sets = dict(sets)
        self.rejected = dict(rejected)
        self.ensembles, self.rejected_ensembles = parse_ensembles(ensembles, self.sets, self.rejected)
        self.tasks: dict[str, dict[str, TaskSpec]] = {
            n: {t: parse_task(d, where=f"tagsets.{n}.tasks.{t}") for t, d in ts.tasks.items()}
            for n, ts in self.sets.items()
        }
        self.slots = slots
        self.encoders = LRU(max_encoders)

    def task_kind(self, task: str) -> str:
        """``regression`` / ``classification`` / ``lm`` of a task some loaded tag set knows."""
        for specs in self.tasks.values():
            if task in specs:
                return specs[task].target.kind
        known = sorted({t for specs in self.tasks.values() for t in specs})
        raise UnknownTagError("task", f"no tag set knows task {task!r}; tasks: {known}")

    def _set(self, name: str, field: str) -> TagSet:
        if name in self.rejected:
            e = self.rejected[name]
            raise type(e)(field, e.message)
        if name not in self.sets:
            raise UnknownTagError(field, f"unknown tag set {name!r}; known: {sorted(self.sets)}")
        return self.sets[name]

    def _find_task(self, sname: str, req: Request, generate: bool) -> TaskSpec | None:
        """The task of set ``sname`` named ``req.task`` or using the function tag ``req.tag``."""
        specs = self.tasks[sname]
        if req.task is not None:
            return specs.get(req.task)
        cands = [s for s in specs.values() if s.function_tag == req.tag]
        cands.sort(key=lambda s: (s.target.kind == "lm") != generate)  # the matching kind first
        return cands[0] if cands else None

    def _provides(self, sname: str, spec: TaskSpec, generate: bool) -> bool:
        ts = self.sets[sname]
        if spec.function_tag is not None and spec.function_tag not in ts.tags:
            return False
        if not generate and spec.head_tag is not None and spec.head_tag not in ts.heads:
            return False
        return all(t in ts.tags for t in template_tags(spec.template))

    def _members(self, req: Request, generate: bool) -> tuple[list[str], str | None]:
        """Tag-set names serving the request, and the ensemble name (if one was asked for)."""
        if req.ensemble is not None:
            if req.ensemble in self.rejected_ensembles:
                raise self.rejected_ensembles[req.ensemble]
            if req.ensemble not in self.ensembles:
                raise UnknownTagError(
                    "ensemble", f"unknown ensemble {req.ensemble!r}; known: {sorted(self.ensembles)}"
                )
            for m in self.ensembles[req.ensemble]:
                self._set(m, "ensemble")  # a member trained on another base makes the ensemble unusable
            return self.ensembles[req.ensemble], req.ensemble
        if req.tagset is not None:
            self._set(req.tagset, "tagset")
            return [req.tagset], None
        for sname in self.sets:  # default: the first set that provides the tag / task
            spec = self._find_task(sname, req, generate)
            if spec is not None and self._provides(sname, spec, generate):
                return [sname], None
        what, field = (
            (f"function tag {req.tag}", "tag") if req.task is None else (f"task {req.task!r}", "task")
        )
        known = sorted({s.function_tag for sp in self.tasks.values() for s in sp.values() if s.function_tag})
        raise UnknownTagError(field, f"no tag set provides {what}; function tags: {known}")

    def _slot_tag(self, sname: str, t: str, field: str, want: str, compose: Mapping[str, str]) -> str:
        """Bank name of the tag filling template slot ``t`` (of kind ``want``), checked."""
        src, src_tag = sname, t
        if t in compose:
            field = f"compose.{t}"
            src, _, given = compose[t].partition("/")
            src_tag = norm_tag(given, field) if given else t
        ts = self._set(src, field)
        if src_tag not in ts.tags:
            raise UnknownTagError(field, f"tag set {src!r} has no tag {src_tag}; its tags: {sorted(ts.tags)}")
        have = ts.tag_info[src_tag].get("kind", "domain")
        if have != want:
            raise InputError(field, f"{src_tag} is a {have} tag; this slot needs a {want} tag")
        return f"{src}/{src_tag}"

    def _resolve(self, sname: str, spec: TaskSpec, row: Mapping, req: Request, generate: bool) -> Member:
        """Map each template tag of ``spec`` (for this row) to a bank tag, checking existence and kind."""
        fn = spec.function_tag
        # (resolved name, field to blame, kind the slot needs) per tag slot of the template
        slots = [
            (f"<{row[p.value]}>", f"inputs.{p.value}", "domain")
            if p.dynamic
            else (p.value, "tag" if p.value == fn else "template", "function" if p.value == fn else "domain")
            for p in parse_template(spec.template)
            if p.kind == "tag"
        ]
        names = [n for n, _, _ in slots]
        unused = [k for k in req.compose if k not in names]
        if unused:
            raise InputError(f"compose.{unused[0]}", f"not a tag of task {spec.name!r}; its tags: {names}")
        rename = {t: self._slot_tag(sname, t, field, want, req.compose) for t, field, want in slots}
        head = None
        if not generate:
            head = rename[spec.head_tag]
            hset, _, htag = head.partition("/")
            if htag not in self.sets[hset].heads:
                raise UnknownTagError("tag", f"tag set {hset!r} has no head for {htag}")
            hspec = self.sets[hset].head_specs[htag]
            if hspec.kind != spec.target.kind:
                raise InputError(
                    "tag", f"head {head} is {hspec.kind}, task {spec.name!r} is {spec.target.kind}"
                )
        isolate = bool(self.sets[sname].meta.get("train_config", {}).get("isolate_spans", False))
        return Member(sname, spec, rename, head, isolate)

    def _encoder(self, owner: str, spec: TaskSpec, rename: Mapping[str, str]) -> TemplateEncoder:
        # training's own encoder settings (train/batches.py), over the alias-aware slots of the bank
        key = (owner, spec.name, tuple(sorted(rename.items())))
        return self.encoders.get(
            key, lambda: encoder_for(spec, self.tok, SimpleNamespace(slots=self.slots), rename)
        )

    def _validate_inputs(self, spec: TaskSpec, inputs: Mapping[str, str]) -> dict:
        need = spec.input_fields  # other keys (ids, labels of a CSV row for `tagray predict`) are ignored
        for f in need:
            if f not in inputs:
                raise InputError(f"inputs.{f}", f"missing (task {spec.name!r} needs {need})")
        for p in parse_template(spec.template):
            if p.kind == "tag" and p.dynamic and not TAG_NAME.match(inputs[p.value]):
                raise InputError(f"inputs.{p.value}", f"not a tag name: {inputs[p.value][:80]!r} (e.g. FR)")
        # labels are not derived at prediction time (they are the unknowns): validate fields only
        try:
            return prepare_row(
                dataclasses.replace(spec, derive={}), {f: inputs[f] for f in need}, with_target=False
            )
        except TagrayError as e:
            raise _in_inputs(e, set(need)) from None

    def _encode(self, member: Member, row: dict, generate: bool) -> Encoded:
        spec = member.spec
        if generate and spec.target.field not in row:
            # the encoder checks a field's presence before it stops at the LM target: a placeholder
            row = {**row, spec.target.field: ""}
        try:
            enc = self._encoder(member.tagset, spec, member.rename).encode(row, with_target=False)
        except TagrayError as e:
            raise _in_inputs(e, set(spec.input_fields)) from None
        if member.head is not None:
            enc.head = member.head  # the encoder records the template's name; collate looks up bank names
        if not member.isolate:
            enc.span = [0] * len(enc)
        return enc

    def prepare(self, raw: Mapping, index: int = 0, generate: bool = False) -> Prepared:
        """Validate one request and encode its row for every member; raises :class:`TagrayError`."""
        req = parse_request(raw, generate)
        names, ensemble = self._members(req, generate)
        members, rows = [], []
        for sname in names:
            spec = self._find_task(sname, req, generate)
            if spec is None:
                field = "task" if req.task is not None else "tag"
                raise UnknownTagError(
                    field, f"tag set {sname!r} has no task {req.task or 'using ' + str(req.tag)}"
                )
            if req.tag is not None and spec.function_tag != req.tag:
                raise InputError("tag", f"task {spec.name!r} uses {spec.function_tag}, not {req.tag}")
            if generate != (spec.target.kind == "lm"):
                where = "/v1/generate (generate)" if spec.target.kind == "lm" else "/v1/predict (predict)"
                raise InputError("task", f"{spec.name!r} is a {spec.target.kind} task: use {where}")
            row = self._validate_inputs(spec, req.inputs)
            m = self._resolve(sname, spec, row, req, generate)
            members.append(m)
            rows.append(self._encode(m, row, generate))
        spec0 = members[0].spec
        mnt = 0
        if generate:
            mnt = req.max_new_tokens or spec0.generate.get("max_new_tokens", 48)
        return Prepared(
            index,
            spec0.target.kind,
            spec0.function_tag,
            spec0.name,
            None if ensemble else names[0],
            ensemble,
            members,
            rows,
            mnt,
            spec0.input_chars(row),
        )
