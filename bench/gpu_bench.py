"""GPU benchmark: tagray's tag-training step vs PEFT prompt tuning on a Llama-3-8B-shaped model.

Self-contained for a bare GPU machine: needs torch, transformers and peft, plus tagray's pure-torch core
(``tagray/core``, imported from this checkout; it has no Ray, rdkit or datasets imports). Random weights
(no downloads), frozen; only the 2p tag vectors (+ a linear head) train, with AdamW.

Row lengths follow the real QED inputs: SmolLM2-tokenised NCI SMILES in the paper's template (see
``TEXT_LENGTHS``), plus 2p tag or virtual tokens. Variants (same rows, same batch size, alternated step by
step in one process): tagray (length-bucketed batches, regression on the last hidden state, no logits),
its ablations, PEFT prompt tuning with an LM loss on the label text, PEFT + a linear head on
``hidden_states[-1]`` (whose forward still computes logits), and batched serving forwards of both.

MFU counts matmul FLOPs actually done per processed token: training 4N (forward 2N + input-gradient
backward 2N, no weight gradients), forward-only 2N, N = transformer-block parameters plus the LM head
when logits are computed (only 2N for the head when its logits are not in the loss). Attention-score
FLOPs are left out (under 1% at ~100 tokens).

GPU:  python bench/gpu_bench.py                      (Llama-3-8B shape, bf16)
CPU:  python bench/gpu_bench.py --device cpu --layers 2 --hidden 256   (end-to-end check of the script)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tagray's core from this checkout: no install needed on the GPU box

from tagray.core.data import BucketBatchSampler, collate  # noqa: E402
from tagray.core.heads import HeadBank, HeadSpec, head_init  # noqa: E402
from tagray.core.model import TagLLM  # noqa: E402
from tagray.core.tags import Slot, TagBank, mean_embedding_init  # noqa: E402
from tagray.core.template import IGNORE, Encoded  # noqa: E402

# Percentile -> token length of the QED input text without tags ("# # Input: The SMILES of the molecule is
# {smiles}. # # Output: The quantitative estimate of druglikeness is"), measured on all 4,892 NCI SMILES
# that RDKit ships, tokenised by SmolLM2 (mean 55, median 52, p95 80, max 287; +20 tag tokens: mean 75).
# fmt: off
TEXT_LENGTHS = ((0, 30), (5, 37), (10, 40), (15, 42), (20, 44), (25, 45), (30, 47), (35, 48), (40, 50),
                (45, 51), (50, 52), (55, 54), (60, 56), (65, 57), (70, 59), (75, 61), (80, 65), (85, 68),
                (90, 73), (95, 80), (97.5, 93), (99, 106), (99.5, 116), (99.9, 150), (100, 287))
# fmt: on
PREFIX, SUFFIX = 13, 12  # template tokens before <SMILES> and between the SMILES and <QED>
LABEL_TOKENS = 7  # " 0.535" + EOS in SmolLM2's tokenizer: the PEFT LM-loss target
H100_BF16_PEAK = 989.0  # TFLOP/s, dense; a bf16 8192^3 matmul measured 743 on the same card
EPOCH_ROWS = 4000


def sample_lengths(n: int, rng: random.Random) -> list[int]:
    """Text lengths drawn from the measured distribution (inverse CDF, linear between percentiles)."""
    out = []
    for _ in range(n):
        u = rng.random() * 100
        for (p0, v0), (p1, v1) in zip(TEXT_LENGTHS, TEXT_LENGTHS[1:], strict=False):
            if u <= p1:
                out.append(round(v0 + (v1 - v0) * (u - p0) / (p1 - p0)))
                break
    return out


@dataclass
class Row:
    enc: Encoded  # tagray: ids with 2 tags of p slots each, head at the last position
    text_ids: list[int]  # PEFT: the same ids without tag slots (2p virtual tokens are prepended)
    label_ids: list[int]
    target: float

    @property
    def useful(self) -> int:
        return len(self.enc)


def make_row(text_len: int, vocab: int, slots: dict[str, Slot], rng: random.Random) -> Row:
    """A QED-shaped row: prefix, <SMILES>, SMILES tokens, suffix, <QED>; random token ids."""
    smiles = max(1, text_len - PREFIX - SUFFIX)
    text = [rng.randrange(vocab) for _ in range(PREFIX + smiles + SUFFIX)]
    s, q = slots["<SMILES>"], slots["<QED>"]
    ids = text[:PREFIX] + [0] * s.rows + text[PREFIX:] + [0] * q.rows
    tags = [-1] * PREFIX + list(range(s.start, s.start + s.rows)) + [-1] * (smiles + SUFFIX)
    tags += list(range(q.start, q.start + q.rows))
    n = len(ids)
    enc = Encoded(ids, tags, [IGNORE] * n, [0] * n, head_pos=n - 1, head="<QED>")
    return Row(enc, text, [rng.randrange(vocab) for _ in range(LABEL_TOKENS)], rng.random())


@dataclass
class Variant:
    name: str
    kind: str  # "train" | "serve"
    sampler: str  # "bucketed" | "random"
    flops_per_token: float  # matmul FLOPs per processed token
    length: Callable[[Row], int]  # tokens the model processes for a row (before padding)
    step: Callable[[list[Row]], None]
    times: list[float] = field(default_factory=list)
    useful: int = 0
    processed: int = 0
    rows: int = 0
    peak_mem: int = 0

    def processed_tokens(self, rows: Sequence[Row]) -> int:
        return len(rows) * max(self.length(r) for r in rows)

    def summary(self, epoch_useful_fraction: float, peak_tflops: float | None) -> dict:
        t = max(sum(self.times), 1e-9)
        r = {
            "name": self.name,
            "kind": self.kind,
            "batches": self.sampler,
            "steps": len(self.times),
            "time_s": t,
            "s_per_step": t / max(1, len(self.times)),
            "step_s": self.times,
            "rows_per_s": self.rows / t,
            "useful_tokens": self.useful,
            "processed_tokens": self.processed,
            "useful_fraction": self.useful / max(1, self.processed),
            "useful_tok_per_s": self.useful / t,
            "processed_tok_per_s": self.processed / t,
            "epoch_useful_fraction": epoch_useful_fraction,
            "epoch_useful_tok_per_s": self.processed / t * epoch_useful_fraction,
            "flops_per_token": self.flops_per_token,
            "peak_mem_gib": self.peak_mem / 2**30,
        }
        if peak_tflops:
            # hardware MFU on every processed token (padding included); "useful" counts input tokens only
            r["mfu"] = self.processed / t * self.flops_per_token / (peak_tflops * 1e12)
            r["mfu_useful"] = self.useful / t * self.flops_per_token / (peak_tflops * 1e12)
        return r


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A Llama-shaped causal LM with random weights, frozen."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialise on the device: an 8B fp32 copy on the host would need 32 GB
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.to(device)  # a no-op unless from_config ignored the device context
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def tag_slots(p: int) -> dict[str, Slot]:
    """The tag table layout TagLLM uses: <SMILES> rows 0..p-1, <QED> rows p..2p-1 (both trainable)."""
    z = torch.zeros(p, 1)
    return dict(TagBank({"<SMILES>": z, "<QED>": z}, trainable={"<SMILES>", "<QED>"}).slots)


def _update(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def peft_batch(rows: list[Row], with_label: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids, mask and labels (label text only) as a PEFT user's collator builds them."""
    seqs = [r.text_ids + (r.label_ids if with_label else []) for r in rows]
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros((B, T), dtype=torch.long)
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


