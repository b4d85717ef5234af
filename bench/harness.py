"""The shared harness of the training benchmarks (``train_vs_peft.py`` on CPU, ``gpu_bench.py`` on a GPU).

Both scripts compare, in one process and on exactly the same rows, tagray's frozen-prefix training step
(prefix keys/values reused from a :class:`~tagray.core.prefix.PrefixStore` across epochs, recomputed
without grad each step, or not split at all) with Hugging Face PEFT prompt tuning plus a regression head.
Every variant reads the function tag's (or the last input token's) final hidden state; none computes
vocabulary logits unless a lever ablation asks for them. Variants run step by step in a rotating order
so that load from other processes hits all of them alike.

Importable on a bare GPU machine: torch, transformers, peft (lazily) and tagray's pure-torch core only.

Accounting (per step, see :class:`Step`): a *slot* is one token position of the padded tensors the model
ran; slots run with grad cost ``flops_grad`` each (forward 2N + input-gradient backward 2N, no weight
gradients), slots run without grad ``flops_nograd`` (forward 2N); attention-score FLOPs are left out.
*Useful* tokens are a row's real tokens as that variant sees them (template + SMILES + tag or virtual
tokens), padding excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tagray's core from this checkout: no install needed on a bare GPU box
    sys.path.insert(0, str(ROOT))

from tagray.core.data import BucketBatchSampler, collate, to_device  # noqa: E402
from tagray.core.model import TagLLM  # noqa: E402
from tagray.core.prefix import PrefixStore, kv_bytes_per_token, split_points  # noqa: E402
from tagray.core.template import Encoded  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def add_options(parser: argparse.ArgumentParser, /, **defaults: object) -> None:
    """One ``--name`` option per keyword (``snake_case`` -> ``--snake-case``), typed by its default: a list
    default takes one or more values of its first element's type, ``None`` a string."""
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, list):
            parser.add_argument(flag, type=type(default[0]), nargs="+", default=default)
        else:
            parser.add_argument(flag, type=str if default is None else type(default), default=default)


@dataclass
class Row:
    """One QED training example in both encodings."""

    enc: Encoded  # tagray: token ids with tag slots, head at the function tag's last position
    text_ids: list[int]  # PEFT: the same tokens without the tag positions (virtual tokens are prepended)
    label_ids: list[int]  # PEFT LM-loss lever: the QED value as text, then EOS
    target: float

    @property
    def useful(self) -> int:
        return len(self.enc)


@dataclass
class Step:
    """What one step did: its loss and the padded token slots it ran with and without grad."""

    loss: float
    grad_slots: int
    nograd_slots: int = 0


@dataclass
class Variant:
    """One way to run a training step, and what it measured."""

    name: str
    step: Callable[[list[Row]], Step]  # rows -> one optimizer update
    length: Callable[[Row], int]  # real tokens the model sees for a row
    flops_grad: float  # matmul FLOPs per slot run with grad
    flops_nograd: float = 0.0  # per slot run without grad
    info: dict = field(default_factory=dict)  # descriptors copied into the summary (batches, logits, ...)
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    useful: int = 0
    grad_slots: int = 0
    nograd_slots: int = 0
    rows: int = 0
    peak_mem: int = 0  # CUDA bytes (weights included)
    max_rss: int = 0  # process RSS after its steps (CPU)
    loss: float = float("nan")

    @property
    def sampler(self) -> str:
        return self.info.get("batches", "bucketed")

    def run(self, rows: list[Row], device: torch.device) -> None:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        s = self.step(rows)
        if cuda:
            torch.cuda.synchronize()
            self.peak_mem = max(self.peak_mem, torch.cuda.max_memory_allocated())
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)
        self.loss, self.rows = s.loss, self.rows + len(rows)
        self.useful += sum(self.length(r) for r in rows)
        self.grad_slots += s.grad_slots
        self.nograd_slots += s.nograd_slots
        self.max_rss = max(self.max_rss, rss_bytes())

    def summary(self) -> dict:
        t, c = max(sum(self.times), 1e-9), max(sum(self.cpu_times), 1e-9)
        slots = self.grad_slots + self.nograd_slots
        flops = self.flops_grad * self.grad_slots + self.flops_nograd * self.nograd_slots
        return {
            "name": self.name,
            **self.info,
            "steps": len(self.times),
            "time_s": t,
            "s_per_step": t / max(1, len(self.times)),
            "step_s": self.times,
            "cpu_s": c,
            "rows": self.rows,
            "rows_per_s": self.rows / t,
            "rows_per_cpu_s": self.rows / c,
            "useful_tokens": self.useful,
            "useful_tok_per_s": self.useful / t,
            "useful_tok_per_cpu_s": self.useful / c,
            "grad_slots": self.grad_slots,
            "nograd_slots": self.nograd_slots,
            "useful_fraction": self.useful / max(1, slots),  # < 1: padding; > 1: prefixes not recomputed
            "executed_flops": flops,
            "executed_tflop_per_s": flops / t / 1e12,
            "peak_mem_gib": self.peak_mem / 2**30,
            "max_rss_gib": self.max_rss / 2**30,
            "last_loss": self.loss,
        }


