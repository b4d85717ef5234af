"""FSDP for a frozen base (Ray-free prototype of ``scaling.strategy: fsdp``).

The base is sharded per transformer block with FSDP2 (``torch.distributed.fsdp.fully_shard``): the
auto-wrap policy is the model's own block class (``_no_split_modules``, e.g. ``LlamaDecoderLayer``), one
FSDP group per block plus one for everything else of the base (embeddings, final norm, LM head; a tied
embedding is one parameter). The tag and head tables are tiny and stay *replicated* plain parameters:
the :class:`~tagray.core.model.TagLLM` itself is the FSDP root with the tables as ``ignored_params``,
and their gradients are averaged over the ranks by a post-accumulate hook (what DDP does for them).

Why this shape:

- The base is frozen: FSDP never reduce-scatters a gradient or holds optimizer state for it. Each rank
  keeps ``1/world`` of the base plus, transiently, the blocks being all-gathered (a forward, and again
  in the backward that computes the input gradients for the tags).
- Loading never builds a full copy on a rank: :func:`load_sharded_base` makes a ``meta`` skeleton,
  shards it, allocates only the local shards and fills each from its rows in the checkpoint
  (safetensors slices; :func:`array_rows` does the same from a node's shared object-store arrays).
- Evaluation and checkpoints go through the same module: FSDP2 shards in place, so ``setup.model`` is
  the wrapped model, and the tables a checkpoint or :class:`~tagray.train.checkpoint.BestSnapshot`
  reads are the replicated plain tensors (the full state of tags and heads, no gather).
- Every FSDP forward is a collective, so every rank must run the same sequence of forwards
  ("lockstep"): the prefix store is switched off (its hits differ per rank), the split / no-split choice
  is agreed by an all-reduce, and evaluation shards its batches with :func:`lockstep`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..core.model import TagLLM

RowSource = Callable[[str, int, int], "torch.Tensor | None"]  # (name, first row, end row) -> rows or None


def block_classes(base: nn.Module) -> set[type]:
    """The auto-wrap policy: classes named in the model's ``_no_split_modules`` (its transformer blocks)."""
    names = set(getattr(base, "_no_split_modules", None) or ())
    found = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(f"{type(base).__name__} names no transformer-block class (_no_split_modules)")
    return found


def shard_base(base: nn.Module, mesh=None) -> nn.Module:
    """Apply FSDP2 in place: one group per transformer block, one for the rest of the base (embeddings,
    final norm, LM head). Works on a ``meta`` skeleton (then :func:`materialize`) or on real weights."""
    from torch.distributed.fsdp import fully_shard

    classes = tuple(block_classes(base))
    blocks = [m for m in base.modules() if isinstance(m, classes)]
    for b in blocks:
        fully_shard(b, mesh=mesh)
    inside = {id(p) for b in blocks for p in b.parameters()}
    # the leaf modules that own the remaining parameters, as one group (FSDP2 accepts a list of modules)
    rest = [m for m in base.modules() if any(id(p) not in inside for p in m.parameters(recurse=False))]
    if rest:
        fully_shard(rest, mesh=mesh)
    return base


def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """FSDP2's dim-0 shard of ``n`` rows on ``rank`` (``torch.chunk``: ceil-sized, the last ones shorter)."""
    per = math.ceil(n / world) if n else 0
    return min(rank * per, n), min((rank + 1) * per, n)


