"""Frozen-prefix reuse: run a batch as a no-grad prefix plus a suffix with grad over the prefix's keys/values.

In a causal LM the keys and values of a position depend only on the positions before it. When every tag
before the first *trainable* tag is frozen (stages 2 and 3: the function tag stands at the end), the
prefix of each row is a constant: its keys/values can be computed once without autograd and reused on
every step and epoch, and only the last few positions (the function tag and any LM targets after it) run
with grad. PEFT prompt tuning puts its virtual tokens first, so it can never do this.

Layout. Row ``b`` of a right-padded batch has ``n_b`` tokens and splits at ``P_b``: the first position
that holds a trainable tag, a head read-out or an LM target's predecessor (whichever comes first). The
prefix ``[0, P_b)`` therefore neither depends on anything trained nor feeds any loss, so reusing it is
exact. The segments are laid out split-aligned::

    past slots  [0, P_max):  row b's prefix at [0, P_b), then masked padding
    query slots [0, S_max):  row b's suffix (original positions P_b .. n_b-1) at [0, S_b), then padding

with explicit position ids (RoPE / learned positions see the original positions) and an additive 4D mask
that encodes causality, padding and isolated spans, so the result equals the full forward up to float
summation order. Pure torch + transformers; no Ray here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .template import IGNORE


def _cache_kwarg(backbone: nn.Module) -> str:
    """transformers >= 5.x names the KV cache argument ``cache`` (``past_key_values`` before)."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def supports_prefix(base: nn.Module) -> bool:
    """Whether the split is exact for this base: full causal attention in every layer (no sliding window,
    whose mask we would not reproduce) and a backbone that accepts a KV cache."""
    cfg = getattr(base, "config", None)
    if cfg is None or not getattr(cfg, "is_decoder", True) and getattr(cfg, "is_encoder_decoder", False):
        return False
    if getattr(cfg, "sliding_window", None) or any(
        t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())
    ):
        return False
    return hasattr(base, "base_model")


def split_points(batch: dict, first_trainable_row: int) -> torch.Tensor:
    """``P_b`` per row ``(B,)``: the first position that depends on a trainable tag or feeds a loss.

    ``first_trainable_row``: tag-table rows at or above it are trainable (the bank packs frozen rows first).
    Everything before ``P_b`` is constant during training and is not read by any loss or head.
    """
    tag_rows, mask = batch["tag_rows"], batch["attention_mask"].bool()
    B, T = tag_rows.shape
    pos = torch.arange(T, device=tag_rows.device).expand(B, T)
    big = torch.full_like(pos, T)
    need = tag_rows >= first_trainable_row  # trainable tag positions
    labels = batch.get("labels")
    if labels is not None:
        # position t predicts token t+1: the predecessor of every labelled token carries the loss
        need = need | torch.cat(
            [labels[:, 1:] != IGNORE, torch.zeros_like(labels[:, :1], dtype=torch.bool)], 1
        )
    first = torch.where(need, pos, big).min(1).values
    hp = batch.get("head_pos")
    if hp is not None:
        first = torch.where(hp >= 0, torch.minimum(first, hp), first)
    n = mask.sum(1)
    return torch.minimum(first, (n - 1).clamp_min(0))  # at least the last real token runs as suffix


