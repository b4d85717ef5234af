"""Predictions and generations over many tag sets at once: batching and aggregation.

:class:`Predictor` packs every tag set into ONE frozen :class:`~tagray.core.model.TagLLM`, so requests
that use different tag sets, ensembles or compositions share one forward pass: soft tags are input-side
only, so a heterogeneous batch is just rows whose tag positions index different table rows. Validation
and resolution are :mod:`.schema` and :mod:`.resolver`; the catalogue is :mod:`.catalogue`.

Shared prefixes. Ensemble members (e.g. the top trials of a search) usually differ only in their
function tag, which stands at the end of the prompt. The bank keeps function tags in a block of their
own, which :class:`TagLLM` treats as the start of each row's suffix (``split_points``): the prompt up
to the function tag is keyed by its content and computed once per batch, kept in a bounded
:class:`~tagray.core.prefix.PrefixStore` for repeats, and only the function tags run per member. Exact:
the prefix attends to nothing after it. Forward passes without an ensemble run every row in one piece.
Pure torch: no Ray import here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..core.artifacts import TagSet, load_tagset, merge_tagsets
from ..core.base import Base
from ..core.data import collate, to_device
from ..core.errors import ConfigError, FingerprintMismatch, TagrayError
from ..core.generate import greedy_generate
from ..core.heads import HeadBank
from ..core.model import TagLLM
from ..core.prefix import PrefixStore
from ..core.tags import Slot, TagBank
from .catalogue import catalogue, describe
from .resolver import Prepared, Resolver

PREFIX_CACHE_BYTES = 256 * 2**20


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

    from ..registry import list_ensembles, list_tagsets

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


def build_model(
    base: Base, sets: Mapping[str, TagSet], prefix_cache_bytes: int
) -> tuple[TagLLM, dict[str, Slot]]:
    """One frozen TagLLM over every set, and the bank slot of every ``"set/<Tag>"`` (aliases included)."""
    device = next(base.model.parameters()).device
    merged = merge_tagsets(dict(sets))  # identical tags of different sets share one entry
    function = {n for n, info in merged.tag_info.items() if info.get("kind") == "function"}
    # function tags form the bank's second block: TagLLM starts each row's suffix at its first position
    # from that block, so everything before the function tag is a shareable prefix. Nothing is trained.
    bank = TagBank(merged.tags, trainable=function)
    bank.trainable.requires_grad_(False)
    heads = (
        HeadBank(merged.heads, merged.head_specs, base.d_model, stats=merged.head_stats).to(device)
        if merged.heads
        else None
    )
    dtype = next(base.model.parameters()).dtype  # stored in the compute dtype: exact, no conversions
    store = PrefixStore(prefix_cache_bytes, dtype=dtype, spill_dir=None) if prefix_cache_bytes > 0 else None
    # isolation is decided per row (spans of rows from non-isolating sets are zeroed), so the model
    # applies the span mask whenever a row asks for it
    model = TagLLM(
        base.model,
        bank.to(device),
        heads,
        isolate_spans=True,
        prefix="auto" if store is not None else "off",
        prefix_store=store,
    ).eval()
    return model, {alias: bank.slots[entry] for alias, entry in merged.meta["aliases"].items()}


class Predictor:
    """Predictions and generations from any mix of tag sets over one frozen base.

    Args:
        base: the frozen base (e.g. :func:`~tagray.core.base.load_base` or Serve's shared copy).
        tagsets: name -> :class:`TagSet`; every set must be trained on ``base`` (else
            :class:`FingerprintMismatch`).
        ensembles: name -> ``{"members": [set names], ...}`` (a registry ensemble doc) or a plain list.
        rejected: set name -> error to raise when a request names it (see :func:`load_registry_lenient`).
        max_batch_rows: rows per forward pass (larger request lists are processed in chunks).
        prefix_cache_bytes: RAM for prompt prefixes kept across requests (LRU); 0 turns the shared-prefix
            split off (every row runs in full).
    """

    def __init__(
        self,
        base: Base,
        tagsets: Mapping[str, TagSet],
        ensembles: Mapping[str, object] | None = None,
        *,
        rejected: Mapping[str, TagrayError] | None = None,
        max_batch_rows: int = 64,
        prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
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
        self.device = next(base.model.parameters()).device
        self.model: TagLLM | None = None
        slots: dict[str, Slot] = {}
        if self.sets:
            self.model, slots = build_model(base, self.sets, prefix_cache_bytes)
        self._prefix = self.model.prefix if self.model is not None else "off"  # "off": base cannot split
        self.resolver = Resolver(self.tok, self.sets, ensembles or {}, self.rejected, slots)
        self.ensembles = self.resolver.ensembles
        self.tasks = self.resolver.tasks
        self.stats = {
            "requests": 0,
            "rows": 0,
            "forward_passes": 0,
            "generate_passes": 0,
            "prefix_rows_computed": 0,  # unique prompt prefixes run (the rest came from the batch / store)
            "prefix_rows_reused": 0,
        }

    @classmethod
    def from_registry(cls, base: Base, path: str, **kw) -> Predictor:
        """Every tag set and ensemble of a registry folder (local or ``s3://``); foreign sets are rejected
        per request, not at load time."""
        sets, ens, rejected = load_registry_lenient(path, base.fingerprint)
        return cls(base, sets, ens, rejected=rejected, **kw)

    def catalogue(self) -> list[dict]:
        return catalogue(self.sets, self.tasks)

    def describe(self) -> dict:
        """Catalogue plus ensembles and rejected tag sets (what ``GET /v1/tags`` returns)."""
        rejected = {**self.rejected, **self.resolver.rejected_ensembles}
        return describe(self.base.fingerprint, self.sets, self.tasks, self.ensembles, rejected)

    def task_kind(self, task: str) -> str:
        """``regression`` / ``classification`` / ``lm`` of a task some loaded tag set knows."""
        return self.resolver.task_kind(task)

    # ---- batching -----------------------------------------------------------------------------------

    def _prepare_all(self, requests: Sequence[Mapping], generate: bool, return_errors: bool):
        done: list = [None] * len(requests)
        ok: list[Prepared] = []
        for i, r in enumerate(requests):
            try:
                ok.append(self.resolver.prepare(r, i, generate))
            except TagrayError as e:
                if not return_errors:
                    raise
                done[i] = e
        self.stats["requests"] += len(requests)
        return done, ok

    def _chunks(self, ok: list[Prepared]) -> list[list[tuple[Prepared, int]]]:
        """(request, member) pairs sorted by row length (little padding), cut into forward passes."""
        flat = sorted(((p, j) for p in ok for j in range(len(p.rows))), key=lambda x: len(x[0].rows[x[1]]))
        return [flat[s : s + self.max_batch_rows] for s in range(0, len(flat), self.max_batch_rows)]

    def _collate(self, chunk: list[tuple[Prepared, int]], head_names=()) -> dict:
        rows = [p.rows[j] for p, j in chunk]  # right-padded: the split forward and greedy decoding need it
        return to_device(collate(rows, head_names, pad_id=self.tok.pad_token_id), self.device)

    @torch.inference_mode()
    def predict(self, requests: Sequence[Mapping], return_errors: bool = False) -> list:
        """Predictions for regression / classification requests, all members in shared forward passes.

        Returns:
            one dict per request (see :meth:`_answer`); with ``return_errors`` a failing request's slot
            holds its :class:`TagrayError` instead of raising it (Serve batches need per-item results).
        """
        done, ok = self._prepare_all(requests, False, return_errors)
        values: dict[tuple[int, int], torch.Tensor] = {}
        for chunk in self._chunks(ok):
            heads = self.model.heads
            batch = self._collate(chunk, heads.names)
            # the split pays where members share a prefix; for rows that share nothing it only adds a
            # second pass over the weights (measured: bench/serve_bench.py), so they run in one piece
            self.model.prefix = self._prefix if any(len(p.rows) > 1 for p, _ in chunk) else "off"
            out = heads(self.model.head_features(batch).float())  # (B, R): every head; rows read their own
            self._count("forward_passes", len(chunk))
            for b, (p, j) in enumerate(chunk):
                name = p.members[j].head
                values[(p.index, j)] = heads.specs[name].decode(out[b : b + 1, heads.cols(name)])[0].cpu()
        for p in ok:
            done[p.index] = self._answer(p, [values[(p.index, j)] for j in range(len(p.rows))])
        return done

    def _count(self, passes: str, rows: int) -> None:
        self.stats[passes] += 1
        self.stats["rows"] += rows
        computed = self.model.last_split.get("computed_rows")
        if computed is not None:  # the split ran: one prefix per unique row, batch- and store-wide
            self.stats["prefix_rows_computed"] += computed
            self.stats["prefix_rows_reused"] += rows - computed

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
            "out_of_distribution": False,  # regression heads check their training range below
            "ood_reasons": [],
        }
        hset, _, htag = p.members[0].head.partition("/")
        hspec = self.sets[hset].head_specs[htag]
        if p.kind == "regression":
            why = hspec.ood(mean, p.input_chars)
            if hspec.clip is not None:  # the task's declared range (e.g. QED in [0, 1])
                mean = mean.clamp(*hspec.clip)
            out.update(out_of_distribution=bool(why), ood_reasons=why)
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
            classes = list(hspec.classes) or [str(i) for i in range(v.shape[1])]
            best = int(mean.argmax())
            out.update(
                prediction=classes[best],
                std=float(std[best]),
                members={n: classes[int(x.argmax())] for n, x in zip(names, v, strict=True)},
                columns=None,
                probabilities={c: float(x) for c, x in zip(classes, mean, strict=True)},
            )
        return out

    @torch.inference_mode()
    def generate(self, requests: Sequence[Mapping], return_errors: bool = False) -> list:
        """Greedy generation for LM tasks (e.g. translation), tags spliced into the prompt.

        Decoding is :func:`~tagray.core.generate.greedy_generate`, the one training's evaluation uses
        (isolated spans masked as in training). Each request may compose tags from different sets, e.g.
        a language pair never trained together; rows of different requests share decoding passes, each
        stopped at its own ``max_new_tokens``.
        """
        done, ok = self._prepare_all(requests, True, return_errors)
        texts: dict[tuple[int, int], str] = {}
        for chunk in self._chunks(ok):
            limits = [p.max_new_tokens for p, _ in chunk]
            ids = greedy_generate(self.model, self._collate(chunk), limits, self.tok.eos_token_id)
            self.stats["generate_passes"] += 1
            self.stats["rows"] += len(chunk)
            for g, (p, j) in zip(ids, chunk, strict=True):
                texts[(p.index, j)] = self.tok.decode(g, skip_special_tokens=True).strip()
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
