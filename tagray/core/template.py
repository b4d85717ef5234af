"""Templates -> token ids with tag slots.

A template is text with ``<Tag>`` markers and ``{field}`` slots, e.g.
``"The SMILES of the molecule is <SMILES> {smiles}. The QED is <QED>"``. A tag name may itself use a
field (``<{src_lang}>``), so one template covers every language pair. Each text piece and field value is
tokenised on its own; each tag becomes ``p`` positions that point at rows of the tag table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import InputError, UnknownTagError

_PIECE = re.compile(r"<\{(\w+)\}>|<([A-Za-z][\w\-.]*)>|\{(\w+)\}")

IGNORE = -100


@dataclass(frozen=True)
class Piece:
    kind: str  # "text" | "tag" | "field"
    value: str  # literal text, tag name ("<QED>"), field name; for dynamic tags the field name
    dynamic: bool = False


def parse_template(template: str) -> list[Piece]:
    """Split a template into text, tag and field pieces (tags keep their angle brackets)."""
    out, pos = [], 0
    for m in _PIECE.finditer(template):
        if m.start() > pos:
            out.append(Piece("text", template[pos : m.start()]))
        if m.group(1):
            out.append(Piece("tag", m.group(1), dynamic=True))
        elif m.group(2):
            out.append(Piece("tag", f"<{m.group(2)}>"))
        else:
            out.append(Piece("field", m.group(3)))
        pos = m.end()
    if pos < len(template):
        out.append(Piece("text", template[pos:]))
    return out


def template_fields(template: str) -> set[str]:
    return {p.value for p in parse_template(template) if p.kind == "field" or p.dynamic}


def template_tags(template: str, row: Mapping | None = None) -> list[str]:
    """Tag names in order; dynamic ones resolved from ``row`` (skipped when no row is given)."""
    names = []
    for p in parse_template(template):
        if p.kind == "tag":
            if not p.dynamic:
                names.append(p.value)
            elif row is not None:
                names.append(f"<{row[p.value]}>")
    return names


@dataclass
class Encoded:
    """One encoded row; all lists have the same length T."""

    ids: list[int]
    tag_rows: list[int]  # row of the virtual tag table, or -1 for an ordinary token
    labels: list[int]  # LM target token at this position, or IGNORE
    span: list[int]  # isolated-span id (0 = ordinary causal attention)
    head_pos: int = -1  # position of the head tag's last vector, or -1
    head: str | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


class TemplateEncoder:
    """Encodes rows of one template with one tokenizer against a tag layout.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: the task template.
        slots: tag name -> object with ``start``/``rows`` (a :class:`~tagray.core.tags.Slot`).
        char_fields: fields tokenised one character per token (protein sequences).
        lm_field: field whose tokens are LM targets (stage 1, translation), or None.
        lm_eos: append EOS after ``lm_field`` as a target (so generation learns to stop).
        head_tag: tag whose last vector feeds the head (regression / classification), or None.
        function_tag: the task's function tag (``head_tag`` for heads; e.g. ``<Translate>`` for LM
            tasks). Only the other (domain) tags open isolated spans.
        drop_tags: leave every tag out (the untagged-prompt baseline of an LM task).
        rename: optional map from template tag names to bank names (serving namespaces tag sets).
        max_length: rows longer than this raise :class:`InputError` naming the longest field.
        add_bos: prepend the tokenizer's BOS token when it has one.
    """

    def __init__(
        self,
        tokenizer,
        template: str,
        slots: Mapping,
        *,
        char_fields=(),
        lm_field=None,
        lm_eos=False,
        head_tag=None,
        function_tag=None,
        rename: Mapping[str, str] | None = None,
        max_length=512,
        add_bos=True,
        drop_tags=False,
    ):
        self.tok = tokenizer
        self.template = template
        self.pieces = parse_template(template)
        self.slots = slots
        self.char_fields = set(char_fields)
        self.lm_field = lm_field
        self.lm_eos = lm_eos
        self.head_tag = head_tag
        self.function_tag = function_tag or head_tag
        self.drop_tags = drop_tags
        self.rename = dict(rename or {})
        self.max_length = max_length
        # prepend BOS exactly when the tokenizer itself would (Llama: yes; GPT-2, SmolLM2: no)
        bos = getattr(tokenizer, "bos_token_id", None)
        probe = tokenizer.encode("a", add_special_tokens=True) if add_bos else []
        self.prefix = [bos] if (bos is not None and probe and probe[0] == bos) else []
        self._text_cache: dict[str, list[int]] = {}
        self._char_cache: dict[str, list[int]] = {}

    def _text(self, s: str, cache: bool = True) -> list[int]:
        if not cache:  # field values are unbounded (a server sees endless new ones): never cached
            return self.tok.encode(s, add_special_tokens=False)
        if s not in self._text_cache:
            self._text_cache[s] = self.tok.encode(s, add_special_tokens=False)
        return self._text_cache[s]

    def _chars(self, s: str) -> list[int]:
        out = []
        for c in s:
            if c not in self._char_cache:
                self._char_cache[c] = self.tok.encode(c, add_special_tokens=False)
            out.extend(self._char_cache[c])
        return out

    def tag_name(self, piece: Piece, row: Mapping) -> str:
        name = f"<{row[piece.value]}>" if piece.dynamic else piece.value
        return self.rename.get(name, name)

    def _opens_span(self, i: int, name: str) -> bool:
        """A domain tag followed by data (optionally after whitespace) opens an isolated span."""
        if (
            name == self.rename.get(self.function_tag, self.function_tag)
            or self.pieces[i].value == self.function_tag
        ):
            return False
        nxt = self.pieces[i + 1 : i + 3]
        if nxt and nxt[0].kind == "text" and not nxt[0].value.strip():
            nxt = nxt[1:]
        return bool(nxt) and nxt[0].kind == "field"

    def encode(self, row: Mapping, *, with_target: bool = True) -> Encoded:
        """Encode one row (a mapping of field -> string).

        Isolated spans: a domain tag directly before a field (``<SMILES> {smiles}``) opens a span that
        holds the tag's vectors, the whitespace after it and the field's tokens; the next other text or
        tag closes it. The function tag never opens one: it must see everything before it.

        Args:
            with_target: when False, stop before ``lm_field`` (a generation prompt).
        """
        ids, tag_rows, labels, span = (
            list(self.prefix),
            [-1] * len(self.prefix),
            [IGNORE] * len(self.prefix),
            [0] * len(self.prefix),
        )
        head_pos, span_id, open_span = -1, 0, 0
        lengths: dict[str, int] = {}

        def add(toks, rows=None, lab=None, sp=0):
            ids.extend(toks)
            tag_rows.extend(rows if rows is not None else [-1] * len(toks))
            labels.extend(lab if lab is not None else [IGNORE] * len(toks))
            span.extend([sp] * len(toks))

        for i, p in enumerate(self.pieces):
            if p.kind == "text":
                whitespace_in_span = open_span and not p.value.strip()
                if not whitespace_in_span:
                    open_span = 0  # any other text closes the span
                add(self._text(p.value), sp=open_span)
            elif p.kind == "tag":
                if p.dynamic and p.value not in row:
                    raise InputError(p.value, "missing (the template's tag needs it)")
                name = self.tag_name(p, row)
                if name not in self.slots:
                    raise UnknownTagError(p.value if p.dynamic else "tag", f"unknown tag {name}")
                if self.drop_tags:
                    open_span = 0
                    continue
                s = self.slots[name]
                if self._opens_span(i, name):
                    span_id += 1
                    open_span = span_id
                else:
                    open_span = 0
                add([0] * s.rows, rows=list(range(s.start, s.start + s.rows)), sp=open_span)
                if self.head_tag is not None and name == self.rename.get(self.head_tag, self.head_tag):
                    head_pos = len(ids) - 1
            else:  # field
                is_target = p.value == self.lm_field
                if is_target and not with_target:
                    break  # a generation prompt ends right before the target text
                if p.value not in row or row[p.value] is None:
                    raise InputError(p.value, "missing")
                value = str(row[p.value])
                toks = self._chars(value) if p.value in self.char_fields else self._text(value, cache=False)
                lengths[p.value] = len(toks)
                if is_target and self.lm_eos and self.tok.eos_token_id is not None:
                    toks = toks + [self.tok.eos_token_id]
                add(toks, lab=toks if is_target else None, sp=open_span)
                open_span = 0  # a span holds one field
        if len(ids) > self.max_length:
            longest = max(lengths, key=lengths.get) if lengths else "template"
            raise InputError(longest, f"too long: {len(ids)} tokens > max_length {self.max_length}")
        if self.head_tag is not None and head_pos < 0 and not self.drop_tags:
            raise InputError("template", f"head tag {self.head_tag} does not occur in {self.template!r}")
        return Encoded(ids, tag_rows, labels, span, head_pos, self.head_tag if head_pos >= 0 else None)