@torch.no_grad()
def materialize(base: nn.Module, source: RowSource, device: torch.device) -> dict[str, int]:
    """Allocate the local shards of a sharded ``meta`` skeleton on ``device`` and fill each with its rows
    from ``source``; non-persistent buffers (rotary frequencies) come from the source or are recomputed.

    Returns ``{parameter name: elements read}``: this rank's rows only, never a whole tensor.
    """
    from torch.distributed.tensor import DTensor

    base.to_empty(device=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    read: dict[str, int] = {}
    names: dict[int, list[str]] = {}
    for name, p in base.named_parameters(remove_duplicate=False):  # a tied weight answers to both names
        names.setdefault(id(p), []).append(name)
    for p in {id(p): p for p in base.parameters()}.values():
        local = p.to_local() if isinstance(p, DTensor) else p
        a, b = _rows(p.shape[0], rank, world) if isinstance(p, DTensor) else (0, p.shape[0])
        if local.shape[0] != b - a:
            raise RuntimeError(f"{names[id(p)][0]}: local shard has {local.shape[0]} rows, expected {b - a}")
        rows = next((r for r in (source(n, a, b) for n in names[id(p)]) if r is not None), None)
        if rows is None:
            raise KeyError(f"{names[id(p)]}: not in the checkpoint")
        local.copy_(rows.to(local.dtype))
        read[names[id(p)][0]] = rows.numel()
    for mod_name, mod in base.named_modules():
        for bname, buf in mod.named_buffers(recurse=False):
            full = f"{mod_name}.{bname}" if mod_name else bname
            got = source(full, 0, buf.shape[0]) if buf.dim() else None
            if got is not None:
                buf.copy_(got.to(buf.dtype))
            elif hasattr(base, "_init_weights") and not any(True for _ in mod.parameters(recurse=False)):
                base._init_weights(mod)  # transformers recomputes e.g. rotary ``inv_freq`` here
            else:  # re-initialising a module with weights would overwrite them: refuse instead
                raise KeyError(f"buffer {full}: not in the checkpoint and cannot be recomputed")
    return read


def safetensors_rows(folder: str) -> RowSource:
    """Rows of the tensors of a Hugging Face safetensors checkpoint (one file or an index), read as
    slices: only the requested rows leave the (memory-mapped) file."""
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    else:
        path = os.path.join(folder, "model.safetensors")
        with safe_open(path, framework="pt") as f:
            files = dict.fromkeys(f.keys(), path)
    handles: dict[str, object] = {}

    def rows(name: str, a: int, b: int) -> torch.Tensor | None:
        if name not in files:
            return None
        f = handles.get(files[name]) or handles.setdefault(
            files[name], safe_open(files[name], framework="pt")
        )
        return f.get_slice(name)[a:b]

    return rows


def array_rows(state: dict) -> RowSource:
    """Rows of :func:`tagray.core.weights.export_state` arrays (e.g. a node's zero-copy object-store copy
    of the base, :mod:`tagray.ray.shared`): each rank copies only its rows to its device."""
    by_name = {n: k for k, ns in state["names"].items() for n in ns}

    def rows(name: str, a: int, b: int) -> torch.Tensor | None:
        key = by_name.get(name)
        if key is None:
            return None
        t = torch.from_numpy(state["arrays"][key][a:b].copy())  # a slice of the shared pages
        return t.view(torch.bfloat16) if state["dtypes"][key] == "bfloat16" else t

    return rows


def load_sharded_base(
    config, source: RowSource, device: torch.device | str, dtype: torch.dtype = torch.float32, mesh=None
) -> nn.Module:
    """A frozen ``AutoModelForCausalLM`` of ``config``, sharded per block, with only this rank's rows of
    every weight ever allocated (the skeleton is built on ``meta``)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    shard_base(base.eval(), mesh)
    materialize(base, source, torch.device(device))
    return base


def full_weight(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter, e.g. the input embeddings a new tag's
    mean-embedding init reads. A collective when sharded: every rank must call it."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def prepare(model: TagLLM, mesh=None) -> TagLLM:
    """Make a :class:`TagLLM` over a sharded base (:func:`shard_base`) train and evaluate under FSDP.

    The model becomes the FSDP root (it owns no sharded parameter; the tag and head tables are ignored,
    i.e. replicated), every method that runs the base triggers FSDP's hooks, the prefix store is dropped,
    the split choice is agreed over the ranks and the tables' gradients are averaged like DDP's.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if not any(isinstance(m, FSDPModule) for m in model.base.modules()):
        raise ValueError("shard the base first (shard_base / load_sharded_base)")
    model.prefix_store = None  # hits differ per rank, so ranks would run different forwards (deadlock)
    tables = [model.tags] + ([model.heads] if model.heads is not None else [])
    ignored = {p for t in tables for p in t.parameters()}
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    for name in ("run", "head_features", "hidden_states", "logits", "embed"):
        register_fsdp_forward_method(model, name)
    _agree_on_split(model)
    _average_gradients(model.trainable_parameters())
    return model


def _agree_on_split(model: TagLLM) -> None:
    """Split a batch only if every rank splits its own: the choice depends on the batch (prefix share),
    and a split runs the base twice, so ranks that chose differently would pair up mismatched
    all-gathers. (A ``collective`` hook in ``TagLLM._split`` would replace this instance override.)"""
    own = model._split

    def split(batch: dict):
        cut = own(batch)
        flag = torch.tensor([int(cut is not None)], device=batch["input_ids"].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return cut if int(flag) else None

    model._split = split


def _average_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce each replicated table's gradient after it is accumulated, as DDP would. Linear, so
    with gradient accumulation the already-averaged part stays averaged."""
    world = dist.get_world_size()

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(world)

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


def lockstep(batches: list[list[int]], rank: int, world: int) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches ``(batch, keep)``, every ``world``-th of them, padded with repeats
    (``keep=False``: run, then discard) so that every rank runs the same number of forwards."""
    mine = [(b, True) for b in batches[rank::world]]
    if not batches:
        return mine
    return mine + [(batches[0], False)] * (math.ceil(len(batches) / world) - len(mine))


def local_param_bytes(module: nn.Module) -> tuple[int, int]:
    """``(bytes this rank holds, bytes of the full model)`` over the unique parameters."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for p in {id(p): p for p in module.parameters()}.values():
        t = p.to_local() if isinstance(p, DTensor) else p
        local += t.numel() * t.element_size()
        full += p.numel() * p.element_size()
    return local, full