# ---- steps ----------------------------------------------------------------------------------------------


def update(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # as tagray's trainer and HF Trainer's default do
    opt.step()
    opt.zero_grad(set_to_none=True)


def tagray_slots(model: TagLLM, batch: dict) -> tuple[int, int]:
    """``(grad, no-grad)`` slots of the forward that just ran: ``B x T`` for the full path; for the split,
    ``B x S_max`` suffix slots with grad plus ``computed_rows x P_max`` prefix slots without (cached rows
    cost none). ``P_max`` is the batch's longest prefix: exact when all or none of the rows hit the store."""
    B, T = batch["input_ids"].shape
    split = model.last_split
    if not split.get("prefix_tokens"):
        return B * T, 0
    cut = split_points(batch, model.tags.first_trainable_row)
    n = batch["attention_mask"].sum(1)
    return B * int((n - cut).max()), split.get("computed_rows", 0) * int(cut.max())


def tagray_step(
    model: TagLLM, pad_id: int, device: torch.device, *, logits: bool = False
) -> Callable[[list[Row]], Step]:
    """tagray's own step: collate -> TagLLM (regression on the function tag) -> AdamW on tags + head.

    ``logits``: a lever ablation that also applies the LM head to every position (a forward hook), kept
    alive until the update as in a Hugging Face forward's output.
    """
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3)
    names = model.heads.names if model.heads is not None else []
    lm_head = model.base.get_output_embeddings()

    def step(rows: list[Row]) -> Step:
        batch = to_device(collate([r.enc for r in rows], names, [[r.target] for r in rows], pad_id), device)
        keep: list[torch.Tensor] = []
        hook = (
            model.base.base_model.register_forward_hook(
                lambda _m, _i, out: keep.append(lm_head(out.last_hidden_state))
            )
            if logits
            else None
        )
        try:
            out = model(batch)
        finally:
            if hook is not None:
                hook.remove()
        out.loss.backward()
        update(opt, params)
        return Step(float(out.loss.detach()), *tagray_slots(model, batch))

    return step


