"""tagray vs Hugging Face PEFT prompt tuning: training throughput of the QED function tag (CPU).

Both sides train the same number of prompt vectors (tagray: ``<SMILES>`` + ``<QED>``, p each; PEFT:
``2p`` virtual tokens) on the same frozen SmolLM2-135M, with the same batch size and exactly the same
rows, in one process. Variants run step by step in a rotating order, so load from other processes on a
shared machine hits all of them alike.

Variants (``bucketed``: tagray's :class:`BucketBatchSampler`; ``random``: the same rows in random
batches padded to their longest row, as PEFT users run them):

- ``tagray``: bucketed, regression head on the last hidden state, no vocabulary logits.
- ``peft-lm``: random, LM loss on the QED value written as text (the paper's "no regression head").
- ``peft-head``: random, linear head on ``hidden_states[-1]`` of ``model(..., output_hidden_states=True)``;
  that forward still computes the full-vocabulary logits.
- ablations: ``tagray`` with bucketing off and/or LM-head logits computed (a forward hook).

Useful tokens are the task input (template + SMILES + tag/virtual tokens), the same for every variant;
padding and label-text tokens are overhead. Three views of each ratio: measured on the timed rows (wall
clock and process CPU time), projected to a full epoch (measured time per processed token x the epoch's
padding), and a FLOP model (matmul FLOPs per useful token over an epoch, no measurement).

Run: ``python bench/train_vs_peft.py`` (defaults: real SmolLM2-135M, batch 16, 12 timed steps per variant).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tagray.stage import StageJob, build_setup, encode_split
from torch import nn

from tagray.config import parse_pipeline
from tagray.core.base import Base, fingerprint, freeze, load_base, load_tokenizer, resolve_base
from tagray.core.data import BucketBatchSampler, collate
from tagray.core.model import TagLLM
from tagray.core.template import Encoded

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One QED training example in both encodings."""

    enc: Encoded  # tagray: token ids with tag slots
    text_ids: list[int]  # PEFT: the same tokens without the tag positions (virtual tokens are prepended)
    label_ids: list[int]  # PEFT LM loss: the QED value as text, then EOS
    target: float

    @property
    def useful(self) -> int:
        return len(self.enc)


@dataclass
class Variant:
    """One way to run a training step, and what it measured."""

    name: str
    sampler: str  # "bucketed" | "random"
    objective: str  # "regression" | "lm"
    logits: bool  # computes (B, T, V) vocabulary logits
    flops_per_token: float  # matmul FLOPs per processed token (forward + input-gradient backward)
    length: Callable[[Row], int]  # tokens the model processes for a row (before padding)
    step: Callable[[list[Row]], float]  # rows -> loss; one optimizer update
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds
    useful: int = 0
    processed: int = 0
    rows: int = 0
    loss: float = float("nan")

    def processed_tokens(self, rows: Sequence[Row]) -> int:
        return len(rows) * max(self.length(r) for r in rows)

    def run(self, rows: list[Row]) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        self.loss = self.step(rows)
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)
        self.useful += sum(r.useful for r in rows)
        self.processed += self.processed_tokens(rows)
        self.rows += len(rows)

    def summary(self, epoch_useful_fraction: float) -> dict:
        t, c = max(sum(self.times), 1e-9), max(sum(self.cpu_times), 1e-9)
        return {
            "name": self.name,
            "batches": self.sampler,
            "objective": self.objective,
            "logits": self.logits,
            "steps": len(self.times),
            "time_s": t,
            "s_per_step": t / max(1, len(self.times)),
            "step_s": self.times,
            "cpu_s": c,
            "rows": self.rows,
            "useful_tokens": self.useful,
            "processed_tokens": self.processed,
            "useful_fraction": self.useful / max(1, self.processed),
            "useful_tok_per_s": self.useful / t,
            "useful_tok_per_cpu_s": self.useful / c,
            "processed_tok_per_s": self.processed / t,
            "epoch_useful_fraction": epoch_useful_fraction,
            # what a whole epoch would run at: measured speed per processed token x the epoch's padding
            "epoch_useful_tok_per_s": self.processed / t * epoch_useful_fraction,
            "flops_per_token": self.flops_per_token,
            "flops_per_useful_token_epoch": self.flops_per_token / epoch_useful_fraction,
            "last_loss": self.loss,
        }


