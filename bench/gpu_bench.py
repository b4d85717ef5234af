"""GPU benchmark: tagray's frozen-prefix training step vs PEFT prompt tuning on a Llama-3-8B-shaped model.

Self-contained for a bare GPU machine: torch, transformers and peft, plus tagray's pure-torch core
(``tagray/core``, imported from this checkout; no Ray, rdkit, datasets or fsspec). Random bf16 weights
initialised on the device (no download), frozen; only ``<QED>`` (p vectors) and its linear head train,
``<SMILES>`` is frozen as after stage 1. Row lengths follow the real QED inputs (``TEXT_LENGTHS``: NCI
SMILES in the paper's template, SmolLM2-tokenised), random token ids. The variants and the schedule are
those of ``bench/train_vs_peft.py`` (:mod:`bench.harness`): the prefix cache filled (epoch 1) and reused
(epochs 2+), the prefix recomputed without grad every step, the full forward, and PEFT prompt tuning
(virtual tokens first) + a linear head, all on the same length-bucketed batches, none computing logits.

MFU. ``N`` = parameters of the transformer blocks plus the final norm (6.98B at the default shape):
input embeddings and the LM head are excluded, since no variant computes vocabulary logits. A *trained
token* is every real token of a training row as the variant feeds it: template + SMILES + tag tokens for
tagray, template + SMILES + virtual tokens for PEFT; padding does not count. ``mfu_4n`` = trained
tokens/s x 4N / peak (forward 2N + input-gradient backward 2N; no weight gradients): the work a full
forward and backward would do, so a variant that reuses cached prefixes can go above what the hardware
executes, even above 1. ``mfu_hw`` counts the FLOPs actually executed: 4N per slot run with grad, 2N per
slot run without (the prefixes), padding included, cached prefixes free. Attention scores are left out
(under 1% at ~100 tokens). Peak: the card's bf16 dense peak (``PEAK_TFLOPS``) or ``--peak-tflops``.

GPU:  python bench/gpu_bench.py            writes bench/results/gpu_bench_<card>.json (e.g. _h100)
CPU:  python bench/gpu_bench.py --smoke    tiny shape, seconds: checks the script end to end
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tagray's core, bench.harness

from bench import harness as h  # noqa: E402
from tagray.core.heads import HeadBank, HeadSpec, head_init  # noqa: E402
from tagray.core.model import TagLLM  # noqa: E402
from tagray.core.prefix import PrefixStore  # noqa: E402
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
LABEL_TOKENS = 7  # " 0.535" + EOS in SmolLM2's tokenizer: the PEFT LM-loss target (--levers)
PEAK_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0, "l40s": 362.0}  # bf16 dense, by card
MATMUL_CEILING = {"h100": 743.0}  # a bf16 8192^3 matmul measured on one H100 (gpu-notes.md)


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


def tag_slots(p: int) -> dict[str, Slot]:
    """The stage-2 table layout: frozen ``<SMILES>`` rows 0..p-1, then trainable ``<QED>`` rows p..2p-1."""
    z = torch.zeros(p, 1)
    return dict(TagBank({"<SMILES>": z, "<QED>": z}, trainable={"<QED>"}).slots)


def make_row(text_len: int, vocab: int, slots: dict[str, Slot], rng: random.Random) -> h.Row:
    """A QED-shaped row: prefix, <SMILES>, SMILES tokens, suffix, <QED>; random token ids."""
    smiles = max(1, text_len - PREFIX - SUFFIX)
    text = [rng.randrange(vocab) for _ in range(PREFIX + smiles + SUFFIX)]
    s, q = slots["<SMILES>"], slots["<QED>"]
    ids = text[:PREFIX] + [0] * s.rows + text[PREFIX:] + [0] * q.rows
    tags = [-1] * PREFIX + list(range(s.start, s.start + s.rows)) + [-1] * (smiles + SUFFIX)
    tags += list(range(q.start, q.start + q.rows))
    n = len(ids)
    enc = Encoded(ids, tags, [IGNORE] * n, [0] * n, head_pos=n - 1, head="<QED>")
    return h.Row(enc, text, [rng.randrange(vocab) for _ in range(LABEL_TOKENS)], rng.random())


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


def card(device: torch.device) -> str:
    """``h100``, ``a100``, ... from the CUDA device name (``cpu`` on CPU): the result file's suffix."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    known = re.search(r"\b(h200|h100|a100|a10g|l40s|l4|b200|gh200)\b", name)
    return known.group(1) if known else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model(args, device, dtype)
    emb = model.get_input_embeddings().weight.detach().to("cpu", torch.float32)  # inits are built on the host
    p, d = args.tag_length, emb.shape[1]
    init = {"<SMILES>": mean_embedding_init(emb, p), "<QED>": mean_embedding_init(emb, p)}
    head0 = head_init(emb, 1, torch.Generator().manual_seed(args.seed))
    del emb

    def make(prefix: str, store: PrefixStore | None) -> TagLLM:  # own tables per variant, shared base
        tags = TagBank(init, trainable={"<QED>"})
        spec = {"<QED>": HeadSpec("regression", 1, (0.5,), (0.29,))}
        heads = HeadBank({"<QED>": head0}, spec, d, trainable={"<QED>"})
        return TagLLM(model, tags, heads, prefix=prefix, prefix_store=store).to(device).train()

    store = PrefixStore(max_bytes=int(args.cache_gb * 2**30), dtype=dtype)  # the compute dtype: exact
    weights_mem = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    rng, slots = random.Random(args.seed), tag_slots(p)
    lengths = sample_lengths((args.steps + 1) * args.batch_size, rng)
    rows = [make_row(x, args.vocab, slots, rng) for x in lengths]
    warm, pool = rows[: args.batch_size], rows[args.batch_size :]
    t_setup = time.perf_counter() - t0
    done, timing = h.run_suite(make, model, store, 0, (0.5, 0.29), warm, pool, args, device)
    res = summarise(done, h.param_counts(model), args, device)
    res["prefix_cache"] = h.prefix_result(
        {v["name"]: v for v in res["variants"]},
        h.cache_summary(store, model.config, pool, slots["<QED>"].start),
    )
    res["weights_mem_gib"] = weights_mem / 2**30
    res["seconds"] = {"setup": t_setup, "bench": timing["bench_s"], "total": time.perf_counter() - t0}
    return res