def segment_mask(
    past_valid: torch.Tensor,
    seg_len: torch.Tensor,
    S: int,
    span_past: torch.Tensor | None,
    span_seg: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask ``(B, 1, S, P + S)`` for ``S`` query slots over ``P`` past slots and themselves.

    Query ``j`` of row ``b`` sees the valid past slots (``past_valid (B, P)``) and query slots ``<= j``
    (``< seg_len[b]``). With span ids, a query inside an isolated span (id > 0) sees only keys of its own
    span; queries outside spans (id 0, e.g. the function tag) see everything before them.
    """
    B, P = past_valid.shape
    dev = past_valid.device
    j = torch.arange(S, device=dev)
    ks = (j[None, :] <= j[:, None])[None] & (j[None, None, :] < seg_len[:, None, None])  # (B, S, S)
    allowed = torch.cat([past_valid[:, None, :].expand(B, S, P), ks], 2)  # (B, S, P+S)
    if span_seg is not None:
        keys = torch.cat([span_past if span_past is not None else span_seg.new_zeros(B, P), span_seg], 1)
        q = span_seg[:, :, None]
        allowed = allowed & ((q == 0) | (q == keys[:, None, :]))
    out = torch.zeros(B, 1, S, P + S, dtype=dtype, device=dev)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def _gather(x: torch.Tensor, start: torch.Tensor, length: int, fill=0) -> torch.Tensor:
    """Rows of ``x (B, T, ...)`` re-aligned: out[b, j] = x[b, start[b] + j] (``fill`` past the end)."""
    B, T = x.shape[:2]
    idx = start[:, None] + torch.arange(length, device=x.device)[None]  # (B, L)
    ok = idx < T
    g = x[torch.arange(B, device=x.device)[:, None], idx.clamp_max(T - 1)]
    if g.dim() > 2:
        return torch.where(ok.view(B, length, *([1] * (g.dim() - 2))), g, torch.full_like(g, fill))
    return torch.where(ok, g, torch.full_like(g, fill))


@dataclass
class KV:
    """Keys/values of ``B`` rows: per layer ``(k, v)`` each ``(B, heads, slots, head_dim)``, and which slots
    hold real tokens (``valid (B, slots)``; a row's prefix is its first valid slots)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def row(self, b: int) -> torch.Tensor:
        """Row ``b``'s leading valid slots as one tensor ``(layers, 2, heads, L_b, head_dim)``."""
        n = int(self.valid[b].sum())
        return torch.stack([torch.stack([k[b, :, :n], v[b, :, :n]]) for k, v in self.layers])

    @staticmethod
    def stack(rows: list[torch.Tensor], dtype: torch.dtype, device) -> KV:
        """Rows from :meth:`row` (each ``(layers, 2, heads, L_b, hd)``) padded into one batch."""
        L, _, H, _, D = rows[0].shape
        P = max(r.shape[3] for r in rows)
        buf = torch.empty(L, 2, len(rows), H, P, D, dtype=dtype, device=device)
        for b, r in enumerate(rows):
            n = r.shape[3]
            buf[:, :, b, :, :n] = r.to(device=device, dtype=dtype)
            # masked slots get softmax weight 0, but 0 * NaN is NaN: only the padding is zeroed, not the buffer
            buf[:, :, b, :, n:] = 0
        n = torch.tensor([r.shape[3] for r in rows], device=device)
        return KV(
            [(buf[i, 0], buf[i, 1]) for i in range(L)], torch.arange(P, device=device)[None] < n[:, None]
        )

    def extend(self, other: KV) -> KV:
        """This past followed by ``other``'s slots (e.g. a decoding step's keys/values)."""
        layers = [
            (torch.cat([k, k2], 2), torch.cat([v, v2], 2))
            for (k, v), (k2, v2) in zip(self.layers, other.layers, strict=True)
        ]
        return KV(layers, torch.cat([self.valid, other.valid], 1))


def run_segment(
    base: nn.Module,
    emb: torch.Tensor,
    seg_len: torch.Tensor,
    positions: torch.Tensor,
    past: KV | None = None,
    span_seg: torch.Tensor | None = None,
    span_past: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KV]:
    """Run the backbone on a segment ``emb (B, S, d)`` over ``past``; returns hidden ``(B, S, d)`` and the
    segment's own keys/values (valid where ``slot < seg_len``)."""
    from transformers import DynamicCache

    backbone = base.base_model
    B, S, _ = emb.shape
    past_valid = past.valid if past is not None else torch.zeros(B, 0, dtype=torch.bool, device=emb.device)
    P = past_valid.shape[1]
    mask = segment_mask(past_valid, seg_len, S, span_past, span_seg, emb.dtype)
    cache = DynamicCache(ddp_cache_data=past.layers) if P else DynamicCache()
    out = backbone(
        inputs_embeds=emb,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **{_cache_kwarg(backbone): cache},
    )
    layers = [(lay.keys[:, :, P:], lay.values[:, :, P:]) for lay in cache.layers]
    valid = torch.arange(S, device=emb.device)[None] < seg_len[:, None]
    return out.last_hidden_state, KV(layers, valid)


# ---- per-row prefix store ----------------------------------------------------------------------------


def row_key(ids: torch.Tensor, tag_rows: torch.Tensor, span: torch.Tensor, n: int) -> str:
    """Content key of a row's prefix (its first ``n`` token ids, tag rows and span ids)."""
    a = torch.stack([ids[:n], tag_rows[:n], span[:n]]).to("cpu", torch.int64).contiguous()
    return hashlib.blake2b(a.numpy().tobytes(), digest_size=12).hexdigest()


class PrefixStore:
    """Per-row prefix keys/values reused across steps, epochs and requests, under a memory budget.

    Args:
        max_bytes: bytes kept in RAM; beyond it rows spill to ``spill_dir`` (memory-mapped ``.npy``
            files) when one is given, else the least recently used rows are dropped (an LRU).
        dtype: storage dtype. ``float32`` (default on CPU) keeps the split exact; ``bfloat16`` halves the
            memory at a small numerical cost (values are cast back to the compute dtype when used).
        spill_dir: folder for rows over the RAM budget (``"auto"``: a temporary folder).
        shared_dir: a node-local folder several processes share (the trials of a search): every row is
            a content-addressed ``.npy`` file under ``shared_dir/<context>/``, written once (atomic rename)
            and memory-mapped by every process, so the node's page cache holds one copy of each prefix
            however many trials read it. ``"auto"``: :func:`shared_root`. The RAM budget does not apply to
            it; :meth:`fill_lock` lets the first process fill the rows while the others wait and then read.
        context: fingerprint of everything the keys/values depend on besides the row (base weights,
            frozen tag values, span isolation, compute dtype); :meth:`ensure_context` clears the store
            when it changes.
    """

    def __init__(
        self,
        max_bytes: int = 2 << 30,
        dtype: torch.dtype = torch.float32,
        spill_dir: str | None = None,
        shared_dir: str | None = None,
    ):
        self.max_bytes = int(max_bytes)
        self.dtype = dtype
        self.spill_dir = tempfile.mkdtemp(prefix="tagray-prefix-") if spill_dir == "auto" else spill_dir
        self.shared_root = resolve_shared(shared_dir)
        self.shared: str | None = None  # shared_root/<context>, set by ensure_context
        self.ram: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.disk: dict[str, str] = {}
        self.ram_bytes = 0
        self.context: str | None = None
        self.stats = {
            "hits": 0,
            "misses": 0,
            "spilled": 0,
            "evicted": 0,
            "shared_hits": 0,
            "shared_writes": 0,
        }

    def ensure_context(self, context: str) -> None:
        if context != self.context:
            self.clear()
            self.context = context
            if self.shared_root:
                self.shared = os.path.join(self.shared_root, context)
                os.makedirs(self.shared, exist_ok=True)

    @contextlib.contextmanager
    def fill_lock(self):
        """Exclusive per-context lock while this process fills rows (a no-op without ``shared_dir``): the
        first trial on a node computes the prefixes, the others block here and then find every row."""
        if not self.shared:
            yield
            return
        with open(os.path.join(self.shared, ".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def clear(self) -> None:
        self.ram.clear()
        for p in self.disk.values():
            if self.shared and p.startswith(self.shared):
                continue  # other processes map it
            try:
                os.remove(p)
            except OSError:
                pass
        self.disk.clear()
        self.ram_bytes = 0

    def __len__(self) -> int:
        return len(self.ram) + len(self.disk)

    def __contains__(self, key: str) -> bool:
        return key in self.ram or key in self.disk

    def get(self, key: str) -> torch.Tensor | None:
        t = self.ram.get(key)
        if t is not None:
            self.ram.move_to_end(key)
            self.stats["hits"] += 1
            return t
        path = self.disk.get(key)
        if path is None and self.shared and os.path.exists(q := os.path.join(self.shared, key + ".npy")):
            path = self.disk[key] = q  # another process wrote it
            self.stats["shared_hits"] += 1
        if path is not None:
            self.stats["hits"] += 1
            with warnings.catch_warnings():  # read-only map: the rows are only ever copied from
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(np.load(path, mmap_mode="r"))
            return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t
        self.stats["misses"] += 1
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        v = value.detach().to("cpu", self.dtype).contiguous()
        if self.shared:  # one file per row for the whole node, read back through the page cache
            path = os.path.join(self.shared, key + ".npy")
            if not os.path.exists(path):
                _save_row(path, v)
                self.stats["shared_writes"] += 1
            self.disk[key] = path
            return
        nbytes = v.numel() * v.element_size()
        while self.ram and self.ram_bytes + nbytes > self.max_bytes:
            old, t = self.ram.popitem(last=False)
            self.ram_bytes -= t.numel() * t.element_size()
            if self.spill_dir:
                self._spill(old, t)
            else:
                self.stats["evicted"] += 1
        if self.ram_bytes + nbytes > self.max_bytes and self.spill_dir:
            self._spill(key, v)
            return
        self.ram[key] = v
        self.ram_bytes += nbytes

    def _spill(self, key: str, t: torch.Tensor) -> None:
        os.makedirs(self.spill_dir, exist_ok=True)
        path = os.path.join(self.spill_dir, key + ".npy")
        _save_row(path, t)
        self.disk[key] = path
        self.stats["spilled"] += 1

    def bytes_per_row(self) -> float:
        if not self.ram and self.disk:  # all rows in files (shared or spilled): their mean size (<= 64)
            paths = list(self.disk.values())[:64]
            return sum(os.path.getsize(q) for q in paths) / len(paths)
        return self.ram_bytes / max(1, len(self.ram))


def _save_row(path: str, t: torch.Tensor) -> None:
    """One row as ``.npy`` (bf16 stored as its int16 bits), written to a temporary name and renamed: atomic,
    so a process reading a shared folder sees the whole row or none."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy())
    os.replace(tmp, path)


def shared_root() -> str:
    """The node's shared prefix folder: ``$TAGRAY_PREFIX_SHARED``, else ``/dev/shm/tagray-prefix`` (RAM-backed,
    like Ray's object store) where ``/dev/shm`` is writable, else ``<tmp>/tagray-prefix``."""
    env = os.environ.get("TAGRAY_PREFIX_SHARED")
    if env:
        return env
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm/tagray-prefix"
    return os.path.join(tempfile.gettempdir(), "tagray-prefix")


def resolve_shared(shared_dir: str | None) -> str | None:
    """``auto`` -> :func:`shared_root`; ``auto:<name>`` -> ``<shared_root>/<name>`` (one search's rows, so
    that the search can delete them when it ends); a folder unchanged."""
    if shared_dir is not None and (shared_dir == "auto" or shared_dir.startswith("auto:")):
        name = shared_dir.partition(":")[2]
        return os.path.join(shared_root(), name) if name else shared_root()
    return shared_dir


def remove_shared(shared_dir: str) -> bool:
    """Delete one search's shared prefix rows on this node (``auto:<name>`` or a folder); True if there were
    any. Processes that still map a file keep their mapping (Linux frees it when the last one closes)."""
    path = resolve_shared(shared_dir)
    if not path or not os.path.isdir(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def kv_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one cached token costs: layers x 2 (k, v) x kv heads x head dim x element size."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "hidden_size", None) or config.n_embd
    hd = getattr(config, "head_dim", None) or d // heads
    return layers * 2 * kv * hd * torch.empty(0, dtype=dtype).element_size()