# ---- model and data ------------------------------------------------------------------------------------


def tiny_base() -> Base:
    """A 2-layer random Llama with SmolLM2's tokenizer (``--smoke``: code paths only, seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(resolve_base("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = freeze(LlamaForCausalLM(cfg))
    return Base("tiny-llama", model, tok, fingerprint(model))


def load_rows(args: argparse.Namespace) -> tuple[Base, TagLLM, list[Row]]:
    """Base, tagray's model for the QED stage (tags + head, built by tagray itself) and the encoded rows."""
    base = tiny_base() if args.smoke else load_base("smollm2-135m")
    n_train = (args.steps + 1) * args.batch_size + 16 if args.smoke else 3000
    # paper head init and few probe rows: setup cost is not what this benchmark measures
    train = {
        "tag_length": args.tag_length,
        "batch_size": args.batch_size,
        "head_init": "paper",
        "probe_rows": 16,
        "seed": args.seed,
    }
    task = {"task": "qed", "limits": {"train": n_train, "valid": 8, "test": 8}}
    cfg = parse_pipeline({"name": "bench", "stages": [{"name": "qed", "tasks": [task], "train": train}]})
    setup = build_setup(StageJob(cfg.stages[0]), base)
    tok = base.tokenizer
    rows = []
    for e in encode_split(setup, setup.tasks, "train"):
        text = [i for i, t in zip(e.enc.ids, e.enc.tag_rows, strict=True) if t < 0]
        label = tok.encode(f" {e.target[0]:.3f}", add_special_tokens=False) + [tok.eos_token_id]
        rows.append(Row(e.enc, text, label, float(e.target[0])))
    return base, setup.model, rows


def make_batches(
    rows: Sequence[Row], args: argparse.Namespace
) -> tuple[list[int], dict[str, list[list[int]]]]:
    """Warm-up rows and the timed pool cut two ways: random batches and tagray's bucketed batches.

    Both cover exactly the same rows, so every variant does the same useful work.
    """
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    B = args.batch_size
    warm, pool = order[:B], order[B : B + args.steps * B]
    if len(pool) < args.steps * B:
        raise SystemExit(f"only {len(rows)} rows: lower --steps or --batch-size")
    sampler = BucketBatchSampler([rows[i].useful for i in pool], B, seed=args.seed, drop_last=True)
    return warm, {
        "random": [pool[s : s + B] for s in range(0, len(pool), B)],
        "bucketed": [[pool[j] for j in b] for b in sampler],
    }


def epoch_batches(rows: Sequence[Row], args: argparse.Namespace) -> dict[str, list[list[int]]]:
    """One full epoch of the training split per sampler, as a real run would see it."""
    lengths = [r.useful for r in rows]
    return {
        k: list(BucketBatchSampler(lengths, args.batch_size, seed=args.seed, bucketing=k == "bucketed"))
        for k in ("random", "bucketed")
    }


# ---- steps ---------------------------------------------------------------------------------------------


def _update(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # as tagray's trainer and HF Trainer's default do
    opt.step()
    opt.zero_grad(set_to_none=True)


def tagray_variant(
    name: str, model: TagLLM, pad_id: int, flops: dict[str, int], *, bucketed: bool, logits: bool
) -> Variant:
    """tagray's own step: collate -> TagLLM (regression on the last hidden state) -> AdamW on tags + head."""
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3)
    names = model.heads.names if model.heads is not None else []
    lm_head = model.base.get_output_embeddings()

    def step(rows: list[Row]) -> float:
        batch = collate([r.enc for r in rows], names, [[r.target] for r in rows], pad_id=pad_id)
        keep: list[torch.Tensor] = []  # ablation: logits live until the update, as in a HF forward's output
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
        _update(opt, params)
        return float(out.loss.detach())

    fpt = 4 * flops["block"] + (2 * flops["head"] if logits else 0)  # unused logits: forward only
    return Variant(
        name, "bucketed" if bucketed else "random", "regression", logits, fpt, lambda r: r.useful, step
    )


def peft_batch(rows: list[Row], pad_id: int, with_label: bool) -> dict[str, torch.Tensor]:
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
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "last": last}


