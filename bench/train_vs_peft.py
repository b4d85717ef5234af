"""tagray's frozen-prefix training step vs Hugging Face PEFT prompt tuning: QED function tag, CPU.

Stage 2 of the recipe: ``<SMILES>`` is frozen (a domain tag from stage 1) and only ``<QED>`` (p vectors)
and its regression head train, so every row's prefix - the template and the SMILES before ``<QED>`` -
is a constant: its keys/values can be computed without grad once and reused. The real SmolLM2-135M, the
real QED template and RDKit's NCI SMILES (``build_task_data(load_task("qed"))``), fp32, in one process,
every variant on exactly the same rows and batches (tagray's length-bucketed sampler), none computing
vocabulary logits (regression on the function tag's / last token's final hidden state):

- ``tagray cache fill`` / ``tagray cache reuse``: ``TagLLM(prefix="auto", prefix_store=PrefixStore())``,
  timed in epoch 1 (the store fills) and in epochs 2+ (every prefix read back);
- ``tagray prefix recompute``: ``prefix="auto"`` without a store (no-grad prefix every step);
- ``tagray full forward``: ``prefix="off"``;
- ``peft-head``: PEFT prompt tuning (``--peft-virtual`` virtual tokens, first, as PEFT puts them) plus a
  linear head; ``logits_to_keep`` selects no position, so the LM head runs on nothing.

``--levers`` adds the earlier comparison: PEFT with an LM loss and with unused logits on random batches,
tagray on random batches and with logits (see docs/benchmarks.md).

Run: ``python bench/train_vs_peft.py`` (~4 min on a quiet 2-core machine); ``--smoke``: tiny random Llama,
seconds, code paths only; ``--render``: write the tables of the JSON into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is a package

from bench import harness as h  # noqa: E402
from tagray.core.base import Base, load_base  # noqa: E402
from tagray.core.heads import HeadBank, HeadSpec, head_init  # noqa: E402
from tagray.core.model import TagLLM  # noqa: E402
from tagray.core.prefix import PrefixStore  # noqa: E402
from tagray.core.tags import TagBank, mean_embedding_init  # noqa: E402
from tagray.core.tiny import tiny_base  # noqa: E402

DOC = h.ROOT / "docs" / "benchmarks.md"


def load_rows(args: argparse.Namespace) -> tuple[Base, TagBank, HeadBank, list[h.Row]]:
    """The base, the stage-2 tag and head banks (``<SMILES>`` frozen, ``<QED>`` + head trainable) and the
    QED training rows encoded by tagray's own pipeline."""
    from tagray.tasks.dataset import build_task_data
    from tagray.tasks.spec import load_task
    from tagray.train.batches import encode_rows

    base = tiny_base("llama") if args.smoke else load_base("smollm2-135m")
    n = (args.epochs + 1) * args.steps * args.batch_size + args.batch_size
    td = build_task_data(load_task("qed", {"limits": {"train": max(n, 64), "valid": 8, "test": 8}}))
    emb = base.model.get_input_embeddings().weight
    p, pf = args.tag_length, args.function_tag_length
    # <SMILES> stands for stage 1's learned domain tag: its values do not change the cost
    tags = TagBank(
        {"<SMILES>": mean_embedding_init(emb, p), "<QED>": mean_embedding_init(emb, pf)}, {"<QED>"}
    )
    exs = encode_rows([td], base.tokenizer, tags, "train")
    y = torch.tensor([e.target[0] for e in exs])
    spec = HeadSpec("regression", 1, (float(y.mean()),), (float(y.std()),))
    gen = torch.Generator().manual_seed(args.seed)
    heads = HeadBank({"<QED>": head_init(emb, 1, gen)}, {"<QED>": spec}, emb.shape[1], trainable={"<QED>"})
    tok = base.tokenizer
    rows = []
    for e in exs:
        text = [i for i, t in zip(e.enc.ids, e.enc.tag_rows, strict=True) if t < 0]
        label = tok.encode(f" {e.target[0]:.3f}", add_special_tokens=False) + [tok.eos_token_id]
        rows.append(h.Row(e.enc, text, label, float(e.target[0])))
    return base, tags, heads, rows


