"""The numbers of docs/scaling.md: 10 GPU nodes and a 70B base, on paper.

Everything is computed from model shapes (``LlamaConfig``; no weights), node specs (``NODES``: AWS
instance types, from their public spec sheets), Ray's object-store default and tagray's own formulas
(:func:`tagray.core.prefix.kv_bytes_per_token`, the QED row lengths of ``bench/gpu_bench.py``), then
written to ``bench/results/scaling_numbers.json`` and rendered into docs/scaling.md.

Run: ``python bench/scaling_numbers.py`` (a second; no GPU, no download).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness as h  # noqa: E402
from bench.gpu_bench import sample_lengths  # noqa: E402

GB = 1e9
# name -> shape (Llama-3 family; 135M is SmolLM2, the demo's base)
MODELS = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
    "llama-3-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
}  # fmt: skip
# AWS nodes (public spec sheets): GPUs, GPU memory (GB), host RAM (GiB), network (Gbit/s), GPU-to-GPU
# bandwidth inside the node (GB/s per GPU and direction; NVLink 4 on H100 SXM), root disk (GB), and the
# bf16 TFLOP/s a tag-training step achieves there (H100: 0.54 of the 989 peak, measured in gpu-notes.md)
NODES = {
    "g5.xlarge (cluster.yaml)": dict(gpus=1, gpu_gb=24, ram_gib=16, net_gbps=10, link_gbs=None, disk_gb=100,
                                     achieved_tflops=None),
    "p5.48xlarge": dict(gpus=8, gpu_gb=80, ram_gib=2048, net_gbps=3200, link_gbs=450, disk_gb=30000,
                        achieved_tflops=0.54 * 989),
}  # fmt: skip
RAY_STORE_FRACTION, RAY_STORE_CAP = 0.3, 200 * GB  # ray_constants: min(30% of RAM, 200 GB) by default
NODES_N, BATCH, TAG_P = 10, 8, 10  # the question's 10 nodes; rows per rank per step; p of each tag
GPU_USABLE = 0.9  # of a GPU's memory, after the CUDA context, NCCL buffers and allocator fragmentation


def params(shape: dict) -> dict:
    """Parameter counts from the shape: blocks (attention, MLP, norms), embeddings, LM head."""
    d, L, i = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    hd = d // shape["num_attention_heads"]
    attn = 2 * d * d + 2 * d * shape["num_key_value_heads"] * hd  # q, o + k, v (grouped-query)
    block = attn + 3 * d * i + 2 * d
    emb = shape["vocab_size"] * d
    head = 0 if shape["tie_word_embeddings"] else emb
    return {
        "block": block,
        "blocks": L * block + d,
        "embed": emb,
        "lm_head": head,
        "total": L * block + d + emb + head,
    }


def activation_bytes_per_token(shape: dict, dtype_bytes: int = 2) -> int:
    """Estimate of what autograd keeps per token with grad, summed over the blocks: the inputs of every
    matmul and of the attention/activation functions, ~(6d + 2 kv hd + 3 I) elements a block."""
    d, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    return shape["num_hidden_layers"] * (6 * d + 2 * kv + 3 * i) * dtype_bytes


def qed_prefix_tokens() -> dict:
    """Mean QED row as tagray splits it in stage 2: prefix = template + SMILES + <SMILES> (p), suffix = <QED>."""
    text = sample_lengths(20000, random.Random(0))
    return {"prefix": sum(text) / len(text) + TAG_P, "suffix": TAG_P, "rows_train": 3000}


def model_numbers(name: str, shape: dict, rows: dict) -> dict:
    from transformers import LlamaConfig

    from tagray.core.prefix import kv_bytes_per_token

    p = params(shape)
    kv = kv_bytes_per_token(LlamaConfig(**shape), torch.bfloat16)
    act = activation_bytes_per_token(shape)
    full, split = rows["prefix"] + rows["suffix"], rows["suffix"]
    return {
        "params": p,
        "bf16_bytes": 2 * p["total"],
        "block_bf16_bytes": 2 * p["block"],
        "rest_bf16_bytes": 2 * (p["embed"] + p["lm_head"]),
        "kv_bytes_per_token_bf16": kv,
        "cache_bytes_per_row_bf16": kv * rows["prefix"],
        "cache_bytes_train_split_bf16": kv * rows["prefix"] * rows["rows_train"],
        "activation_bytes_per_token": act,
        "activations_full_batch": act * full * BATCH,  # every token with grad
        "activations_split_batch": act * split * BATCH + kv * rows["prefix"] * BATCH,  # suffix + prefix KV
    }


def node_numbers(node: dict, m: dict, rows: dict) -> dict:
    """Where the 70B base lives on one node and on each of its GPUs, today (DDP) and under FSDP / HSDP.

    FSDP re-gathers every block in the forward and again in the backward: 2 x the base per step (3 x
    when the no-grad prefix forward runs too), whatever the batch. Cross-node time is the lower bound
    (each node receives the other nodes' shares once per gather); HSDP gathers inside the node only.
    """
    store = min(RAY_STORE_FRACTION * node["ram_gib"] * 2**30, RAY_STORE_CAP)
    world, g, base = NODES_N * node["gpus"], node["gpus"], m["bf16_bytes"]
    working = 2 * m["block_bf16_bytes"] + m["rest_bf16_bytes"]  # current + prefetched block, the rest group
    gpu, act = GPU_USABLE * node["gpu_gb"] * GB, m["activations_split_batch"]
    out = {
        "object_store_bytes": store,
        "base_fits_object_store": base <= store,
        "owner_node_peak_bytes": 2 * base,  # load_base in the owner's heap + its ray.put copy
        "ddp_gpu_bytes": base,  # attach_base copies every tensor to each GPU
        "ddp_fits_gpu": base + act <= gpu,
        "world": world,
        "fsdp_rank_bytes": base / world + working,  # shard + working set, before activations
        "fsdp_fits_gpu": base / world + working + act <= gpu,
        "fsdp_gather_s_per_step": 2 * base * (NODES_N - 1) / NODES_N / (node["net_gbps"] / 8 * GB),
        "disk_fits_base": base <= node["disk_gb"] * GB,
    }
    if g > 1 and node["link_gbs"]:
        out["hsdp_rank_bytes"] = base / g + working
        out["hsdp_fits_gpu"] = base / g + working + act <= gpu
        out["hsdp_gather_s_per_step"] = 2 * base * (g - 1) / g / (node["link_gbs"] * GB)
    if node["achieved_tflops"]:
        row_s = 4 * m["params"]["blocks"] * rows["suffix"] / (node["achieved_tflops"] * 1e12)
        out["train_s_per_row_cached"] = row_s  # 4N per suffix token; cached prefixes cost nothing
        out["rows_per_rank_step_to_hide_gathers"] = out.get("hsdp_gather_s_per_step", 0) / row_s
    return out


def compute() -> dict:
    rows = qed_prefix_tokens()
    models = {n: model_numbers(n, s, rows) for n, s in MODELS.items()}
    big = models["llama-3-70b"]
    nodes = {n: {**spec, **node_numbers(spec, big, rows)} for n, spec in NODES.items()}
    return {
        "benchmark": "scaling_numbers",
        "assumptions": {
            "nodes": NODES_N,
            "rows_per_rank_step": BATCH,
            "tag_length": TAG_P,
            "dtype": "bfloat16",
            "ray_object_store": f"min({RAY_STORE_FRACTION:.0%} of RAM, {RAY_STORE_CAP / GB:.0f} GB)",
            "gpu_usable": GPU_USABLE,
            "qed_rows": rows,
        },
        "models": models,
        "nodes_70b": nodes,
    }


def gb(x: float) -> str:
    return f"{x / GB:,.1f} GB" if x >= 0.1 * GB else f"{x / 2**20:,.1f} MiB"


def render(res: dict) -> str:
    """The Markdown tables of docs/scaling.md."""
    rows = [
        {
            "model": n,
            "params": f"{m['params']['total'] / 1e9:.2f}B",
            "bf16": gb(m["bf16_bytes"]),
            "block": gb(m["block_bf16_bytes"]),
            "emb+head": gb(m["rest_bf16_bytes"]),
            "kv": f"{m['kv_bytes_per_token_bf16'] / 1024:,.0f} KiB",
            "row": gb(m["cache_bytes_per_row_bf16"]),
            "split": gb(m["cache_bytes_train_split_bf16"]),
            "act": gb(m["activations_full_batch"]),
            "acts": gb(m["activations_split_batch"]),
        }
        for n, m in res["models"].items()
    ]
    cols = [("model", "model", ""), ("parameters", "params", ""), ("bf16 weights", "bf16", ""),
            ("one block", "block", ""), ("embeddings + LM head", "emb+head", ""),
            ("prefix KV per token", "kv", ""), ("cache per QED row", "row", ""),
            ("cache, 3,000 rows", "split", ""), ("activations, full forward", "act", ""),
            ("activations, split", "acts", "")]  # fmt: skip
    out = [h.table(rows, cols, markdown=True), ""]
    fit = lambda b, ok: f"{gb(b)} ({'fits' if ok else 'OOM'})"  # noqa: E731
    nrows = []
    for n, x in res["nodes_70b"].items():
        nrows.append(
            {
                "node": f"{n}: {x['gpus']} x {x['gpu_gb']} GB GPU, {x['ram_gib']:,} GiB RAM",
                "store": f"{gb(x['object_store_bytes'])} ({'fits' if x['base_fits_object_store'] else 'too small'})",
                "ddp": fit(x["ddp_gpu_bytes"], x["ddp_fits_gpu"]),
                "fsdp": fit(x["fsdp_rank_bytes"], x["fsdp_fits_gpu"]),
                "fsdp_s": f"{x['fsdp_gather_s_per_step']:,.2f} s",
                "hsdp": fit(x["hsdp_rank_bytes"], x["hsdp_fits_gpu"]) if "hsdp_rank_bytes" in x else "-",
                "hsdp_s": f"{x['hsdp_gather_s_per_step']:,.2f} s" if "hsdp_gather_s_per_step" in x else "-",
                "rows": f"{x['rows_per_rank_step_to_hide_gathers']:,.0f}"
                if x.get("achieved_tflops")
                else "-",
                "disk": "yes" if x["disk_fits_base"] else "no",
            }
        )
    cols = [("70B on 10 nodes of", "node", ""), ("object store", "store", ""),
            ("DDP: base on each GPU", "ddp", ""), ("FSDP over all GPUs: per rank", "fsdp", ""),
            ("FSDP gathers per step (network)", "fsdp_s", ""), ("HSDP in the node: per rank", "hsdp", ""),
            ("HSDP gathers per step (NVLink)", "hsdp_s", ""), ("rows per rank-step to hide them", "rows", ""),
            ("root disk holds the base", "disk", "")]  # fmt: skip
    out.append(h.table(nrows, cols, markdown=True))
    a = res["assumptions"]
    out.append(
        f"\nAssumptions: {a['nodes']} nodes, bf16, {a['rows_per_rank_step']} rows per rank per step, QED rows "
        f"of {a['qed_rows']['prefix']:.1f} prefix + {a['qed_rows']['suffix']} suffix tokens (p = "
        f"{a['tag_length']}), Ray's object store {a['ray_object_store']}. Per-rank FSDP/HSDP memory = shard "
        "+ two blocks (current and prefetched) + the embeddings/LM-head group while it is gathered; "
        f"'fits': that plus the split's activations within {a['gpu_usable']:.0%} of the GPU's memory."
    )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=h.RESULTS / "scaling_numbers.json")
    p.add_argument("--doc", type=Path, default=h.ROOT / "docs" / "scaling.md")
    args = p.parse_args(argv)
    res = compute()
    h.finish(res, args.out, render)
    if args.doc.exists():
        h.render_into(args.doc, "scaling_numbers", render(res))
        print(f"rendered into {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