def make_variants(
    model: nn.Module, args: argparse.Namespace, device: torch.device
) -> tuple[list[Variant], dict]:
    """tagray and PEFT training steps plus serving forwards, sharing one frozen base."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    emb = model.get_input_embeddings().weight
    d, p, nv = emb.shape[1], args.tag_length, 2 * args.tag_length
    blk = sum(x.numel() for x in model.model.parameters()) - emb.numel()  # blocks + final norm
    hd = model.get_output_embeddings().weight.numel()

    def tagray_model() -> TagLLM:
        tags = TagBank(
            {"<SMILES>": mean_embedding_init(emb, p), "<QED>": mean_embedding_init(emb, p)},
            trainable={"<SMILES>", "<QED>"},
        )
        heads = HeadBank(
            {"<QED>": head_init(emb, 1)},
            {"<QED>": HeadSpec("regression", 1, (0.5,), (0.29,))},
            d,
            trainable={"<QED>"},
        )
        return TagLLM(model, tags, heads).to(device).train()

    def tagray_train(name: str, bucketed: bool, logits: bool) -> Variant:
        m = tagray_model()
        params = m.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=1e-3)
        lm_head = model.get_output_embeddings()

        def step(rows: list[Row]) -> None:
            batch = collate([r.enc for r in rows], ["<QED>"], [[r.target] for r in rows])
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            keep: list[torch.Tensor] = []  # ablation: logits alive until the update, as in a HF output
            hook = (
                model.model.register_forward_hook(lambda _m, _i, o: keep.append(lm_head(o.last_hidden_state)))
                if logits
                else None
            )
            try:
                out = m(batch)
            finally:
                if hook is not None:
                    hook.remove()
            out.loss.backward()
            _update(opt, params)

        fpt = 4 * blk + (2 * hd if logits else 0)  # unused logits cost a forward only
        return Variant(name, "train", "bucketed" if bucketed else "random", fpt, lambda r: r.useful, step)

    server = tagray_model().eval()

    @torch.no_grad()
    def tagray_serve(rows: list[Row]) -> None:
        batch = collate([r.enc for r in rows], ["<QED>"])
        server({k: v.to(device, non_blocking=True) for k, v in batch.items()}).preds.cpu()  # answers leave

    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=nv)
    pm = get_peft_model(model, cfg, adapter_name="lm")
    pm.add_adapter("head", copy.deepcopy(cfg))  # a second prompt, so the two variants train separately
    pm.to(device)
    head = nn.Linear(d, 1, device=device)
    params = {
        n: list(pm.prompt_encoder[n].parameters()) + (list(head.parameters()) if n == "head" else [])
        for n in ("lm", "head")
    }
    opts = {n: torch.optim.AdamW(ps, lr=1e-3) for n, ps in params.items()}

    def peft_lm(rows: list[Row]) -> None:
        pm.set_adapter("lm")
        b = peft_batch(rows, True, device)
        pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        _update(opts["lm"], params["lm"])

    def peft_head_forward(rows: list[Row]) -> torch.Tensor:
        pm.set_adapter("head")
        b = peft_batch(rows, False, device)
        out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        h = out.hidden_states[-1][torch.arange(len(rows), device=device), nv + b["last"]]  # last input token
        return head(h.float()).squeeze(-1)

    def peft_head(rows: list[Row]) -> None:
        z = (torch.tensor([r.target for r in rows], device=device) - 0.5) / 0.29
        F.mse_loss(peft_head_forward(rows), z).backward()
        _update(opts["head"], params["head"])

    @torch.no_grad()
    def peft_serve(rows: list[Row]) -> None:
        peft_head_forward(rows).cpu()

    def peft_len(r: Row) -> int:
        return nv + len(r.text_ids)

    variants = [
        tagray_train("tagray", True, False),
        Variant(
            "peft-lm", "train", "random", 4 * (blk + hd), lambda r: peft_len(r) + len(r.label_ids), peft_lm
        ),
        Variant("peft-head", "train", "random", 4 * blk + 2 * hd, peft_len, peft_head),
    ]
    if args.ablation in ("levers", "full"):
        variants += [
            tagray_train("tagray -bucketing", False, False),
            tagray_train("tagray +logits", True, True),
        ]
    if args.ablation == "full":
        variants.append(tagray_train("tagray -bucketing +logits", False, True))
    # serving: the same length-sorted batches for both, so the difference is the forward itself
    variants += [
        Variant("serve tagray", "serve", "bucketed", 2 * blk, lambda r: r.useful, tagray_serve),
        Variant("serve peft-head", "serve", "bucketed", 2 * (blk + hd), peft_len, peft_serve),
    ]
    n_total = sum(x.numel() for x in model.parameters())
    return variants, {"n_block": blk, "n_lm_head": hd, "n_embed": emb.numel(), "n_total": n_total}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model(args, device, dtype)
    variants, params = make_variants(model, args, device)
    weights_mem = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t_setup = time.perf_counter() - t0

    rng = random.Random(args.seed)
    slots = tag_slots(args.tag_length)

    def rows_of(n: int) -> list[Row]:
        return [make_row(x, args.vocab, slots, rng) for x in sample_lengths(n, rng)]

    def cut(pool: list[Row], size: int) -> dict[str, list[list[Row]]]:
        """Warm-up batch, then the same timed rows as random batches and as tagray's bucketed batches."""
        warm, timed = pool[:size], pool[size:]
        sampler = BucketBatchSampler([r.useful for r in timed], size, seed=args.seed, drop_last=True)
        return {
            "warm": [warm],
            "random": [timed[i : i + size] for i in range(0, len(timed), size)],
            "bucketed": [[timed[j] for j in b] for b in sampler],
        }

    sizes = {"train": args.batch_size, "serve": args.serve_batch}
    batches = {k: cut(rows_of((args.steps + 1) * n), n) for k, n in sizes.items()}
    for v in variants:
        for _ in range(args.warmup):
            v.step(batches[v.kind]["warm"][0])
    _sync(device)
    for i in range(args.steps):
        k = i % len(variants)
        for v in variants[k:] + variants[:k]:  # rotating order: no variant always runs first
            rows_i = batches[v.kind][v.sampler][i]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t = time.perf_counter()
            v.step(rows_i)
            _sync(device)
            v.times.append(time.perf_counter() - t)
            v.useful += sum(r.useful for r in rows_i)
            v.processed += v.processed_tokens(rows_i)
            v.rows += len(rows_i)
            if device.type == "cuda":
                v.peak_mem = max(v.peak_mem, torch.cuda.max_memory_allocated())

    # padding a whole epoch would see, per variant (the timed pool is small and sorted as one window)
    epoch_rows = rows_of(EPOCH_ROWS)
    lengths = [r.useful for r in epoch_rows]
    res = []
    peak = args.peak_tflops or (H100_BF16_PEAK if device.type == "cuda" else None)
    for v in variants:
        sampler = BucketBatchSampler(
            lengths, sizes[v.kind], seed=args.seed, bucketing=v.sampler == "bucketed"
        )
        ep = [[epoch_rows[i] for i in b] for b in sampler]
        frac = sum(r.useful for b in ep for r in b) / sum(v.processed_tokens(b) for b in ep)
        res.append(v.summary(frac, peak))
    tps = {r["name"]: r["useful_tok_per_s"] for r in res}
    ep_tps = {r["name"]: r["epoch_useful_tok_per_s"] for r in res}
    pairs = {
        "tagray / peft-lm": ("tagray", "peft-lm"),
        "tagray / peft-head": ("tagray", "peft-head"),
        "serve: tagray / peft-head": ("serve tagray", "serve peft-head"),
        "bucketing: tagray / tagray -bucketing": ("tagray", "tagray -bucketing"),
        "no logits: tagray / tagray +logits": ("tagray", "tagray +logits"),
        "both: tagray / tagray -bucketing +logits": ("tagray", "tagray -bucketing +logits"),
        "splice vs PEFT: tagray -bucketing +logits / peft-head": ("tagray -bucketing +logits", "peft-head"),
    }
    import peft
    import transformers

    return {
        "benchmark": "gpu_bench",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "params": params,
        "machine": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "peak_tflops": peak,
            "measured_ceiling_tflops": 743.0 if device.type == "cuda" else None,
        },
        "weights_mem_gib": weights_mem / 2**30,
        "seconds": {"setup": t_setup, "total": time.perf_counter() - t0},
        "variants": res,
        "ratios": {
            "measured": {k: tps[a] / tps[b] for k, (a, b) in pairs.items() if a in tps and b in tps},
            "epoch_projected": {
                k: ep_tps[a] / ep_tps[b] for k, (a, b) in pairs.items() if a in tps and b in tps
            },
        },
    }