PAIRS = {
    "tagray full forward / peft-lm (random)": ("tagray full forward", "peft-lm (random)"),
    "tagray full forward / peft-head +logits (random)": ("tagray full forward", "peft-head +logits (random)"),
    "bucketing: tagray full forward / tagray full (random)": ("tagray full forward", "tagray full (random)"),
    "no logits: tagray full forward / tagray full +logits": ("tagray full forward", "tagray full +logits"),
}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    load0, t0 = h.machine(device)["loadavg"], time.perf_counter()
    base, tags, heads, rows = load_rows(args)
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    B = args.batch_size
    warm, pool = [rows[i] for i in order[:B]], [rows[i] for i in order[B : B + args.steps * B]]
    if len(pool) < args.steps * B:
        raise SystemExit(f"only {len(rows)} rows: lower --steps or --batch-size")

    def make(prefix: str, store: PrefixStore | None) -> TagLLM:  # own tables per variant, shared base
        return TagLLM(
            base.model, copy.deepcopy(tags), copy.deepcopy(heads), prefix=prefix, prefix_store=store
        )

    store = PrefixStore(max_bytes=int(args.cache_gb * 2**30))
    z = (heads.specs["<QED>"].mean[0], heads.specs["<QED>"].std[0])
    t_setup = time.perf_counter() - t0
    done, timing = h.run_suite(
        make, base.model, store, base.tokenizer.pad_token_id, z, warm, pool, args, device
    )
    variants = [v.summary() for v in done]
    by = {v["name"]: v for v in variants}
    res = {
        "benchmark": "train_vs_peft",
        "config": {**{k: v for k, v in vars(args).items() if k not in ("out", "render")}, "base": base.name},
        "params": h.param_counts(base.model),
        "machine": {**h.machine(device), "loadavg_start": load0},
        "seconds": {"setup": t_setup, "bench": timing["bench_s"]},
        "memory": {
            "rss_before_bench_gib": timing["rss_before"] / 2**30,
            "peak_rss_gib": h.peak_rss_bytes() / 2**30,
        },
        "variants": variants,
        "prefix_cache": h.prefix_result(
            by, h.cache_summary(store, base.model.config, pool, tags.first_trainable_row)
        ),
    }
    if args.levers:
        res["levers_rows_per_s_ratio"] = {
            k: by[a]["rows_per_s"] / by[b]["rows_per_s"] for k, (a, b) in PAIRS.items()
        }
    return res


def report(res: dict, markdown: bool = False) -> str:
    """The variants table, the prefix-cache speed-ups and the cache's bytes per row."""
    cols = (
        h.columns(
            "name", "batches", "steps", "s_per_step", "rows_per_s", "rows_per_cpu_s", "useful_tok_per_s"
        )
        + h.columns("useful_fraction")
        + h.columns("executed_tflop_per_s", "max_rss_gib")
    )
    out = [h.table(res["variants"], cols, markdown), "", h.prefix_report(res["prefix_cache"], markdown)]
    if "levers_rows_per_s_ratio" in res:
        lev = [{"pair": k, "x": x} for k, x in res["levers_rows_per_s_ratio"].items()]
        out += ["", h.table(lev, [("lever (rows/s ratio)", "pair", ""), ("x", "x", ".2f")], markdown)]
    cfg, m, mem = res["config"], res["machine"], res["memory"]
    out += [
        "",
        f"{cfg['base']}, batch {cfg['batch_size']}, <SMILES> p={cfg['tag_length']} (frozen), <QED> "
        f"p={cfg.get('function_tag_length', cfg['tag_length'])} (trained), "
        f"PEFT {cfg['peft_virtual']} virtual tokens, {cfg['epochs']} epochs x {cfg['steps']} steps over "
        f"{cfg['steps'] * cfg['batch_size']} rows, {cfg['threads']} threads; RSS "
        f"{mem['rss_before_bench_gib']:.2f} GiB before the timed epochs, peak {mem['peak_rss_gib']:.2f} GiB; "
        f"load {m['loadavg_start'][0]:.1f} -> {m['loadavg'][0]:.1f}; bench {res['seconds']['bench']:.0f} s",
    ]
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant per epoch")
    p.add_argument("--epochs", type=int, default=3, help="passes over the timed rows (1 fills the cache)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tag-length", type=int, default=10, help="p of <SMILES> (and of <QED> by default)")
    p.add_argument(
        "--function-tag-length",
        type=int,
        default=None,
        help="p of <QED> (default --tag-length; stage 2 ships 2)",
    )
    p.add_argument(
        "--peft-virtual", type=int, default=None, help="PEFT virtual tokens (default: p of <QED>, as trained)"
    )
    p.add_argument("--cache-gb", type=float, default=4.0, help="RAM budget of the prefix store")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levers", action="store_true", help="+ random batches and logits (PEFT as users run it)")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, 2 epochs x 2 steps: code paths")
    p.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/train_vs_peft.json)")
    p.add_argument(
        "--render", action="store_true", help="no run: render --out's JSON into docs/benchmarks.md"
    )
    args = p.parse_args(argv)
    args.function_tag_length = args.function_tag_length or args.tag_length
    args.peft_virtual = args.peft_virtual or args.function_tag_length
    if args.smoke:
        args.steps, args.epochs, args.batch_size = (
            min(args.steps, 2),
            min(args.epochs, 2),
            min(args.batch_size, 4),
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    name = "train_vs_peft" + ("" if args.function_tag_length == 10 else f"_p{args.function_tag_length}")
    out = args.out or h.RESULTS / (f"{name}.smoke.json" if args.smoke else f"{name}.json")
    if args.render:  # every measured function tag length into its own block
        for path in sorted(h.RESULTS.glob("train_vs_peft*.json")) if args.out is None else [out]:
            if path.stem == "train_vs_peft" or path.stem.startswith("train_vs_peft_p"):
                h.render_json(path, DOC, path.stem, report)
        return 0
    h.quiet()
    return h.finish(run(args), out, report)


if __name__ == "__main__":
    raise SystemExit(main())
