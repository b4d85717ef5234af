"""FSDP over a frozen base (#11.2): 2 processes, gloo, CPU, a tiny random Llama.

The same stage-2 training (frozen ``<S>``, trainable ``<Q>`` + a regression head, the frozen-prefix split
on) runs under DDP - the full base on every rank, as ``strategy: ddp`` does today - and under
:mod:`tagray.train.fsdp` - the base sharded per block, each rank loading only its rows from the
checkpoint - in the same two processes. The tags and heads after a few steps must match within 1e-4,
evaluation through the wrapped model must give the same predictions with an odd number of batches,
and each rank must hold (and have read) at most 0.6 of the base.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tagray.core.data import BucketBatchSampler, collate
from tagray.core.heads import HeadBank, HeadSpec, head_init
from tagray.core.model import TagLLM
from tagray.core.tags import TagBank, mean_embedding_init
from tagray.core.template import IGNORE, Encoded

from .conftest import free_port

V, D, P, WORLD, STEPS = 128, 64, 3, 2, 4
SPEC = {"<Q>": HeadSpec("regression", 1, (0.5,), (0.3,))}


def _config(tie: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )


def _row(rng: random.Random, short_prefix: bool = False) -> Encoded:
    """Text, <S> (frozen rows 0..P-1), text, <Q> (trainable rows P..2P-1) read by the head; with
    ``short_prefix`` <Q> comes second, so the split would not pay off (the model runs the full forward)."""
    a, b = rng.randrange(3, 8), rng.randrange(4, 16)
    text = lambda k: [rng.randrange(V) for _ in range(k)]  # noqa: E731
    if short_prefix:
        ids, tags = text(1) + [0] * P + text(a + b), [-1] + list(range(P, 2 * P)) + [-1] * (a + b)
    else:
        ids = text(a) + [0] * P + text(b) + [0] * P
        tags = [-1] * a + list(range(P)) + [-1] * b + list(range(P, 2 * P))
    n = len(ids)
    return Encoded(ids, tags, [IGNORE] * n, [0] * n, head_pos=n - 1, head="<Q>")


def _data(seed: int, n: int, short: bool = False) -> list[tuple[Encoded, list[float]]]:
    rng = random.Random(seed)
    return [(_row(rng, short), [rng.random()]) for _ in range(n)]


def _batch(rows) -> dict:
    return collate([e for e, _ in rows], ["<Q>"], [y for _, y in rows])


def _model(base, init: dict) -> TagLLM:
    tags = TagBank({"<S>": init["S"], "<Q>": init["Q"]}, trainable={"<Q>"})
    heads = HeadBank({"<Q>": init["H"]}, SPEC, D, trainable={"<Q>"})
    return TagLLM(base, tags, heads, track_momentum=0.2)  # momentum: the heads' all-reduce runs too


def _wrap(mode: str, folder: str, init: dict):
    """(model, wrapped, what this rank holds and read): DDP over a full base, or FSDP over a sharded one."""
    from transformers import AutoModelForCausalLM

    from tagray.train import fsdp

    if mode == "ddp":
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for p in base.parameters():
            p.requires_grad_(False)
        model = _model(base, init)
        model._ddp_params_and_buffers_to_ignore = [
            n for n, _ in model.named_parameters() if n.startswith("base.")
        ]
        model._ddp_params_and_buffers_to_ignore += [
            n for n, _ in model.named_buffers() if n.startswith("base.")
        ]
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        return model, wrapped, {}
    rows, read = fsdp.safetensors_rows(folder), {}

    def counted(name, a, b):
        t = rows(name, a, b)
        if t is not None:
            read[name] = t.numel()
        return t

    base = fsdp.load_sharded_base(_config(), counted, "cpu")
    local, full = fsdp.local_param_bytes(base)
    model = fsdp.prepare(_model(base, init))
    return model, model, {"local_bytes": local, "full_bytes": full, "read": sum(read.values())}


def _run(mode: str, rank: int, folder: str, init: dict, train, evals) -> dict:
    from tagray.train.fsdp import lockstep

    model, wrapped, held = _wrap(mode, folder, init)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2)
    sampler = BucketBatchSampler([len(e) for e, _ in train], 4, seed=0, num_replicas=WORLD, rank=rank)
    splits = []
    model.train()
    for idx in list(sampler)[:STEPS]:
        out = wrapped(_batch([train[i] for i in idx]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        splits.append(model.last_split["prefix_tokens"])
    model.eval()  # evaluation on the model the checkpoint reads; 3 batches over 2 ranks
    batches = [list(range(i, min(i + 4, len(evals)))) for i in range(0, len(evals), 4)]
    preds = {}
    with torch.no_grad():
        for idx, keep in lockstep(batches, rank, WORLD):
            out = model(_batch([evals[i] for i in idx]))
            if keep:
                preds.update(zip(idx, out.preds[:, 0].tolist(), strict=True))
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, preds)
    artifact = {"tags": model.tags.state()["<Q>"], "heads": model.heads.state()["<Q>"]}
    artifact["mu"] = model.heads.stats()["<Q>"]
    # ranks whose batches call for different paths: rank 0 would split, rank 1 not (its prefix is short)
    model.train()
    wrapped(_batch(_data(10 + rank, 4, short=rank == 1))).loss.backward()
    return {
        "artifact": artifact,
        "preds": {k: v for g in gathered for k, v in g.items()},
        "splits": splits,
        "mixed_split": model.last_split["prefix_tokens"],
        **held,
    }


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    init = load_file(os.path.join(tmp, "init.safetensors"))
    train, evals = _data(0, 32), _data(1, 10)
    out = {}
    for mode in ("ddp", "fsdp"):
        r = _run(mode, rank, os.path.join(tmp, "base"), init, train, evals)
        save_file(r.pop("artifact"), os.path.join(tmp, f"{mode}-{rank}.safetensors"))
        out[mode] = r
        dist.barrier()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _spawn(tmp: str, timeout: float = 900) -> None:
    """Both ranks, with a deadline: a collective that never pairs up must fail the test, not hang it."""
    ctx = mp.start_processes(_worker, args=(free_port(), tmp), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"FSDP workers did not finish in {timeout:.0f} s (collectives out of lockstep?)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import LlamaForCausalLM

    tmp = str(tmp_path_factory.mktemp("fsdp"))
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config())
    base.save_pretrained(os.path.join(tmp, "base"))  # safetensors: what the FSDP ranks read slices of
    emb, g = base.get_input_embeddings().weight.detach(), torch.Generator().manual_seed(1)
    init = {
        "S": mean_embedding_init(emb, P, 0.3, g),
        "Q": mean_embedding_init(emb, P, 0.3, g),
        "H": head_init(emb, 1, g),
    }
    save_file(init, os.path.join(tmp, "init.safetensors"))  # a stage-1 artifact's tags, as it were
    _spawn(tmp)
    ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(WORLD)]
    art = {
        m: [load_file(os.path.join(tmp, f"{m}-{r}.safetensors")) for r in range(WORLD)]
        for m in ("ddp", "fsdp")
    }
    return ranks, art, init


@pytest.mark.slow  # two spawned gloo ranks (~8 s): the integration tier
def test_fsdp_artifact_matches_ddp(runs):
    ranks, art, init = runs
    for r in range(WORLD):
        assert all(s > 0 for s in ranks[r]["fsdp"]["splits"])  # the frozen-prefix split ran under FSDP
        for k in ("tags", "heads", "mu"):
            torch.testing.assert_close(art["fsdp"][r][k], art["ddp"][0][k], atol=1e-4, rtol=0)
            torch.testing.assert_close(art["fsdp"][r][k], art["fsdp"][0][k], atol=0, rtol=0)  # replicated
    assert float((art["fsdp"][0]["tags"] - init["Q"]).abs().max()) > 1e-3  # it did train


@pytest.mark.slow  # two spawned gloo ranks (~8 s): the integration tier
def test_fsdp_evaluation_through_the_wrapped_model_matches_ddp(runs):
    ranks = runs[0]
    ddp, fsdp = ranks[0]["ddp"]["preds"], ranks[0]["fsdp"]["preds"]
    assert sorted(ddp) == sorted(fsdp) == [str(i) for i in range(10)]  # odd batch count: lockstep padding
    for k in ddp:
        assert fsdp[k] == pytest.approx(ddp[k], abs=1e-4)


@pytest.mark.slow  # two spawned gloo ranks (~8 s): the integration tier
def test_fsdp_ranks_hold_and_read_a_shard_of_the_base(runs):
    ranks = runs[0]
    for r in ranks:
        f = r["fsdp"]
        assert f["local_bytes"] <= 0.6 * f["full_bytes"]
        assert f["read"] * 4 <= 0.6 * f["full_bytes"]  # fp32 elements read from the checkpoint


@pytest.mark.slow  # two spawned gloo ranks (~8 s): the integration tier
def test_fsdp_ranks_agree_on_the_split(runs):
    ranks = runs[0]
    assert ranks[0]["ddp"]["mixed_split"] > 0 and ranks[1]["ddp"]["mixed_split"] == 0  # DDP: each its own
    assert ranks[0]["fsdp"]["mixed_split"] == ranks[1]["fsdp"]["mixed_split"] == 0  # FSDP: all or none


def test_lockstep_pads_every_rank_to_the_same_count():
    from tagray.train.fsdp import lockstep

    b = [[0], [1], [2]]
    assert lockstep(b, 0, 2) == [([0], True), ([2], True)]
    assert lockstep(b, 1, 2) == [([1], True), ([0], False)]
    assert lockstep([], 1, 2) == []