def peft_variants(
    base_model: nn.Module, n_virtual: int, pad_id: int, mean: float, std: float, flops: dict[str, int]
) -> list[Variant]:
    """PEFT prompt tuning (``2p`` virtual tokens) with an LM loss, and with a linear regression head."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual)
    pm = get_peft_model(base_model, cfg, adapter_name="lm")
    pm.add_adapter("head", copy.deepcopy(cfg))  # a second prompt, so the two variants train separately
    head = nn.Linear(base_model.get_input_embeddings().weight.shape[1], 1)
    params = {
        n: list(pm.prompt_encoder[n].parameters()) + (list(head.parameters()) if n == "head" else [])
        for n in ("lm", "head")
    }
    opts = {n: torch.optim.AdamW(ps, lr=1e-3) for n, ps in params.items()}

    def lm_step(rows: list[Row]) -> float:
        pm.set_adapter("lm")
        b = peft_batch(rows, pad_id, with_label=True)
        out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        _update(opts["lm"], params["lm"])
        return float(out.loss.detach())

    def head_step(rows: list[Row]) -> float:
        pm.set_adapter("head")
        b = peft_batch(rows, pad_id, with_label=False)
        out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        h = out.hidden_states[-1][torch.arange(len(rows)), n_virtual + b["last"]]  # last input token
        z = (torch.tensor([r.target for r in rows]) - mean) / std
        loss = F.mse_loss(head(h.float()).squeeze(-1), z)
        loss.backward()
        _update(opts["head"], params["head"])
        return float(loss.detach())

    blk, hd = flops["block"], flops["head"]
    return [
        Variant(
            "peft-lm",
            "random",
            "lm",
            True,
            4 * (blk + hd),
            lambda r: n_virtual + len(r.text_ids) + len(r.label_ids),
            lm_step,
        ),
        Variant(
            "peft-head",
            "random",
            "regression",
            True,
            4 * blk + 2 * hd,
            lambda r: n_virtual + len(r.text_ids),
            head_step,
        ),
    ]


# ---- the benchmark --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load0 = os.getloadavg()
    t_setup = time.perf_counter()
    base, model, rows = load_rows(args)
    pad = base.tokenizer.pad_token_id
    warm, batches = make_batches(rows, args)
    y = torch.tensor([r.target for r in rows])
    mean, std = float(y.mean()), float(y.std().clamp_min(1e-6))
    backbone = model.base.base_model
    flops = {
        "block": sum(p.numel() for p in backbone.parameters())
        - backbone.get_input_embeddings().weight.numel(),
        "head": model.base.get_output_embeddings().weight.numel(),
    }

    def fresh() -> TagLLM:  # own tag and head tables per variant; the frozen base is shared
        return TagLLM(model.base, copy.deepcopy(model.tags), copy.deepcopy(model.heads)).train()

    n_virtual = sum(s.rows for s in model.tags.slots.values())
    variants = [
        tagray_variant("tagray", fresh(), pad, flops, bucketed=True, logits=False),
        *peft_variants(model.base, n_virtual, pad, mean, std, flops),
    ]
    if args.ablation in ("levers", "full"):
        variants += [
            tagray_variant("tagray -bucketing", fresh(), pad, flops, bucketed=False, logits=False),
            tagray_variant("tagray +logits", fresh(), pad, flops, bucketed=True, logits=True),
        ]
    if args.ablation == "full":
        variants.append(
            tagray_variant("tagray -bucketing +logits", fresh(), pad, flops, bucketed=False, logits=True)
        )
    model.base.eval()  # no dropout anywhere: only the tags and heads train
    t_setup = time.perf_counter() - t_setup

    for v in variants:  # warm-up: allocator, oneDNN primitives, lazy inits
        for _ in range(args.warmup):
            v.step([rows[i] for i in warm])
    t_bench = time.perf_counter()
    for i in range(args.steps):
        k = i % len(variants)
        for v in variants[k:] + variants[:k]:  # rotating order: no variant always runs first
            v.run([rows[j] for j in batches[v.sampler][i]])
    t_bench = time.perf_counter() - t_bench

    epoch = epoch_batches(rows, args)
    res = []
    for v in variants:
        ep = [[rows[i] for i in b] for b in epoch[v.sampler]]
        frac = sum(r.useful for b in ep for r in b) / sum(v.processed_tokens(b) for b in ep)
        res.append(v.summary(frac))
    import peft
    import transformers

    return {
        "benchmark": "train_vs_peft",
        "config": {
            "base": base.name,
            "params": sum(p.numel() for p in base.model.parameters()),
            "flops_params": flops,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "tag_length": args.tag_length,
            "virtual_tokens": n_virtual,
            "threads": args.threads,
            "seed": args.seed,
            "smoke": args.smoke,
            "train_rows": len(rows),
            "ablation": args.ablation,
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "seconds": {"setup": t_setup, "bench": t_bench},
        "variants": res,
        "ratios": {
            "measured_wall": speedups(res, "useful_tok_per_s"),
            "measured_cpu": speedups(res, "useful_tok_per_cpu_s"),
            "epoch_projected": speedups(res, "epoch_useful_tok_per_s"),
            "flop_model": speedups(res, "flops_per_useful_token_epoch", invert=True),
        },
    }


PAIRS = {
    "tagray / peft-lm": ("tagray", "peft-lm"),
    "tagray / peft-head": ("tagray", "peft-head"),
    "bucketing: tagray / tagray -bucketing": ("tagray", "tagray -bucketing"),
    "no logits: tagray / tagray +logits": ("tagray", "tagray +logits"),
    "both: tagray / tagray -bucketing +logits": ("tagray", "tagray -bucketing +logits"),
    "splice vs PEFT: tagray -bucketing +logits / peft-head": ("tagray -bucketing +logits", "peft-head"),
}


def speedups(res: list[dict], key: str, invert: bool = False) -> dict[str, float]:
    """Speed-up ratios on ``key`` (a throughput; ``invert`` for a cost) between the variants that ran."""
    x = {r["name"]: r[key] for r in res}
    return {k: (x[b] / x[a] if invert else x[a] / x[b]) for k, (a, b) in PAIRS.items() if a in x and b in x}


def table(res: dict) -> str:
    """A fixed-width table of the variants and the ratios."""
    head = (
        f"{'variant':<26}{'batches':>9}{'logits':>7}{'s/step':>8}{'tok/s':>8}{'tok/CPU-s':>10}"
        f"{'useful':>7}{'epoch useful':>13}{'epoch tok/s':>12}{'GFLOP/useful tok':>17}"
    )
    lines = [head, "-" * len(head)]
    for v in res["variants"]:
        lines.append(
            f"{v['name']:<26}{v['batches']:>9}{'yes' if v['logits'] else 'no':>7}{v['s_per_step']:>8.2f}"
            f"{v['useful_tok_per_s']:>8.1f}{v['useful_tok_per_cpu_s']:>10.1f}{v['useful_fraction']:>7.2f}"
            f"{v['epoch_useful_fraction']:>13.2f}{v['epoch_useful_tok_per_s']:>12.1f}"
            f"{v['flops_per_useful_token_epoch'] / 1e9:>17.3f}"
        )
    r = res["ratios"]
    lines += ["", f"{'speed-up':<55}{'wall':>8}{'CPU':>8}{'epoch':>8}{'FLOPs':>8}"]
    for k, w in r["measured_wall"].items():
        lines.append(
            f"{k:<55}{w:>7.2f}x{r['measured_cpu'][k]:>7.2f}x{r['epoch_projected'][k]:>7.2f}x"
            f"{r['flop_model'][k]:>7.2f}x"
        )
    m, c = res["machine"], res["config"]
    lines.append(
        f"\n{c['base']}, batch {c['batch_size']}, {c['virtual_tokens']} tag/virtual tokens, "
        f"{c['steps']} timed steps per variant over {c['steps'] * c['batch_size']} rows; epoch = "
        f"{c['train_rows']} rows"
    )
    lines.append(
        f"{m['cpu_count']} CPUs, {c['threads']} threads, load average {m['loadavg_start'][0]:.1f} -> "
        f"{m['loadavg_end'][0]:.1f}; bench {res['seconds']['bench']:.0f} s"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tag-length", type=int, default=10, help="p per tag; PEFT gets 2p virtual tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ablation",
        choices=("none", "levers", "full"),
        default="levers",
        help="none: tagray, peft-lm, peft-head; levers: + bucketing off, + logits on; full: + both",
    )
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, 2 steps: code paths only")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/train_vs_peft.json)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size = min(args.steps, 2), min(args.batch_size, 4)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # peft 0.21 calls transformers' deprecated ``is_gradient_checkpointing``: noise, not a finding
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    res = run(args)
    out = args.out or RESULTS / ("train_vs_peft.smoke.json" if args.smoke else "train_vs_peft.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
