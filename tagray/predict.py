"""Inference over many tag sets at once: predictions, ensembles and zero-shot tag composition.

:class:`Predictor` namespaces every tag set (``"set/<Tag>"``, :func:`~tagray.core.artifacts.merge_tagsets`)
into ONE frozen :class:`~tagray.core.model.TagLLM`, so requests that use different tag sets, ensembles or
compositions are encoded against one tag table and share one forward pass: soft tags are input-side
only, so a heterogeneous batch is just rows whose tag positions index different table rows.

A request (plain dict; the CLI and Serve build the same thing)::

    {"tag": "<QED>",                  # a function tag, or "task": "qed" (a task the tag set knows)
     "tagset": "chem",                # or "ensemble": "chem-top3"; default: the first set providing it
     "inputs": {"smiles": "CCO"},     # the task template's fields
     "compose": {"<SMILES>": "other"}}  # optional: take template tags from another tag set
                                        # ("set" or "set/<Tag>"); tags compose zero-shot

Pure torch: no Ray import here (Serve wraps it in :mod:`tagray.ray.serve`).
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .core.artifacts import TagSet, load_tagset, merge_tagsets
from .core.base import Base, fingerprint_id
from .core.data import collate, to_device
from .core.errors import ConfigError, FingerprintMismatch, InputError, TagrayError, UnknownTagError
from .core.heads import HeadBank
from .core.model import TagLLM
from .core.tags import TagBank
from .core.template import Encoded, TemplateEncoder, parse_template, template_tags
from .tasks.dataset import prepare_row
from .tasks.spec import TaskSpec, parse_task

REQUEST_KEYS = {"tag", "task", "tagset", "ensemble", "inputs", "compose"}
GENERATE_KEYS = REQUEST_KEYS | {"max_new_tokens"}
TAG_NAME = re.compile(r"^[A-Za-z][\w\-.]{0,63}$")  # what may stand inside <...> (template.py's rule)
MAX_CHARS = 10_000  # per input field: refuse before tokenising (the encoder's max_length is the real limit)
MAX_NEW_TOKENS = 256


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


def _check_str(v: object, field: str) -> str:
    if not isinstance(v, str):
        raise InputError(field, f"expected a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")  # JSON may carry lone surrogates ("\ud800"); tokenizers and RDKit choke on them
    except UnicodeEncodeError:
        raise InputError(field, "not valid Unicode text (lone surrogate)") from None
    return v


def _str(req: Mapping, key: str) -> str | None:
    v = req.get(key)
    return None if v is None else _check_str(v, key)


def _norm_tag(tag: str, field: str = "tag") -> str:
    """``"QED"`` and ``"<QED>"`` both name the tag ``<QED>``."""
    inner = tag[1:-1] if tag.startswith("<") and tag.endswith(">") else tag
    if not TAG_NAME.match(inner):
        raise InputError(field, f"not a tag name: {tag[:80]!r} (expected like <QED>)")
    return f"<{inner}>"


def _input_error(e: TagrayError, fields: set[str]) -> TagrayError:
    """Re-raise a field error as ``inputs.<field>`` so HTTP clients see where in the body it is."""
    if e.field in fields:
        return type(e)(f"inputs.{e.field}", e.message)
    return e


def load_registry_lenient(
    path: str, base_fp: dict
) -> tuple[dict[str, TagSet], dict[str, dict], dict[str, TagrayError]]:
    """Like :func:`tagray.registry.load_registry`, but a tag set trained on another base (or unreadable)
    is set aside with its error instead of failing the whole registry: requests that name it get that
    error (409 for a foreign base) while everything else keeps serving.

    Returns:
        ``(tagsets, ensembles, rejected)`` with ``rejected``: set name -> the error to report.
    """
    import fsspec

    from .registry import list_ensembles, list_tagsets

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        raise ConfigError("registry", f"{path} is not a folder (expected tagsets/ and ensembles/ in it)")
    prefix = path.rstrip("/")
    sets: dict[str, TagSet] = {}
    rejected: dict[str, TagrayError] = {}
    for name in list_tagsets(path):
        try:
            sets[name] = load_tagset(f"{prefix}/tagsets/{name}", expect_base=base_fp)
        except FingerprintMismatch as e:
            rejected[name] = FingerprintMismatch("tagset", f"tag set {name!r}: {e.message}")
        except TagrayError as e:
            rejected[name] = ConfigError("tagset", f"tag set {name!r} is unreadable: {e.message}")
    return sets, list_ensembles(path), rejected


class Predictor:
    """Predictions and generations from any mix of tag sets over one frozen base.

    Args:
        base: the frozen base (e.g. :func:`~tagray.core.base.load_base` or Serve's shared copy).
        tagsets: name -> :class:`TagSet`; every set must be trained on ``base`` (else
            :class:`FingerprintMismatch`).
        ensembles: name -> ``{"members": [set names], ...}`` (a registry ensemble doc) or a plain list.
        rejected: set name -> error to raise when a request names it (see :func:`load_registry_lenient`).
        max_batch_rows: rows per forward pass (larger request lists are processed in chunks).
    """

    def __init__(
        self,
        base: Base,
        tagsets: Mapping[str, TagSet],
        ensembles: Mapping[str, object] | None = None,
        *,
        rejected: Mapping[str, TagrayError] | None = None,
        max_batch_rows: int = 64,
    ):
        self.base = base
        self.tok = base.tokenizer
        self.sets = dict(tagsets)
        self.rejected = dict(rejected or {})
        self.max_batch_rows = max_batch_rows
        for name, ts in self.sets.items():
            if "/" in name:
                raise ConfigError("tagsets", f"tag set name {name!r} may not contain '/'")
            ts.check_base(base.fingerprint, where=f"tagsets.{name}")
        self.ensembles: dict[str, list[str]] = {}
        self.rejected_ensembles: dict[str, TagrayError] = {}
        for name, doc in (ensembles or {}).items():
            members = list(doc["members"] if isinstance(doc, Mapping) else doc)
            if not members:
                raise ConfigError(f"ensembles.{name}", "an ensemble needs at least one member")
            unknown = [m for m in members if m not in self.sets and m not in self.rejected]
            if unknown:  # refused per request, so one stale ensemble does not take the registry down
                self.rejected_ensembles[name] = UnknownTagError(
                    "ensemble", f"ensemble {name!r} has members that are not tag sets here: {unknown}"
                )
                continue
            self.ensembles[name] = members
        self.tasks: dict[str, dict[str, TaskSpec]] = {
            n: {t: parse_task(d, where=f"tagsets.{n}.tasks.{t}") for t, d in ts.tasks.items()}
            for n, ts in self.sets.items()
        }
        self.device = next(base.model.parameters()).device
        self.model: TagLLM | None = None
        if self.sets:
            merged = merge_tagsets(self.sets)
            bank = TagBank(merged.tags)  # nothing trainable: every tag is a frozen buffer
            heads = (
                HeadBank(merged.heads, merged.head_specs, base.d_model, stats=merged.head_stats)
                if merged.heads
                else None
            )
            # isolation is decided per row (spans of rows from non-isolating sets are zeroed), so the
            # model applies the span mask whenever a row asks for it
            self.model = TagLLM(
                base.model, bank.to(self.device), heads.to(self.device) if heads else None, isolate_spans=True
            ).eval()
        self._encoders: OrderedDict[tuple, TemplateEncoder] = OrderedDict()
        self.stats = {"requests": 0, "rows": 0, "forward_passes": 0, "generate_passes": 0}

    @classmethod
    def from_registry(cls, base: Base, path: str, **kw) -> Predictor:
        """Every tag set and ensemble of a registry folder (local or ``s3://``); foreign sets are rejected
        per request, not at load time."""
        sets, ens, rejected = load_registry_lenient(path, base.fingerprint)
        return cls(base, sets, ens, rejected=rejected, **kw)

    # ---- catalogue ---------------------------------------------------------------------------------

    def catalogue(self) -> list[dict]:
        """One record per tag of every tag set: name, kind, length, stage, metrics, base fingerprint."""
        out = []
        for sname, ts in self.sets.items():
            specs = self.tasks[sname]
            static = {t for s in specs.values() for t in template_tags(s.template)}
            for tag, info in ts.tag_info.items():
                tasks = [t for t, s in specs.items() if self._task_uses(s, tag, info, static)]
                rec = {
                    "tagset": sname,
                    "name": tag,
                    "id": f"{sname}/{tag}",
                    "kind": info.get("kind"),
                    "length": info.get("length"),
                    "stage": info.get("stage"),
                    "tasks": tasks,
                    "metrics": {t: ts.metrics[t] for t in tasks if t in ts.metrics},
                    "base": fingerprint_id(ts.base),
                }
                if tag in ts.head_specs:
                    rec["head"] = ts.head_specs[tag].to_json()
                out.append(rec)
        return out

    @staticmethod
    def _task_uses(spec: TaskSpec, tag: str, info: Mapping, static: set[str]) -> bool:
        if info.get("kind") == "function":
            return spec.function_tag == tag
        if tag in template_tags(spec.template):
            return True
        # a tag that only ever fills dynamic slots (<FR> in "<{lang}> {text}") belongs to those tasks
        return tag not in static and any(p.kind == "tag" and p.dynamic for p in parse_template(spec.template))

    def describe(self) -> dict:
        """Catalogue plus ensembles and rejected tag sets (what ``GET /v1/tags`` returns)."""
        return {
            "base": fingerprint_id(self.base.fingerprint),
            "tags": self.catalogue(),
            "tagsets": sorted(self.sets),
            "ensembles": {n: {"members": m} for n, m in self.ensembles.items()},
            "rejected": {n: e.to_dict() for n, e in {**self.rejected, **self.rejected_ensembles}.items()},
        }

    def task_kind(self, task: str) -> str:
        """``regression`` / ``classification`` / ``lm`` of a task some loaded tag set knows."""
        for specs in self.tasks.values():
            if task in specs:
                return specs[task].target.kind
        known = sorted({t for specs in self.tasks.values() for t in specs})
        raise UnknownTagError("task", f"no tag set knows task {task!r}; tasks: {known}")

    # ---- resolution --------------------------------------------------------------------------------

    def _set(self, name: str, field: str) -> TagSet:
        if name in self.rejected:
            e = self.rejected[name]
            raise type(e)(field, e.message)
        if name not in self.sets:
            raise UnknownTagError(field, f"unknown tag set {name!r}; known: {sorted(self.sets)}")
        return self.sets[name]

    def _find_task(self, sname: str, tag: str | None, task: str | None, generate: bool) -> TaskSpec | None:
        """The task of set ``sname`` named ``task`` or using function tag ``tag`` (None if it has none)."""
        specs = self.tasks[sname]
        if task is not None:
            return specs.get(task)
        cands = [s for s in specs.values() if s.function_tag == tag]
        cands.sort(key=lambda s: (s.target.kind == "lm") != generate)  # the matching kind first
        return cands[0] if cands else None

    def _provides(self, sname: str, spec: TaskSpec, generate: bool) -> bool:
        ts = self.sets[sname]
        if spec.function_tag is not None and spec.function_tag not in ts.tags:
            return False
        if not generate and spec.head_tag is not None and spec.head_tag not in ts.heads:
            return False
        return all(t in ts.tags for t in template_tags(spec.template))

    def _members(
        self, req: Mapping, tag: str | None, task: str | None, generate: bool
    ) -> tuple[list[str], str | None]:
        """Tag-set names serving the request, and the ensemble name (if one was asked for)."""
        tagset, ensemble = _str(req, "tagset"), _str(req, "ensemble")
        if tagset is not None and ensemble is not None:
            raise InputError("ensemble", "give a tag set or an ensemble, not both")
        if ensemble is not None:
            if ensemble in self.rejected_ensembles:
                raise self.rejected_ensembles[ensemble]
            if ensemble not in self.ensembles:
                raise UnknownTagError(
                    "ensemble", f"unknown ensemble {ensemble!r}; known: {sorted(self.ensembles)}"
                )
            for m in self.ensembles[ensemble]:
                self._set(m, "ensemble")  # a member trained on another base makes the ensemble unusable
            return self.ensembles[ensemble], ensemble
        if tagset is not None:
            self._set(tagset, "tagset")
            return [tagset], None
        for sname in self.sets:  # default: the first set that provides the tag / task
            spec = self._find_task(sname, tag, task, generate)
            if spec is not None and self._provides(sname, spec, generate):
                return [sname], None
        what, field = (f"function tag {tag}", "tag") if task is None else (f"task {task!r}", "task")
        known = sorted({s.function_tag for sp in self.tasks.values() for s in sp.values() if s.function_tag})
        raise UnknownTagError(field, f"no tag set provides {what}; function tags: {known}")

    def _resolve(
        self, sname: str, spec: TaskSpec, row: Mapping, compose: Mapping[str, str], generate: bool
    ) -> Member:
        """Map each template tag of ``spec`` (for this row) to a bank tag, checking existence and kind."""
        # (resolved name, field to blame, kind the slot needs) per tag slot of the template
        slots = [
            (f"<{row[p.value]}>", f"inputs.{p.value}", "domain")
            if p.dynamic
            else (
                p.value,
                "tag" if p.value == spec.function_tag else "template",
                "function" if p.value == spec.function_tag else "domain",
            )
            for p in parse_template(spec.template)
            if p.kind == "tag"
        ]
        names = [n for n, _, _ in slots]
        unused = [k for k in compose if k not in names]
        if unused:
            raise InputError(f"compose.{unused[0]}", f"not a tag of task {spec.name!r}; its tags: {names}")
        rename: dict[str, str] = {}
        for t, field, want in slots:
            src, src_tag = sname, t
            if t in compose:
                field = f"compose.{t}"
                src, _, given = compose[t].partition("/")
                src_tag = _norm_tag(given, field) if given else t
            ts = self._set(src, field)
            if src_tag not in ts.tags:
                raise UnknownTagError(
                    field, f"tag set {src!r} has no tag {src_tag}; its tags: {sorted(ts.tags)}"
                )
            have = ts.tag_info[src_tag].get("kind", "domain")
            if have != want:
                raise InputError(
                    field, f"{src_tag} is a {have} tag; this slot of {spec.name!r} needs a {want} tag"
                )
            rename[t] = f"{src}/{src_tag}"
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

    def _encoder(self, spec: TaskSpec, rename: Mapping[str, str], owner: str) -> TemplateEncoder:
        key = (owner, spec.name, tuple(sorted(rename.items())))
        enc = self._encoders.get(key)
        if enc is None:
            enc = TemplateEncoder(
                self.tok,
                spec.template,
                self.model.tags.slots,
                char_fields=spec.char_fields,
                lm_field=spec.target.field,
                lm_eos=spec.target.eos,
                head_tag=spec.head_tag,
                rename=rename,
                max_length=spec.max_length,
            )
            self._encoders[key] = enc
            while len(self._encoders) > 512:  # compositions are user input: bound the cache
                self._encoders.popitem(last=False)
        else:
            self._encoders.move_to_end(key)
        if len(enc._text_cache) > 4096:  # the encoder caches every distinct field value: bound it
            enc._text_cache.clear()
        return enc

    def prepare(self, req: Mapping, index: int = 0, generate: bool = False) -> Prepared:
        """Validate one request and encode its row for every member; raises :class:`TagrayError`."""
        if not isinstance(req, Mapping):
            raise InputError("request", f"expected an object, got {type(req).__name__}")
        allowed = GENERATE_KEYS if generate else REQUEST_KEYS
        extra = sorted(set(req) - allowed)
        if extra:
            raise InputError(str(extra[0]), f"unknown field; allowed: {sorted(allowed)}")
        tag, task = _str(req, "tag"), _str(req, "task")
        if tag is None and task is None:
            raise InputError("tag", "give a function tag (e.g. <QED>) or a task name")
        tag = _norm_tag(tag) if tag is not None else None
        inputs = req.get("inputs") or {}
        compose = req.get("compose") or {}
        for key, d in (("inputs", inputs), ("compose", compose)):
            if not isinstance(d, Mapping):
                raise InputError(key, f"expected an object, got {type(d).__name__}")
            for k, v in d.items():
                _check_str(k, key)
                _check_str(v, f"{key}.{k}")
        compose = {_norm_tag(k, f"compose.{k}"): v for k, v in compose.items()}
        names, ensemble = self._members(req, tag, task, generate)
        members, rows = [], []
        for sname in names:
            spec = self._find_task(sname, tag, task, generate)
            if spec is None:
                field = "task" if task is not None else "tag"
                raise UnknownTagError(field, f"tag set {sname!r} has no task {task or 'using ' + str(tag)}")
            if tag is not None and spec.function_tag != tag:
                raise InputError("tag", f"task {spec.name!r} uses {spec.function_tag}, not {tag}")
            if generate != (spec.target.kind == "lm"):
                where = "/v1/generate (generate)" if spec.target.kind == "lm" else "/v1/predict (predict)"
                raise InputError("task", f"{spec.name!r} is a {spec.target.kind} task: use {where}")
            row = self._validate_inputs(spec, inputs)
            m = self._resolve(sname, spec, row, compose, generate)
            fields = set(spec.input_fields)
            if generate and spec.target.field not in row:
                # TemplateEncoder checks a field's presence before it stops at the LM target: a placeholder
                row = {**row, spec.target.field: ""}
            try:
                enc = self._encoder(spec, m.rename, sname).encode(row, with_target=False)
            except TagrayError as e:
                raise _input_error(e, fields) from None
            if m.head is not None:
                enc.head = m.head  # the encoder records the template's name; collate looks up bank names
            if not m.isolate:
                enc.span = [0] * len(enc)
            members.append(m)
            rows.append(enc)
        spec0 = members[0].spec
        mnt = 0
        if generate:
            mnt = req.get("max_new_tokens")
            mnt = spec0.generate.get("max_new_tokens", 48) if mnt is None else mnt
            if isinstance(mnt, bool) or not isinstance(mnt, int) or not 1 <= mnt <= MAX_NEW_TOKENS:
                raise InputError("max_new_tokens", f"expected an integer in [1, {MAX_NEW_TOKENS}]")
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
        )

    def _validate_inputs(self, spec: TaskSpec, inputs: Mapping[str, str]) -> dict:
        need = spec.input_fields  # other keys (ids, labels of a CSV row for `tagray predict`) are ignored
        for f in need:
            if f not in inputs:
                raise InputError(f"inputs.{f}", f"missing (task {spec.name!r} needs {need})")
            if len(inputs[f]) > MAX_CHARS:
                raise InputError(f"inputs.{f}", f"too long: {len(inputs[f])} characters > {MAX_CHARS}")
        dynamic = {p.value for p in parse_template(spec.template) if p.kind == "tag" and p.dynamic}
        for f in dynamic:
            if not TAG_NAME.match(inputs[f]):
                raise InputError(f"inputs.{f}", f"not a tag name: {inputs[f][:80]!r} (e.g. FR)")
        # labels are not derived at prediction time (they are the unknowns): validate fields only
        try:
            return prepare_row(
                dataclasses.replace(spec, derive={}), {f: inputs[f] for f in need}, with_target=False
            )
        except TagrayError as e:
            raise _input_error(e, set(need)) from None

    # ---- prediction --------------------------------------------------------------------------------

    def _prepare_all(self, requests: Sequence[Mapping], generate: bool, return_errors: bool):
        done: list = [None] * len(requests)
        ok: list[Prepared] = []
        for i, r in enumerate(requests):
            try:
                ok.append(self.prepare(r, i, generate))
            except TagrayError as e:
                if not return_errors:
                    raise
                done[i] = e
        self.stats["requests"] += len(requests)
        return done, ok

    @torch.inference_mode()
    def predict(self, requests: Sequence[Mapping], return_errors: bool = False) -> list:
        """Predictions for regression / classification requests, all members in shared forward passes.

        Returns:
            one dict per request (see :meth:`_answer`); with ``return_errors`` a failing request's slot
            holds its :class:`TagrayError` instead of raising it (Serve batches need per-item results).
        """
        done, ok = self._prepare_all(requests, False, return_errors)
        flat = [(p, j) for p in ok for j in range(len(p.rows))]
        values: dict[tuple[int, int], torch.Tensor] = {}
        order = sorted(range(len(flat)), key=lambda k: len(flat[k][0].rows[flat[k][1]]))  # little padding
        heads = self.model.heads if self.model is not None else None
        for s in range(0, len(order), self.max_batch_rows):
            chunk = [flat[k] for k in order[s : s + self.max_batch_rows]]
            batch = collate([p.rows[j] for p, j in chunk], heads.names, pad_id=self.tok.pad_token_id)
            batch = to_device(batch, self.device)
            hidden = self.model.hidden_states(batch)  # (B, T, d)
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["head_pos"]]  # (B, d)
            out = heads(h.float())  # (B, R): every head; each row reads its own columns
            self.stats["forward_passes"] += 1
            self.stats["rows"] += len(chunk)
            for b, (p, j) in enumerate(chunk):
                name = p.members[j].head
                o = out[b, heads.cols(name)]
                spec = heads.specs[name]
                if spec.kind == "regression":
                    mean = torch.tensor(spec.mean, device=o.device)
                    std = torch.tensor(spec.std, device=o.device)
                    values[(p.index, j)] = (o * std + mean).cpu()
                else:
                    values[(p.index, j)] = torch.softmax(o, -1).cpu()
        for p in ok:
            done[p.index] = self._answer(p, [values[(p.index, j)] for j in range(len(p.rows))])
        return done

    def _answer(self, p: Prepared, vals: list[torch.Tensor]) -> dict:
        """Aggregate member outputs: mean (regression) or mean probabilities (classification), with the
        members' spread as ``std`` (population std; 0 for a single tag set)."""
        names = [m.tagset for m in p.members]
        v = torch.stack(vals).double()  # (M, k) values or (M, C) probabilities
        mean, std = v.mean(0), v.std(0, unbiased=False)
        out = {
            "task": p.task,
            "tag": p.tag,
            "kind": p.kind,
            "tagset": p.tagset,
            "ensemble": p.ensemble,
            "composition": {m.tagset: dict(m.rename) for m in p.members},
        }
        if p.kind == "regression":
            scalar = v.shape[1] == 1
            pick = (lambda t: float(t[0])) if scalar else (lambda t: [float(x) for x in t])
            out.update(
                prediction=pick(mean),
                std=pick(std),
                members={n: pick(x) for n, x in zip(names, v, strict=True)},
                columns=list(p.members[0].spec.target.columns),
                probabilities=None,
            )
        else:
            hset, _, htag = p.members[0].head.partition("/")
            classes = list(self.sets[hset].head_specs[htag].classes) or [str(i) for i in range(v.shape[1])]
            best = int(mean.argmax())
            out.update(
                prediction=classes[best],
                std=float(std[best]),
                members={n: classes[int(x.argmax())] for n, x in zip(names, v, strict=True)},
                columns=None,
                probabilities={c: float(x) for c, x in zip(classes, mean, strict=True)},
            )
        return out

    # ---- generation --------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: Sequence[Mapping], return_errors: bool = False) -> list:
        """Greedy generation for LM tasks (e.g. translation), tags spliced into the prompt.

        Each request may compose tags from different sets, e.g. a language pair never trained together.
        Rows of different requests share ``generate`` calls (left-padded); each row is cut at its own
        ``max_new_tokens``, which for greedy decoding equals generating with that limit.
        """
        done, ok = self._prepare_all(requests, True, return_errors)
        flat = [(p, j) for p in ok for j in range(len(p.rows))]
        texts: dict[tuple[int, int], str] = {}
        order = sorted(range(len(flat)), key=lambda k: len(flat[k][0].rows[flat[k][1]]))
        tok = self.tok
        for s in range(0, len(order), self.max_batch_rows):
            chunk = [flat[k] for k in order[s : s + self.max_batch_rows]]
            batch = to_device(
                collate([p.rows[j] for p, j in chunk], pad_id=tok.pad_token_id, left_pad=True), self.device
            )
            emb = self.model.embed(batch["input_ids"], batch["tag_rows"])  # (B, T, d)
            gen = self.model.base.generate(
                inputs_embeds=emb,
                attention_mask=batch["attention_mask"],
                do_sample=False,
                max_new_tokens=max(p.max_new_tokens for p, _ in chunk),
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            self.stats["generate_passes"] += 1
            self.stats["rows"] += len(chunk)
            for g, (p, j) in zip(gen, chunk, strict=True):
                texts[(p.index, j)] = tok.decode(g[: p.max_new_tokens], skip_special_tokens=True).strip()
        for p in ok:
            outs = {m.tagset: texts[(p.index, j)] for j, m in enumerate(p.members)}
            values = list(outs.values())
            # an ensemble answers with its most common generation (ties: the first member's)
            text = max(values, key=lambda t: (values.count(t), -values.index(t)))
            done[p.index] = {
                "task": p.task,
                "tag": p.tag,
                "kind": p.kind,
                "tagset": p.tagset,
                "ensemble": p.ensemble,
                "text": text,
                "members": outs,
                "composition": {m.tagset: dict(m.rename) for m in p.members},
            }
        return done