MFU_DEFINITION = {
    "N": "transformer-block parameters + final norm (no embeddings, no LM head: no logits)",
    "trained_tokens": "real tokens of each training row as fed (tag or virtual tokens included), no padding",
    "mfu_4n": "trained tokens/s x 4N / peak",
    "mfu_hw": "executed FLOPs/s / peak: 4N per slot with grad, 2N per slot without, padding included",
}


def summarise(variants: list, params: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Each variant's summary with its MFU (when the peak is known), and the run's context."""
    name = card(device)
    peak = args.peak_tflops or PEAK_TFLOPS.get(name)
    out = []
    for v in variants:
        s = v.summary()
        if peak:
            s["mfu_4n"] = s["useful_tok_per_s"] * 4 * params["n_block"] / (peak * 1e12)
            s["mfu_hw"] = s["executed_tflop_per_s"] / peak
        out.append(s)
    return {
        "benchmark": "gpu_bench",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "params": params,
        "mfu_definition": MFU_DEFINITION,
        "machine": {
            **h.machine(device),
            "card": name,
            "peak_tflops": peak,
            "matmul_ceiling_tflops": MATMUL_CEILING.get(name),
        },
        "peak_rss_gib": h.peak_rss_bytes() / 2**30,
        "variants": out,
    }


def report(res: dict, markdown: bool = False) -> str:
    """The variants table (with MFU and peak memory on a GPU), the speed-ups and the cache line."""
    mfu = ("mfu_4n", "mfu_hw", "peak_mem_gib") if "mfu_4n" in res["variants"][0] else ()
    cols = h.columns("name", "s_per_step", "rows_per_s", "useful_tok_per_s", "executed_tflop_per_s", *mfu)
    p, m, cfg = res["params"], res["machine"], res["config"]
    return "\n".join(
        [
            h.table(res["variants"], cols, markdown),
            "",
            h.prefix_report(res["prefix_cache"], markdown),
            "",
            f"{m['device']}, {cfg['dtype']}: {p['n_total'] / 1e9:.2f}B params, N = {p['n_block'] / 1e9:.2f}B; "
            f"weights {res['weights_mem_gib']:.1f} GiB; batch {cfg['batch_size']}, p={cfg['tag_length']}, PEFT "
            f"{cfg['peft_virtual']} virtual; {cfg['epochs']} epochs x {cfg['steps']} steps; peak "
            f"{m['peak_tflops'] or 'n/a'} TFLOP/s; bench {res['seconds']['bench']:.0f} s",
        ]
    )


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
    p.add_argument("--tag-length", type=int, default=10, help="p of <SMILES> and <QED>")
    p.add_argument(
        "--peft-virtual", type=int, default=10, help="PEFT virtual tokens (default: p, as trained)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per epoch")
    p.add_argument("--epochs", type=int, default=3, help="passes over the timed rows (1 fills the cache)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cache-gb", type=float, default=32.0, help="host RAM budget of the prefix store")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: by card name)")
    p.add_argument("--levers", action="store_true", help="+ random batches and logits (PEFT as users run it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--render", action="store_true", help="no run: render --out's JSON into docs/benchmarks.md"
    )
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, 2 epochs x 2 steps: code paths")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default bench/results/gpu_bench_<card>.json)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.layers, args.hidden, args.vocab = "cpu", 2, 64, 1024
        args.batch_size, args.steps, args.epochs, args.warmup = 4, 2, 2, 1
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.intermediate = args.intermediate or int(3.5 * args.hidden)
    args.heads = args.heads or max(1, args.hidden // 128)
    args.kv_heads = args.kv_heads or max(1, args.heads // 4)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        if args.out is None:
            raise SystemExit(
                "--render needs --out: the JSON to render, e.g. bench/results/gpu_bench_h100.json"
            )
        return h.render_json(args.out, h.ROOT / "docs" / "benchmarks.md", "gpu_bench", report)
    h.quiet()
    res = run(args)
    name = "gpu_bench.smoke.json" if args.smoke else f"gpu_bench_{res['machine']['card']}.json"
    return h.finish(res, args.out or h.RESULTS / name, report)


if __name__ == "__main__":
    raise SystemExit(main())