def peft_batch(rows: list[Row], pad_id: int, with_label: bool, device: torch.device) -> dict:
    """Right-padded ids, mask and labels (label text only) as a PEFT user's collator builds them."""
    seqs = [r.text_ids + (r.label_ids if with_label else []) for r in rows]
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (r, s) in enumerate(zip(rows, seqs, strict=True)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        if with_label:
            labels[b, len(r.text_ids) : len(s)] = torch.tensor(r.label_ids)
    last = torch.tensor([len(r.text_ids) - 1 for r in rows])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "last": last}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def peft_model(base_model: nn.Module, adapters: dict[str, int], device: torch.device) -> nn.Module:
    """One PEFT model over the shared frozen base: a prompt-tuning adapter (name -> virtual tokens) per
    variant, so every variant trains its own prompt."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    cfgs = {
        n: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=k) for n, k in adapters.items()
    }
    first, *rest = cfgs
    pm = get_peft_model(base_model, cfgs[first], adapter_name=first)
    for n in rest:
        pm.add_adapter(n, cfgs[n])
    return pm.to(device)


def peft_head_step(
    pm: nn.Module, adapter: str, pad_id: int, device: torch.device, z: tuple[float, float], *, logits: bool
) -> Callable[[list[Row]], Step]:
    """PEFT prompt tuning (virtual tokens first) + a linear head on the last input token's final hidden
    state (``hidden_states[-1]``, after the final norm), MSE on targets standardised by ``z = (mean, std)``.

    ``logits=False`` passes ``logits_to_keep`` = no position, so the LM head runs on nothing (no
    vocabulary logits); ``True`` is the plain call, whose ``(B, T, V)`` logits are computed and unused.
    """
    nv = pm.peft_config[adapter].num_virtual_tokens
    d = pm.get_input_embeddings().weight.shape[1]
    head = nn.Linear(d, 1, device=device)
    params = list(pm.prompt_encoder[adapter].parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    keep = {} if logits else {"logits_to_keep": torch.zeros(0, dtype=torch.long, device=device)}

    def step(rows: list[Row]) -> Step:
        pm.set_adapter(adapter)
        b = peft_batch(rows, pad_id, False, device)
        out = pm(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True, **keep
        )
        h = out.hidden_states[-1][torch.arange(len(rows), device=device), nv + b["last"]]
        y = (torch.tensor([r.target for r in rows], device=device) - z[0]) / z[1]
        loss = F.mse_loss(head(h.float()).squeeze(-1), y)
        loss.backward()
        update(opt, params)
        return Step(float(loss.detach()), len(rows) * (nv + b["input_ids"].shape[1]))

    return step


def peft_lm_step(
    pm: nn.Module, adapter: str, pad_id: int, device: torch.device
) -> Callable[[list[Row]], Step]:
    """PEFT prompt tuning with an LM loss on the QED value written as text (the paper's "no head")."""
    nv = pm.peft_config[adapter].num_virtual_tokens
    params = list(pm.prompt_encoder[adapter].parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step(rows: list[Row]) -> Step:
        pm.set_adapter(adapter)
        b = peft_batch(rows, pad_id, True, device)
        out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        update(opt, params)
        return Step(float(out.loss.detach()), len(rows) * (nv + b["input_ids"].shape[1]))

    return step


# ---- the schedule -----------------------------------------------------------------------------------------


def epoch_batches(rows: Sequence[Row], batch_size: int, seed: int, epoch: int) -> dict[str, list[list[Row]]]:
    """One epoch of ``rows`` cut both ways (every variant of a kind sees the same batches): tagray's
    length-bucketed batches and random batches padded to their longest row."""
    out = {}
    for kind in ("bucketed", "random"):
        s = BucketBatchSampler(
            [r.useful for r in rows], batch_size, seed=seed, drop_last=True, bucketing=kind == "bucketed"
        )
        s.set_epoch(epoch)
        out[kind] = [[rows[i] for i in b] for b in s]
    return out


def run_epochs(
    first: Sequence[Variant], later: Sequence[Variant], pool: Sequence[Row], args, device: torch.device
) -> None:
    """``args.epochs`` passes over ``pool``; epoch 1 runs ``first``, the others ``later``. Within an epoch
    every variant runs the same batches, one step each per round, in an order rotated every round."""
    for e in range(args.epochs):
        variants = list(first if e == 0 else later)
        batches = epoch_batches(pool, args.batch_size, args.seed, e)
        for i in range(len(batches["bucketed"])):
            k = (e * 7 + i) % len(variants)
            for v in variants[k:] + variants[:k]:
                v.run(batches[v.sampler][i], device)


def warm_up(variants: Sequence[Variant], rows: list[Row], n: int, device: torch.device) -> None:
    """Untimed steps (allocator, oneDNN / cuBLAS plans, lazy inits); nothing is recorded."""
    for v in variants:
        for _ in range(n):
            v.step(rows)
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- the variants -----------------------------------------------------------------------------------------

MakeModel = Callable[[str, "PrefixStore | None"], TagLLM]  # (prefix mode, store) -> own tag and head tables
PREFIX_SUITE = {  # key in the "prefix_cache" result -> variant name
    "cache_reuse": "tagray cache reuse",
    "cache_fill": "tagray cache fill",
    "prefix_recompute": "tagray prefix recompute",
    "full_forward": "tagray full forward",
    "peft": "peft-head",
}


def prefix_variants(
    make: MakeModel, pm: nn.Module, store: PrefixStore, n_block: int, pad_id: int, z, device
) -> tuple[list[Variant], list[Variant]]:
    """The prefix-cache comparison, all on bucketed batches with no logits: ``(epoch-1 list, later list)``.

    ``tagray cache fill`` and ``tagray cache reuse`` are one model and store, timed in epoch 1 (every
    prefix computed and stored) and in epochs 2+ (every prefix read back); ``tagray prefix recompute``
    splits without a store; ``tagray full forward`` never splits; ``peft-head`` is PEFT prompt tuning
    (adapter ``head``) with a linear head. Credited FLOPs: 4N a slot with grad, 2N without (N = n_block).
    """
    tag_len = lambda r: r.useful  # noqa: E731
    nv = pm.peft_config["head"].num_virtual_tokens
    info = {"batches": "bucketed", "logits": False}
    cached = tagray_step(make("auto", store), pad_id, device)
    fill = Variant(PREFIX_SUITE["cache_fill"], cached, tag_len, 4 * n_block, 2 * n_block, dict(info))
    reuse = Variant(PREFIX_SUITE["cache_reuse"], cached, tag_len, 4 * n_block, 2 * n_block, dict(info))
    others = [
        Variant(
            PREFIX_SUITE["prefix_recompute"],
            tagray_step(make("auto", None), pad_id, device),
            tag_len,
            4 * n_block,
            2 * n_block,
            dict(info),
        ),
        Variant(
            PREFIX_SUITE["full_forward"],
            tagray_step(make("off", None), pad_id, device),
            tag_len,
            4 * n_block,
            info=dict(info),
        ),
        Variant(
            PREFIX_SUITE["peft"],
            peft_head_step(pm, "head", pad_id, device, z, logits=False),
            lambda r: nv + len(r.text_ids),
            4 * n_block,
            info=dict(info),
        ),
    ]
    return [fill, *others], [reuse, *others]


def lever_variants(
    make: MakeModel, pm: nn.Module, n_block: int, n_head: int, pad_id: int, z, device
) -> list[Variant]:
    """The earlier levers, full forward only: random batches (as PEFT users run them) and logits.

    ``peft-lm`` (LM loss on the value as text: logits in the loss, 4 x head FLOPs), ``peft-head +logits``
    (the plain PEFT call: logits computed and unused, 2 x head), ``tagray full (random)`` and ``tagray
    full +logits`` (a forward hook applies the LM head).
    """
    nv = pm.peft_config["lm"].num_virtual_tokens
    peft_len = lambda r: nv + len(r.text_ids)  # noqa: E731
    rnd, bkt = {"batches": "random"}, {"batches": "bucketed"}
    return [
        Variant(
            "peft-lm (random)",
            peft_lm_step(pm, "lm", pad_id, device),
            lambda r: peft_len(r) + len(r.label_ids),
            4 * (n_block + n_head),
            info={**rnd, "logits": True},
        ),
        Variant(
            "peft-head +logits (random)",
            peft_head_step(pm, "head_logits", pad_id, device, z, logits=True),
            peft_len,
            4 * n_block + 2 * n_head,
            info={**rnd, "logits": True},
        ),
        Variant(
            "tagray full (random)",
            tagray_step(make("off", None), pad_id, device),
            lambda r: r.useful,
            4 * n_block,
            info={**rnd, "logits": False},
        ),
        Variant(
            "tagray full +logits",
            tagray_step(make("off", None), pad_id, device, logits=True),
            lambda r: r.useful,
            4 * n_block + 2 * n_head,
            info={**bkt, "logits": True},
        ),
    ]


def param_counts(model: nn.Module) -> dict[str, int]:
    """``n_block``: transformer blocks + final norm (what every token runs through, the N of 4N);
    ``n_lm_head``: the output projection; ``n_total``: every parameter."""
    backbone = model.base_model
    n_block = sum(p.numel() for p in backbone.parameters()) - backbone.get_input_embeddings().weight.numel()
    n_total = sum(p.numel() for p in model.parameters())
    return {"n_block": n_block, "n_lm_head": model.get_output_embeddings().weight.numel(), "n_total": n_total}


def run_suite(
    make: MakeModel, base_model: nn.Module, store: PrefixStore, pad_id: int, z, warm, pool, args, device
) -> tuple[list[Variant], dict]:
    """Build the variants (``--levers`` adds :func:`lever_variants`), warm them up, empty the store and time
    ``args.epochs`` epochs over ``pool``. Returns the variants in report order and the bench's timing."""
    n = param_counts(base_model)
    nv = args.peft_virtual
    pm = peft_model(base_model, {"head": nv} | ({"lm": nv, "head_logits": nv} if args.levers else {}), device)
    first, later = prefix_variants(make, pm, store, n["n_block"], pad_id, z, device)
    levers = lever_variants(make, pm, n["n_block"], n["n_lm_head"], pad_id, z, device) if args.levers else []
    base_model.eval()  # no dropout anywhere: only the tags and heads train
    warm_up([*first, later[0], *levers], warm, args.warmup, device)
    store.clear()  # epoch 1 starts empty: the fill is timed, warm-up rows are not counted
    store.stats = dict.fromkeys(store.stats, 0)
    rss0, t0 = rss_bytes(), time.perf_counter()
    run_epochs([*first, *levers], [*later, *levers], pool, args, device)
    return [first[0], later[0], *first[1:], *levers], {
        "bench_s": time.perf_counter() - t0,
        "rss_before": rss0,
    }


# ---- the prefix cache -------------------------------------------------------------------------------------


def prefix_tokens(row: Row, first_trainable_row: int) -> int:
    """Tokens of a row's frozen prefix: everything before its first trainable tag or head read-out."""
    cut = [i for i, t in enumerate(row.enc.tag_rows) if t >= first_trainable_row]
    ends = cut[:1] + ([row.enc.head_pos] if row.enc.head_pos >= 0 else [])
    return min(ends) if ends else len(row.enc) - 1


def cache_summary(store: PrefixStore, config, pool: Sequence[Row], first_trainable_row: int) -> dict:
    """Measured store bytes per row next to the formula: layers x 2 x kv heads x head dim x element size
    x the mean prefix tokens of the timed rows."""
    per_tok = kv_bytes_per_token(config, store.dtype)
    mean_prefix = sum(prefix_tokens(r, first_trainable_row) for r in pool) / max(1, len(pool))
    return {
        "rows": len(store),
        "dtype": str(store.dtype).replace("torch.", ""),
        "bytes_per_row_measured": store.bytes_per_row(),
        "bytes_per_token": per_tok,
        "mean_prefix_tokens": mean_prefix,
        "bytes_per_row_formula": per_tok * mean_prefix,
        "formula": "layers x 2 (k, v) x kv_heads x head_dim x dtype bytes x prefix tokens",
        "formula_terms": {
            "layers": config.num_hidden_layers,
            "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            "dtype_bytes": torch.empty(0, dtype=store.dtype).element_size(),
        },
        "ram_bytes": store.ram_bytes,
        "stats": dict(store.stats),
    }


def prefix_result(by: dict[str, dict], cache: dict) -> dict:
    """The ``prefix_cache`` object: rows/s per variant and each tagray variant's speed-up over PEFT (and
    over tagray's own full forward) on the same batches."""
    rps = {k: by[n]["rows_per_s"] for k, n in PREFIX_SUITE.items() if n in by}
    cps = {k: by[n]["rows_per_cpu_s"] for k, n in PREFIX_SUITE.items() if n in by}
    tagray = [k for k in rps if k != "peft"]
    return {
        "variants": dict(PREFIX_SUITE),
        "rows_per_s": rps,
        "speedup_vs_peft_same_batches": {k: rps[k] / rps["peft"] for k in tagray},
        "speedup_vs_full_forward": {k: rps[k] / rps["full_forward"] for k in tagray},
        # the same on process CPU time: what a shared machine's load does not inflate (1 thread: = wall)
        "rows_per_cpu_s": cps,
        "speedup_vs_peft_same_batches_cpu": {k: cps[k] / cps["peft"] for k in tagray},
        "targets": {"speedup_vs_peft": 5.0, "stretch_with_reuse": 10.0},
        "cache": cache,
    }


# ---- machine, output ---------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def machine(device: torch.device) -> dict:
    import peft
    import transformers

    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def table(rows: Sequence[dict], cols: Sequence[tuple[str, str, str]], markdown: bool = False) -> str:
    """Rows as a fixed-width (or Markdown) table; ``cols`` are ``(header, key, format spec)``."""
    cells = [[h for h, _, _ in cols]] + [[format(r[k], f) for _, k, f in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines[:1] + ["|" + "---|" * len(cols)] + lines[1:])
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    fmt = lambda c: "  ".join(x.ljust(w[0]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(c))  # noqa: E731
    return "\n".join([fmt(cells[0]), "-" * (sum(w) + 2 * len(w) - 2)] + [fmt(c) for c in cells[1:]])


# summary key, header, format spec
# fmt: off
_COLUMNS = (("name", "variant", ""), ("batches", "batches", ""), ("steps", "steps", "d"),
            ("s_per_step", "s/step", ".3f"), ("rows_per_s", "rows/s", ",.2f"),
            ("rows_per_cpu_s", "rows/CPU-s", ",.2f"),
            ("useful_tok_per_s", "useful tok/s", ",.0f"), ("useful_fraction", "useful / slots", ".2f"),
            ("executed_tflop_per_s", "TFLOP/s executed", ".3f"), ("max_rss_gib", "max RSS GiB", ".2f"),
            ("mfu_4n", "MFU 4N", ".2f"), ("mfu_hw", "MFU hw", ".2f"), ("peak_mem_gib", "peak GiB", ".1f"))
# fmt: on
COLUMNS = {k: (header, spec) for k, header, spec in _COLUMNS}


def columns(*keys: str) -> list[tuple[str, str, str]]:
    return [(COLUMNS[k][0], k, COLUMNS[k][1]) for k in keys]


def prefix_report(pc: dict, markdown: bool = False) -> str:
    """The speed-up table of a ``prefix_cache`` result and a line on the cache's bytes per row."""
    cpu = pc.get("speedup_vs_peft_same_batches_cpu", {})
    sp = [
        {
            "variant": pc["variants"][k],
            "x": x,
            "xc": cpu.get(k, float("nan")),
            "xf": pc["speedup_vs_full_forward"][k],
        }
        for k, x in pc["speedup_vs_peft_same_batches"].items()
    ]
    cols = [("tagray variant", "variant", ""), ("vs peft-head", "x", ".2f"),
            ("vs peft-head, CPU time", "xc", ".2f"), ("vs full forward", "xf", ".2f")]  # fmt: skip
    c, t = pc["cache"], pc["cache"]["formula_terms"]
    return (
        table(sp, cols, markdown)
        + f"\n\ncache: {c['rows']} rows, {c['bytes_per_row_measured'] / 2**20:.2f} MiB/row measured "
        f"({c['dtype']}); formula {t['layers']} layers x 2 x {t['kv_heads']} kv heads x {t['head_dim']} x "
        f"{t['dtype_bytes']} B = {c['bytes_per_token']:,} B/token x {c['mean_prefix_tokens']:.1f} prefix "
        f"tokens = {c['bytes_per_row_formula'] / 2**20:.2f} MiB/row; store hits {c['stats']['hits']}, "
        f"misses {c['stats']['misses']}" + _verdict(pc)
    )


def _verdict(pc: dict) -> str:
    """Cache reuse against the issue's targets (5x PEFT on the same batches, stretch 10x), from the JSON."""
    x, tg = pc["speedup_vs_peft_same_batches"].get("cache_reuse"), pc.get("targets")
    if x is None or not tg:
        return ""
    met = {k: "met" if x >= v else "missed" for k, v in tg.items()}
    return (
        f"\n\ncache reuse vs peft-head {x:.2f}x: target {tg['speedup_vs_peft']:g}x **{met['speedup_vs_peft']}**, "
        f"stretch {tg['stretch_with_reuse']:g}x **{met['stretch_with_reuse']}**"
    )


def render_into(doc: Path, marker: str, text: str) -> None:
    """Replace what stands between ``<!-- begin:marker -->`` and ``<!-- end:marker -->`` in ``doc``."""
    src = doc.read_text()
    pat = re.compile(rf"(<!-- begin:{re.escape(marker)} -->\n).*?(<!-- end:{re.escape(marker)} -->)", re.S)
    if not pat.search(src):
        raise SystemExit(f"{doc}: no <!-- begin:{marker} --> ... <!-- end:{marker} --> block")
    doc.write_text(pat.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), src))


def render_json(out: Path, doc: Path, marker: str, report: Callable[..., str]) -> int:
    """``--render``: no run; ``report(res, markdown=True)`` of the JSON at ``out`` into ``doc``."""
    render_into(doc, marker, report(json.loads(out.read_text()), markdown=True))
    print(f"rendered {out} into {doc}")
    return 0


def quiet() -> None:
    """peft 0.21 calls transformers' deprecated ``is_gradient_checkpointing``: noise, not a finding."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def finish(res: dict, out: Path, report: Callable[[dict], str]) -> int:
    """Write the JSON, print its report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(report(res))
    print(f"wrote {out}")
    return 0