def table(res: dict) -> str:
    has_mfu = "mfu" in res["variants"][0]
    head = (
        f"{'variant':<26}{'batches':>9}{'s/step':>9}{'tok/s':>10}{'rows/s':>9}{'useful':>7}"
        f"{'epoch tok/s':>12}"
    ) + (f"{'MFU':>6}{'peak GiB':>9}" if has_mfu else "")
    lines = [head, "-" * len(head)]
    for v in res["variants"]:
        line = (
            f"{v['name']:<26}{v['batches']:>9}{v['s_per_step']:>9.3f}{v['useful_tok_per_s']:>10,.0f}"
            f"{v['rows_per_s']:>9,.1f}{v['useful_fraction']:>7.2f}{v['epoch_useful_tok_per_s']:>12,.0f}"
        )
        if has_mfu:
            line += f"{v['mfu']:>6.2f}{v['peak_mem_gib']:>9.1f}"
        lines.append(line)
    r = res["ratios"]
    lines += ["", f"{'speed-up':<55}{'measured':>9}{'epoch':>8}"]
    lines += [f"{k:<55}{x:>8.2f}x{r['epoch_projected'][k]:>7.2f}x" for k, x in r["measured"].items()]
    p, m, c = res["params"], res["machine"], res["config"]
    lines.append(
        f"\n{m['device']}, {c['dtype']}: {p['n_total'] / 1e6:,.1f}M params ({p['n_block'] / 1e6:,.1f}M in "
        f"blocks, {p['n_lm_head'] / 1e6:,.1f}M LM head); weights {res['weights_mem_gib']:.1f} GiB; "
        f"train batch {c['batch_size']}, serve batch {c['serve_batch']}, {2 * c['tag_length']} tag tokens"
    )
    if has_mfu:
        lines.append(
            f"MFU on processed tokens vs {m['peak_tflops']:.0f} TFLOP/s bf16 dense peak "
            "(measured matmul ceiling 743)"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on GPU, fp32 on CPU"
    )
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=None, help="default 3.5 x hidden (14336 at 4096)")
    p.add_argument("--heads", type=int, default=None, help="default hidden / 128")
    p.add_argument("--kv-heads", type=int, default=None, help="default heads / 4")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch-size", type=int, default=32, help="training rows per step")
    p.add_argument("--serve-batch", type=int, default=64, help="rows per serving forward")
    p.add_argument("--tag-length", type=int, default=10, help="p per tag; PEFT gets 2p virtual tokens")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak for MFU (default: H100 bf16 on CUDA)"
    )
    p.add_argument(
        "--ablation",
        choices=("none", "levers", "full"),
        default="full",
        help="none: tagray, peft-lm, peft-head; levers: + bucketing off, + logits on; full: + both",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, 2 steps: code paths only")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/gpu_bench_<device>.json)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.layers, args.hidden, args.vocab = "cpu", 2, 64, 1024
        args.batch_size, args.serve_batch, args.steps, args.warmup = 4, 8, 2, 1
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.intermediate = args.intermediate or int(3.5 * args.hidden)
    args.heads = args.heads or max(1, args.hidden // 128)
    args.kv_heads = args.kv_heads or max(1, args.heads // 4)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # peft 0.21 calls transformers' deprecated ``is_gradient_checkpointing``: noise, not a finding
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    res = run(args)
    name = "gpu_bench.smoke.json" if args.smoke else f"gpu_bench_{torch.device(args.device).type}.json"
    out = args.out or ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
