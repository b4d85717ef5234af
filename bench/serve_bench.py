"""Serving benchmark of the tagray Ray Serve app (issue #6): mixed-tag batching, batching on/off, memory.

In ONE run, against one app (``tagray.ray.serve:build_app``) over HTTP on 127.0.0.1:

- ``homogeneous``: every request the same tag composition (one tag set, ``qed``), closed loop;
- ``mixed``: Zipf-popular draws over many compositions (tag sets x tasks, zero-shot ``compose`` of
  another set's ``<SMILES>``, ensembles), Poisson arrivals, at most ``--concurrency`` in flight;
- ``unbatched``: the homogeneous workload with the SAME replica reconfigured in place to
  ``max_batch_size=1`` (``user_config``), so every request is its own forward pass;
- ``memory``: replica USS (psutil) with 1 replica, then 2 (scaled in place), against the base's bytes;
- ``ensemble_micro`` (in the bench process, no Serve): an ensemble of 4 search trials that share their
  domain tag vs one member, same Predictor and inputs; ``ensemble4_over_single`` is its headline ratio,
  and its one-member variant (one call vs one call per request) is ``predictor_micro``.

Scenarios alternate in ``--rounds`` rounds so background load hits all of them alike.

    python bench/serve_bench.py                       # SmolLM2-135M, 400 requests per scenario
    python bench/serve_bench.py --smoke               # tiny random model, 50 requests (1-2 minutes)
    python bench/serve_bench.py --url http://127.0.0.1:8000   # a running app: homogeneous + mixed only
    python bench/serve_bench.py --ensemble-only       # only ensemble_micro (SmolLM2, no Ray), merged into the JSON
    python bench/serve_bench.py --render-docs         # the JSON's tables -> docs/serving-benchmark.md

Writes ``bench/results/serve_bench.json`` and prints a table. See docs/serving-benchmark.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
APP = "bench"
TASKS = ("qed", "logp")  # both read a SMILES: inputs (and so sequence lengths) are alike in every scenario
DOMAIN = "<SMILES>"
SMILES = (  # 24 drug-like molecules, 16 tokens on average
    "CCO c1ccccc1O CC(=O)Nc1ccc(O)cc1 CN1C=NC2=C1C(=O)N(C(=O)N2C)C CC(=O)Oc1ccccc1C(=O)O "
    "CC(C)Cc1ccc(cc1)C(C)C(=O)O COc1ccc2nc(S(=O)Cc3ncc(C)c(OC)c3C)[nH]c2c1 CN1CCC[C@H]1c1cccnc1 "
    "O=C(O)c1ccccc1O CC(C)NCC(O)c1ccc(O)c(O)c1 Clc1ccc(cc1)C(c1ccccc1)N1CCN(CC1)CCOCC(=O)O "
    "CN(C)C(=N)NC(=N)N OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O c1ccc2ccccc2c1 CCN(CC)CC CC(=O)C "
    "C1CCCCC1 CCCCCCCCO NC(=O)c1cccnc1 O=C1NC(=O)c2ccccc12 CC1=CC(=O)C=CC1=O CSCC[C@H](N)C(=O)O "
    "N[C@@H](Cc1ccccc1)C(=O)O FC(F)(F)c1ccc(Oc2ccccc2)cc1"
).split()
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TAGRAY_PROGRESS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}
MiB = 2**20


# ---- registry: untrained but valid tag sets (only speed matters here) ------------------------------


def make_tagset(emb: Any, fingerprint: dict, tasks: list[str], seed: int, length: int) -> Any:
    """A tag set for ``tasks`` with random tags and heads on the base whose input embedding is ``emb``."""
    import torch

    from tagray.core.artifacts import TagSet
    from tagray.core.heads import HeadSpec
    from tagray.core.tags import mean_embedding_init
    from tagray.core.template import template_tags
    from tagray.tasks.spec import load_task

    g = torch.Generator().manual_seed(seed)
    d = emb.shape[1]
    tags, info, heads, specs, stats, docs = {}, {}, {}, {}, {}, {}
    for name in tasks:
        spec = load_task(name)
        docs[spec.name] = spec.to_json()
        for t in template_tags(spec.template):
            if t not in tags:
                v = mean_embedding_init(emb, length)
                tags[t] = v + torch.randn(v.shape, generator=g) * v.norm(dim=1, keepdim=True) / d**0.5
                info[t] = {"kind": "function" if t == spec.function_tag else "domain", "length": length}
                info[t]["stage"] = "bench"
        k = len(spec.target.columns)
        specs[spec.head_tag] = HeadSpec("regression", k, (0.5,) * k, (0.2,) * k)
        heads[spec.head_tag] = torch.randn(k, d + 1, generator=g) * 0.5
        stats[spec.head_tag] = torch.stack([torch.randn(d, generator=g) * 0.1, torch.ones(d)])
    return TagSet(tags, heads, info, specs, fingerprint, tasks=docs, stage="bench", head_stats=stats)


def tiny_base_dir(path: str) -> str:
    """The tiny random Llama of the unit tests (:mod:`tagray.core.tiny`), saved as a Hugging Face folder."""
    from tagray.core.tiny import tiny_base

    base = tiny_base()
    base.model.save_pretrained(path)
    base.tokenizer.save_pretrained(path)
    return path


def build_registry(base_spec: str, path: str, n_sets: int, length: int, dtype: str = "float32") -> None:
    """``n_sets`` chem tag sets (qed + logp) and two ensembles, built on the cluster's shared base copy."""
    from tagray.ray.shared import attach_base, base_info
    from tagray.registry import publish_ensemble, publish_tagset

    info = base_info(base_spec, dtype)  # creates the BaseOwner the replicas will attach to
    base = attach_base(info)  # zero-copy view of the object-store arrays
    emb = base.model.get_input_embeddings().weight
    names = [f"chem{i}" for i in range(n_sets)]
    for i, name in enumerate(names):
        publish_tagset(
            path, name, make_tagset(emb, info["fingerprint"], list(TASKS), seed=i + 1, length=length)
        )
    publish_ensemble(path, "chem-top3", names[:3])
    publish_ensemble(path, "chem-pair", names[3:5] if n_sets >= 5 else names[:2])
    del base, emb


@contextlib.contextmanager
def torch_threads(n: int):
    """``n`` torch threads inside the block (as a replica with ``n`` CPUs), the caller's count after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- in-process: an ensemble of 4 trials vs one member -------------------------------------------


def trial_sets(base: Any, members: int, length: int) -> dict:
    """``members`` trials of a search: the SAME stage-1 ``<SMILES>`` (every trial inherits it), their own
    ``<QED>`` and head (what each trial trained)."""
    emb = base.model.get_input_embeddings().weight
    sets = {
        f"trial{i}": make_tagset(emb, base.fingerprint, ["qed"], seed=100 + i, length=length)
        for i in range(members)
    }
    shared = sets["trial0"].tags[DOMAIN]
    for ts in sets.values():
        ts.tags[DOMAIN] = shared.clone()
    return sets


def _timed(pred: Any, reqs: list[dict], batched: bool) -> tuple[float, float]:
    """Wall and process-CPU seconds of ``pred`` answering ``reqs`` in one call (``batched``) or one call
    each, with an empty prefix store (no answer from an earlier call). CPU time is what the work costs
    this process: other jobs on shared cores stretch the wall time far more than it."""
    if pred.model.prefix_store is not None:
        pred.model.prefix_store.clear()
    t, c = time.perf_counter(), time.process_time()
    if batched:
        pred.predict(reqs)
    else:
        for r in reqs:
            pred.predict([r])
    return time.perf_counter() - t, time.process_time() - c


def _agreement(shared: Any, full: Any, single: list[dict], ens: list[dict], names: list[str]) -> dict:
    """What one ensemble call computed (prefix rows per request, positions per member row in prefix and
    suffix, and the positions a padded batch runs), and the largest differences on the first 4 requests:
    members inside the ensemble vs each member alone, shared-prefix path vs full rows."""
    before = shared.stats["prefix_rows_computed"]
    got = shared.predict(ens)
    computed = (shared.stats["prefix_rows_computed"] - before) / len(ens)
    ls, rows = dict(shared.model.last_split), len(ens) * len(names)
    prefix = ls["prefix_tokens"] / rows
    suffix = ls["tokens"] / rows - prefix
    k = min(4, len(ens))
    alone = {n: shared.predict([{**r, "tagset": n} for r in single[:k]]) for n in names}
    member = max(abs(got[i]["members"][n] - alone[n][i]["prediction"]) for n in names for i in range(k))
    ref = full.predict(ens[:k])
    split = max(abs(g["prediction"] - f["prediction"]) for g, f in zip(got[:k], ref, strict=True))
    # right-padded batches: one member pads every row to the longest; the ensemble pads the prefixes to
    # the longest prefix and runs len(names) suffixes per request (the suffix is the function tag)
    longest = max(len(shared.resolver.prepare(r).rows[0]) for r in single)
    padded_single = len(single) * longest
    padded_ens = len(single) * (longest - suffix) + rows * suffix
    return {
        "max_abs_member_vs_alone": member,
        "max_abs_shared_vs_full_rows": split,
        "checked_requests": k,
        "prefix_rows_computed_per_ensemble_request": computed,
        "positions_per_row": {"prefix": prefix, "suffix": suffix},
        "positions_model": (prefix + len(names) * suffix) / (prefix + suffix),
        "positions_model_padded": padded_ens / padded_single,
    }


def _paired(per: dict, a: str, b: str, k: int) -> list[float]:
    """Per-round ratios ``a / b`` of timing ``k`` (0 wall, 1 CPU)."""
    return [x[k] / y[k] for x, y in zip(per[a], per[b], strict=True)]


def _summarise(times: dict) -> dict:
    """Per mode: the timings and the medians of the per-round ratios to one member (CPU and wall)."""
    out: dict[str, Any] = {}
    for mode, per in times.items():
        m = out[mode] = {
            "wall_s": {v: [w for w, _ in t] for v, t in per.items()},
            "cpu_s": {v: [c for _, c in t] for v, t in per.items()},
        }
        for k, kind in ((1, "cpu"), (0, "wall")):
            m[f"ensemble_over_single_{kind}_per_round"] = r = _paired(per, "ensemble", "single", k)
            m[f"ensemble_over_single_{kind}"] = statistics.median(r)
            if "ensemble_no_sharing" in per:
                m[f"no_sharing_over_single_{kind}"] = statistics.median(
                    _paired(per, "ensemble_no_sharing", "single", k)
                )
    return out


def ensemble_micro(
    base: Any, threads: int, n: int = 16, rounds: int = 3, length: int = 10, members: int = 4
) -> dict:
    """No Serve, no HTTP: ``n`` requests of one member vs the same ``n`` requests of an ensemble of
    ``members`` trials that share their domain tag, on ``threads`` torch threads; one Predictor.

    Variants alternate (rotating order) in ``rounds`` rounds, each as one batched call and as one call per
    request, every call with an empty prefix store. One member's rows run in one piece (nothing to share:
    its cheapest path); ``ensemble_no_sharing`` runs the ensemble's rows in full (``prefix_cache_bytes=0``):
    what ``members`` members cost without the shared prefix.
    """
    from tagray.serving import Predictor

    with torch_threads(threads):
        sets = trial_sets(base, members, length)
        names = sorted(sets)
        # both hold every trial's rows in one forward pass (n * members <= max_batch_rows)
        kw = {"max_batch_rows": max(64, n * members)}
        shared = Predictor(base, sets, {"top": names}, **kw)
        full = Predictor(base, sets, {"top": names}, prefix_cache_bytes=0, **kw)
        single = [
            {"task": "qed", "tagset": names[0], "inputs": {"smiles": SMILES[i % len(SMILES)]}}
            for i in range(n)
        ]
        ens = [{"task": "qed", "ensemble": "top", "inputs": r["inputs"]} for r in single]
        check = _agreement(shared, full, single, ens, names)  # also the warm-up
        shared.predict(single)  # warm the one-piece path too
        variants = {"single": (shared, single), "ensemble": (shared, ens), "ensemble_no_sharing": (full, ens)}
        # one call per request: the latency view, without the (slow, predictable) no-sharing reference
        modes = {"batch": list(variants), "one_by_one": ["single", "ensemble"]}
        times: dict = {m: {v: [] for v in vs} for m, vs in modes.items()}
        for r in range(rounds):
            for mode, per in times.items():
                order = list(per)[r % len(per) :] + list(per)[: r % len(per)]  # rotating order
                for v in order:
                    per[v].append(_timed(*variants[v], batched=mode == "batch"))
    out: dict[str, Any] = {"base": base.name, "members": members, "requests": n, "threads": threads}
    out |= {"rounds": rounds, "tag_length": length} | check | _summarise(times)
    out["ensemble4_over_single"] = out["batch"]["ensemble_over_single_cpu"]  # one thread: CPU time = cost
    out["target_le_1.5"] = out["ensemble4_over_single"] <= 1.5
    return out


def batch_vs_single(m: dict) -> dict:
    """From :func:`ensemble_micro`'s one-member variant: its ``n`` requests in one call vs one call each,
    the most batching gives on this hardware without Serve (wall: best round of each; CPU: median of the
    per-round ratios)."""
    o, b = m["one_by_one"], m["batch"]
    s, t = min(o["wall_s"]["single"]), min(b["wall_s"]["single"])
    cpu = statistics.median([x / y for x, y in zip(o["cpu_s"]["single"], b["cpu_s"]["single"], strict=True)])
    return {
        "requests": m["requests"],
        "threads": m["threads"],
        "single_s": s,
        "batched_s": t,
        "batched_over_single": s / t,
        "batched_over_single_cpu": cpu,
    }


MARKER = "serve_ensemble"  # the docs block of render_ensemble


def render_ensemble(res: dict) -> str:
    """The docs' block of ``ensemble_micro`` (docs/serving-benchmark.md shows exactly this)."""
    m = res["ensemble_micro"]
    b, o, pos = m["batch"], m["one_by_one"], m["positions_per_row"]
    rounds = ", ".join(f"{x:.2f}" for x in b["ensemble_over_single_cpu_per_round"])
    lines = [
        f"{m['base']}, {m['threads']} torch thread(s), {m['requests']} `qed` requests, {m['members']} members "
        f"sharing `<SMILES>`, tag length {m['tag_length']}, {m['rounds']} rounds; medians of the per-round "
        "ratios:",
        "",
        "| cost ratio | one call of all requests, CPU time | same, wall time | one call per request, CPU time |",
        "|---|---:|---:|---:|",
        f"| **ensemble of {m['members']} / one member** | **{b['ensemble_over_single_cpu']:.2f}x** | "
        f"{b['ensemble_over_single_wall']:.2f}x | {o['ensemble_over_single_cpu']:.2f}x |",
        f"| ensemble without the shared prefix / one member | {b['no_sharing_over_single_cpu']:.2f}x | "
        f"{b['no_sharing_over_single_wall']:.2f}x | |",
        f"| positions run: (prefix + {m['members']} x suffix) / (prefix + suffix) | "
        f"{m['positions_model']:.2f}x | | |",
        f"| same, counting the padding of one right-padded batch | {m['positions_model_padded']:.2f}x | | |",
    ]
    med = {v: statistics.median(t) for v, t in b["cpu_s"].items()}
    verdict = "met" if m["target_le_1.5"] else "not met"
    lines += [
        "",
        f"Per round (CPU, one call): {rounds}. CPU seconds per call of all requests (median): one member "
        f"{med['single']:.2f}, ensemble {med['ensemble']:.2f}, ensemble without sharing "
        f"{med['ensemble_no_sharing']:.2f}. Per member row {pos['prefix']:.1f} prefix + {pos['suffix']:.1f} "
        f"suffix positions; prefix rows computed per ensemble request: "
        f"{m['prefix_rows_computed_per_ensemble_request']:g}. Largest differences ({m['checked_requests']} "
        f"requests): a member inside the ensemble vs alone {m['max_abs_member_vs_alone']:.1e}, shared prefix "
        f"vs full rows {m['max_abs_shared_vs_full_rows']:.1e}. Target <= 1.5x: **{verdict}**.",
    ]
    if "measure_s" in m:
        la = f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}"
        lines[-1] += (
            f" Measured in {m['measure_s']:.0f} s (1-minute load average {la} on {m.get('cpus', '?')} cores)."
        )
    for length, o in res.get("ensemble_micro_by_tag_length", {}).items():
        ob = o["batch"]
        per = ", ".join(f"{x:.2f}" for x in ob["ensemble_over_single_cpu_per_round"])
        verdict = "met" if o["target_le_1.5"] else "not met"
        lines += [
            "",
            f"The same measurement at tag length {length} (the function tags `jobs/pipeline.yaml` trains in "
            f"stage 2), run after it in the same process: ensemble of {o['members']} / one member "
            f"**{ob['ensemble_over_single_cpu']:.2f}x** (CPU, one call; per round {per}), without the shared "
            f"prefix {ob['no_sharing_over_single_cpu']:.2f}x, positions model {o['positions_model']:.2f}x "
            f"({o['positions_per_row']['prefix']:.1f} prefix + {o['positions_per_row']['suffix']:.1f} suffix "
            f"positions per member row). Target <= 1.5x at this length: **{verdict}**.",
        ]
    return "\n".join(lines)


DOCS = ROOT / "docs" / "serving-benchmark.md"


def render_docs(res: dict, path: Path = DOCS) -> None:
    """Every block below that ``path`` marks (``<!-- begin:NAME -->`` ... ``<!-- end:NAME -->``,
    bench/harness.py) rendered from ``res``."""
    from bench.harness import render_into

    blocks = {
        "serve_scenarios": lambda r: scenario_table(r, True) + "\n\n" + ratio_table(r, True),
        "serve_memory": lambda r: memory_table(r, True),
        MARKER: render_ensemble,
    }
    for name, fn in blocks.items():
        if f"<!-- begin:{name} -->" in path.read_text():
            render_into(path, name, fn(res))


# ---- workloads -------------------------------------------------------------------------------------


def compositions(catalogue: dict) -> tuple[list[dict], dict[str, int]]:
    """Every request shape the registry offers for the SMILES tasks (from ``GET /v1/tags``).

    Returns the shapes (without inputs) and the rows (ensemble members) each costs.
    """
    provides: dict[str, set[str]] = {}
    for t in catalogue["tags"]:
        if t["kind"] == "function":
            provides.setdefault(t["tagset"], set()).update(x for x in t["tasks"] if x in TASKS)
    shapes: list[dict] = []
    for task in TASKS:
        sets = sorted(s for s, ts in provides.items() if task in ts)
        shapes += [{"task": task, "tagset": s} for s in sets]
        shapes += [{"task": task, "tagset": s, "compose": {DOMAIN: d}} for s in sets for d in sets if d != s]
        for e, doc in sorted(catalogue["ensembles"].items()):
            if all(task in provides.get(m, ()) for m in doc["members"]):
                shapes.append({"task": task, "ensemble": e})
    if not shapes:
        raise SystemExit(f"the registry has no tag set for {TASKS}: nothing to benchmark")
    rows = {e: len(doc["members"]) for e, doc in catalogue["ensembles"].items()}
    return shapes, rows


def homogeneous(shapes: list[dict], n: int, offset: int = 0) -> list[dict]:
    """``n`` requests of the first plain shape (one tag set), inputs cycling over SMILES."""
    shape = next(s for s in shapes if "tagset" in s and "compose" not in s)
    return [{**shape, "inputs": {"smiles": SMILES[(offset + i) % len(SMILES)]}} for i in range(n)]


def mixed(ranked: list[dict], n: int, zipf: float, rng: random.Random, offset: int = 0) -> list[dict]:
    """``n`` requests whose shapes are Zipf(``zipf``)-popular: ``ranked[k]`` has weight ``1 / (k+1)^zipf``."""
    weights = [1 / (k + 1) ** zipf for k in range(len(ranked))]
    picks = rng.choices(ranked, weights=weights, k=n)
    return [{**s, "inputs": {"smiles": SMILES[(offset + i) % len(SMILES)]}} for i, s in enumerate(picks)]


def poisson(n: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival offsets (s) of a Poisson process of ``rate`` per second."""
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


# ---- load generator --------------------------------------------------------------------------------


async def _load(
    url: str,
    bodies: list[dict],
    concurrency: int,
    arrivals: list[float] | None,
    headers: dict,
    timeout_s: float,
) -> dict:
    """POST every body to ``/v1/predict``, at most ``concurrency`` in flight; closed loop, or each body
    released at its ``arrivals`` offset. Latency counts from the send (after any client-side wait)."""
    n = len(bodies)
    lat, wait, status, end = [math.nan] * n, [math.nan] * n, [0] * n, [0.0] * n
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as c:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            if arrivals is not None:
                await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
            due = time.perf_counter()
            async with sem:
                t = time.perf_counter()
                if arrivals is not None:  # closed loop: the wait is just the place in line, not reported
                    wait[i] = t - due
                try:
                    status[i] = (await c.post("/v1/predict", json=bodies[i])).status_code
                except httpx.HTTPError:
                    status[i] = -1
                end[i] = time.perf_counter()
                lat[i] = end[i] - t

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for p in pending:
            p.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = max([e for e in end if e] or [time.perf_counter()]) - t0
    return {"latency": lat, "wait": wait, "status": status, "wall": wall, "timed_out": len(pending)}


def load(url: str, bodies: list[dict], concurrency: int, headers: dict, **kw: Any) -> dict:
    kw.setdefault("arrivals", None)
    kw.setdefault("timeout_s", 900.0)
    return asyncio.run(_load(url, bodies, concurrency, headers=headers, **kw))


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile of the finite values (None if none)."""
    xs = sorted(x for x in xs if not math.isnan(x))
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def server_stats(url: str, headers: dict) -> dict:
    """The replica's Predictor counters (requests, rows, forward_passes) from ``/healthz``."""
    try:
        return dict(httpx.get(url + "/healthz", headers=headers, timeout=30).json().get("stats") or {})
    except (httpx.HTTPError, ValueError):
        return {}


class Scenario:
    """Accumulates rounds of one scenario: latencies, statuses, wall time, rows, server counters."""

    def __init__(self, name: str, design: str):
        self.name, self.design = name, design
        self.lat: list[float] = []
        self.wait: list[float] = []
        self.status: list[int] = []
        self.wall = 0.0
        self.rows = 0
        self.timed_out = 0
        self.server: dict[str, int] = {}
        self.rounds: list[dict] = []

    def add(self, res: dict, rows: int, before: dict, after: dict, extra: dict | None = None) -> None:
        self.lat += res["latency"]
        self.wait += res["wait"]
        self.status += res["status"]
        self.wall += res["wall"]
        self.rows += rows
        self.timed_out += res["timed_out"]
        for k in ("requests", "rows", "forward_passes"):
            if k in after and k in before:
                self.server[k] = self.server.get(k, 0) + after[k] - before[k]
        ok = sum(s == 200 for s in res["status"])
        self.rounds.append(
            {"requests": len(res["status"]), "ok": ok, "wall_s": res["wall"], "rps": ok / res["wall"]}
            | (extra or {})
        )

    def summary(self) -> dict:
        ok = sum(s == 200 for s in self.status)
        errors: dict[str, int] = {}
        for s in self.status:
            if s != 200:
                errors[str(s)] = errors.get(str(s), 0) + 1
        passes = self.server.get("forward_passes", 0)
        return {
            "design": self.design,
            "requests": len(self.status),
            "ok": ok,
            "errors": len(self.status) - ok,
            "error_statuses": errors,
            "wall_s": round(self.wall, 3),
            "rps": ok / self.wall if self.wall else 0.0,
            "rows": self.rows,
            "rows_per_request": self.rows / max(1, len(self.status)),
            "rows_per_s": self.rows / self.wall if self.wall else 0.0,
            "p50_ms": ms(pct(self.lat, 0.50)),
            "p99_ms": ms(pct(self.lat, 0.99)),
            "client_wait_p50_ms": ms(pct(self.wait, 0.50)),
            "client_wait_p99_ms": ms(pct(self.wait, 0.99)),
            "server": self.server,
            "rows_per_forward_pass": self.server.get("rows", 0) / passes if passes else None,
            "rounds": self.rounds,
        }


# ---- Ray / Serve control ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(registry: str, base: str, cpus: float, replicas: int, batch: int, version: str) -> dict:
    """Declarative config of the app; only ``deployments`` differ between phases, so Serve applies
    them in place (``reconfigure()``, scaling) instead of restarting the replica."""
    return {
        "name": APP,
        "route_prefix": "/",
        "import_path": "tagray.ray.serve:build_app",
        "args": {"registry": registry, "base": base, "dtype": "float32", "replicas": 1, "cpus": cpus},
        "deployments": [
            {
                "name": "TagModel",
                "num_replicas": replicas,
                "user_config": {"registry": registry, "max_batch_size": batch, "version": version},
            }
        ],
    }


def deploy(cfg: dict, url: str, timeout_s: float = 900) -> None:
    """Apply ``cfg`` (what ``serve deploy`` does), wait until RUNNING and the replicas report its version."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema(applications=[cfg]))
    want = cfg["deployments"][0]["user_config"]["version"]
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = serve.status().applications.get(APP)
        if st is not None and st.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy failed: {st.message}")
        if st is not None and st.status == "RUNNING":
            try:
                if httpx.get(url + "/healthz", timeout=30).json().get("version") == want:
                    return
            except (httpx.HTTPError, ValueError):
                pass
        time.sleep(0.5)
    raise TimeoutError(f"app not running with version {want!r} after {timeout_s}s")


def replica_memory(want: int, rounds: int = 30) -> dict[str, dict]:
    """``TagModel.memory()`` of every replica, calls 8 at a time so the router spreads them."""
    from ray import serve

    h = serve.get_deployment_handle("TagModel", app_name=APP)
    seen: dict[str, dict] = {}
    for _ in range(rounds):
        for r in [h.memory.remote() for _ in range(8)]:
            m = r.result(timeout_s=120)
            seen[m["replica"]] = m
        if len(seen) >= want:
            break
    return seen


def mem_row(m: dict) -> dict:
    w = m.get("weights_mapping") or {}
    return {
        "pid": m["pid"],
        "device": m.get("device"),  # on GPU the weights live in device memory: USS does not see them
        "uss": m["uss"],
        "rss": m["rss"],
        "runtime_uss": m["uss_before_base"],
        "attach_private": m["uss_after_base"] - m["uss_before_base"],
        "serving_growth": m["uss"] - m["uss_after_base"],
        "weights_path": w.get("path"),
        "weights_private": (w.get("private_clean_kb", 0) + w.get("private_dirty_kb", 0)) * 1024,
        "weights_shared": (w.get("shared_clean_kb", 0) + w.get("shared_dirty_kb", 0)) * 1024,
    }


def memory_report(one: list[dict], two: list[dict], base_bytes: int) -> dict:
    """What the second replica adds: whole-process USS, the private part of attaching the base, and
    private pages in the weights' mapping (a copy of the weights would show up there)."""
    first = {m["pid"] for m in one}
    new = [m for m in two if m["pid"] not in first] or two[-1:]
    extra = new[0]
    frac = {k: extra[k] / base_bytes for k in ("uss", "attach_private", "weights_private")}
    return {
        "base_bytes": base_bytes,
        "one_replica": one,
        "two_replicas": two,
        "first_replica_kept": bool(first & {m["pid"] for m in two}),
        "node_uss_delta": sum(m["uss"] for m in two) - sum(m["uss"] for m in one),
        "extra_replica": {
            k: extra[k] for k in ("pid", "uss", "runtime_uss", "attach_private", "weights_private")
        },
        "extra_fraction_of_base": frac,
        "target_le_10pct": {k: v <= 0.10 for k, v in frac.items()},
    }


def start_ray(tmp: str, cpus: float) -> None:
    import ray

    os.environ.update({k: v for k, v in ENV.items() if k not in os.environ})
    env = dict(ENV)
    if os.environ.get("TAGRAY_CACHE"):
        env["TAGRAY_CACHE"] = os.environ["TAGRAY_CACHE"]
    ray.init(
        address="local",  # always a fresh local instance: never join someone else's cluster
        num_cpus=max(4, math.ceil(2 * cpus) + 1),  # logical: room for 2 replicas + the ingress
        object_store_memory=2 * 1024**3,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=os.path.join(tmp, "ray"),
        runtime_env={"env_vars": env},
    )


# ---- main ------------------------------------------------------------------------------------------


def run_scenarios(a: argparse.Namespace, url: str, headers: dict, unbatched: Any) -> dict:
    """Homogeneous, mixed and unbatched, alternating in ``a.rounds`` rounds; returns their summaries.

    ``unbatched(True)`` switches batching off and returns the URL to load, ``unbatched(False)`` switches it
    back on; ``None`` skips the unbatched scenario.
    """
    cat = httpx.get(url + "/v1/tags", headers=headers, timeout=60).json()
    shapes, ens_rows = compositions(cat)
    ranked = shapes[:]
    random.Random(a.seed).shuffle(ranked)  # one popularity ranking for the whole run
    rng = random.Random(a.seed + 1)
    per = max(1, a.requests // a.rounds)
    un_per = max(1, (a.unbatched_requests or a.requests) // a.rounds)
    sc = {
        "homogeneous": Scenario("homogeneous", "one composition; closed loop"),
        "mixed": Scenario("mixed", f"Zipf({a.zipf}) over {len(shapes)} compositions; Poisson arrivals"),
        "unbatched": Scenario("unbatched", "homogeneous workload; max_batch_size=1; closed loop"),
    }
    if a.mixed_closed:  # separates the cost of mixing compositions from that of random arrivals
        sc["mixed_closed"] = Scenario("mixed_closed", "the mixed workload; closed loop")
    c = a.concurrency

    def rows_of(body: dict) -> int:
        return ens_rows.get(body.get("ensemble", ""), 1)

    def measure(name: str, at: str, bodies: list[dict], warm: list[dict], rate: float | None = None) -> None:
        load(at, warm, c, headers, timeout_s=a.timeout)  # warm-up (encoders, allocator): not counted
        before = server_stats(at, headers)
        la = os.getloadavg()[0]
        arrivals = poisson(len(bodies), rate, rng) if rate else None
        res = load(at, bodies, c, headers, timeout_s=a.timeout, arrivals=arrivals)
        extra = {"loadavg_1m": la} | ({"offered_rps": rate} if rate else {})
        sc[name].add(res, sum(map(rows_of, bodies)), before, server_stats(at, headers), extra)
        s = sc[name].rounds[-1]
        print(
            f"  {name:12s} {s['requests']:5d} requests {s['rps']:7.1f} req/s  (load avg {la:.1f})", flush=True
        )

    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", flush=True)
        off = r * per
        measure("homogeneous", url, homogeneous(shapes, per, off), homogeneous(shapes, c, 7))
        # default: offer more than the homogeneous capacity, so the achieved rate is mixed's capacity
        rate = a.rate or a.rate_factor * sc["homogeneous"].rounds[-1]["rps"]
        warm = mixed(ranked, c, a.zipf, random.Random(a.seed + 99), 7)
        measure("mixed", url, mixed(ranked, per, a.zipf, rng, off), warm, rate=rate)
        if a.mixed_closed:
            measure(
                "mixed_closed", url, mixed(ranked, per, a.zipf, random.Random(a.seed + 1000 + r), off), warm
            )
        if unbatched is not None:
            at = unbatched(True)
            measure("unbatched", at, homogeneous(shapes, un_per, off), homogeneous(shapes, c, 7))
            unbatched(False)
    out: dict[str, Any] = {k: v.summary() for k, v in sc.items() if v.status}
    out["_workload"] = {
        "compositions": len(shapes),
        "homogeneous": homogeneous(shapes, 1)[0],
        "most_popular": ranked[:5],
    }
    return out


def ratios(sc: dict) -> dict:
    """Throughput ratios over all rounds, and the median of the per-round (paired) ratios, which a change
    of background load during the run distorts less."""
    h, m, u = sc.get("homogeneous"), sc.get("mixed"), sc.get("unbatched")
    out: dict[str, Any] = {}

    def paired(num: dict, den: dict) -> list[float]:
        return [x["rps"] / y["rps"] for x, y in zip(num["rounds"], den["rounds"], strict=False) if y["rps"]]

    if h and m and h["rps"]:
        out["mixed_over_homogeneous_rps"] = m["rps"] / h["rps"]
        out["mixed_over_homogeneous_rows_per_s"] = m["rows_per_s"] / h["rows_per_s"]
        out["mixed_over_homogeneous_rps_per_round"] = paired(m, h)
        out["mixed_over_homogeneous_rps_median_round"] = statistics.median(paired(m, h))
    mc = sc.get("mixed_closed")
    if h and mc and h["rps"]:
        out["mixed_closed_over_homogeneous_rps"] = mc["rps"] / h["rps"]
        out["mixed_closed_over_homogeneous_rows_per_s"] = mc["rows_per_s"] / h["rows_per_s"]
        out["mixed_closed_over_homogeneous_rps_per_round"] = paired(mc, h)
    if h and u and u["rps"]:
        out["batched_over_unbatched_rps"] = h["rps"] / u["rps"]
        out["batched_over_unbatched_rps_per_round"] = paired(h, u)
        out["batched_over_unbatched_rps_median_round"] = statistics.median(paired(h, u))
    out["targets"] = {
        "mixed_over_homogeneous_rps>=0.9": out.get("mixed_over_homogeneous_rps", 0) >= 0.9 if m else None,
        "batched_over_unbatched_rps>=2": out.get("batched_over_unbatched_rps", 0) >= 2 if u else None,
    }
    return out


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def scenario_table(res: dict, markdown: bool = False) -> str:
    """One row per scenario: requests, req/s, rows/s, p50 / p99 latency, errors, rows per forward pass."""
    from bench.harness import table

    rows = [
        {
            "name": f"{name} ({s['design']})" if markdown else name,
            "requests": str(s["requests"]),
            "rps": f"{s['rps']:.2f}",
            "rows_s": f"{s['rows_per_s']:.2f}",
            "p50": _num(s["p50_ms"], ".0f"),
            "p99": _num(s["p99_ms"], ".0f"),
            "errors": str(s["errors"]),
            "rpp": _num(s["rows_per_forward_pass"], ".2f"),
        }
        for name, s in res["scenarios"].items()
        if not name.startswith("_")
    ]
    heads = ("scenario", "requests", "req/s", "rows/s", "p50 ms", "p99 ms", "errors", "rows / forward pass")
    return table(rows, [(h, k, "") for h, k in zip(heads, rows[0], strict=True)], markdown)


def ratio_table(res: dict, markdown: bool = False) -> str:
    """The throughput ratios over all rounds and per round, against their targets."""
    from bench.harness import table

    r, rows = res["ratios"], []

    def add(what: str, key: str, target: str = "", extra: str = "") -> None:
        if key in r:
            per = r.get(f"{key}_per_round", [])
            median = f" (median {statistics.median(per):.2f})" if per else ""
            rounds = ", ".join(f"{x:.2f}" for x in per) + median
            rows.append({"what": what, "all": f"{r[key]:.2f}{extra}", "rounds": rounds, "target": target})

    add("mixed / homogeneous, req/s", "mixed_over_homogeneous_rps", ">= 0.9")
    add("mixed / homogeneous, rows/s", "mixed_over_homogeneous_rows_per_s")
    if "mixed_closed_over_homogeneous_rps" in r:
        rows_s = f" ({r['mixed_closed_over_homogeneous_rows_per_s']:.2f})"
        add("mixed_closed / homogeneous, req/s (rows/s)", "mixed_closed_over_homogeneous_rps", "", rows_s)
    add("batched / unbatched, req/s", "batched_over_unbatched_rps", ">= 2")
    mi = res.get("predictor_micro")
    if mi:
        what = f"Predictor alone: {mi['requests']} requests in one call vs one by one"
        rows.append({"what": what, "all": f"{mi['batched_over_single']:.2f}x", "rounds": "", "target": ""})
    if not rows:
        return ""
    cols = [
        ("ratio", "what", ""),
        ("all rounds", "all", ""),
        ("per round", "rounds", ""),
        ("target", "target", ""),
    ]
    return table(rows, cols, markdown)


def memory_table(res: dict, markdown: bool = False) -> str:
    """Per replica, 1 then 2 on the node (MiB): USS and its parts, the weights' mapping, RSS; then what the
    extra replica adds."""
    from bench.harness import table

    m = res["memory"]
    first = {x["pid"] for x in m["one_replica"]}
    cols = {"replica 1, alone": m["one_replica"][0]}
    for x in sorted(m["two_replicas"], key=lambda x: x["pid"] not in first):
        cols["replica 1, with 2" if x["pid"] in first else "replica 2 (added)"] = x
    measures = (
        ("USS (private to the process)", "uss", ".0f"),
        ("of which: runtime before the base (Python, torch, transformers, Ray worker)", "runtime_uss", ".0f"),
        ("of which: attaching the base (tokenizer, module skeleton, imports)", "attach_private", ".0f"),
        ("of which: growth while serving (allocator, caches)", "serving_growth", ".0f"),
        ("private pages in the weights' mapping", "weights_private", ".1f"),
        ("shared resident pages in the weights' mapping", "weights_shared", ".0f"),
        ("RSS", "rss", ".0f"),
    )
    rows = [{"what": w} | {c: format(x[k] / MiB, f) for c, x in cols.items()} for w, k, f in measures]
    e, f = m["extra_replica"], m["extra_fraction_of_base"]
    return (
        table(rows, [("MiB", "what", "")] + [(c, c, "") for c in cols], markdown)
        + f"\n\nBase {m['base_bytes'] / MiB:.0f} MiB ({m['base_bytes']:,} bytes), once per node. Scaling 1 -> 2 "
        f"replicas {'kept the first replica (same PID)' if m['first_replica_kept'] else 'replaced the first one'}"
        f"; the replicas' summed USS rose by "
        f"{m['node_uss_delta'] / MiB:.0f} MiB. The extra replica adds {e['weights_private'] / MiB:.1f} MiB of "
        f"private weight pages ({f['weights_private']:.1%} of the base), {e['attach_private'] / MiB:.0f} MiB "
        f"private from attaching the base ({f['attach_private']:.0%}), {e['uss'] / MiB:.0f} MiB of USS in all "
        f"({f['uss']:.0%}); target <= 10 %."
    )


def print_table(res: dict) -> None:
    c, la = res["config"], res["machine"]["loadavg_start"][0]
    print(
        f"\n{c['model']}, concurrency {c['concurrency']}, {res['machine']['cpus']} CPUs (load avg {la:.1f})"
    )
    print(scenario_table(res) + "\n\n" + ratio_table(res))
    if res.get("ensemble_micro"):
        print(f"ensemble of 4 / one member (in-process): {res['ensemble4_over_single']:.2f}x   target <= 1.5")
    if res.get("memory") and "extra_replica" in res["memory"]:
        print("\n" + memory_table(res))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["smollm2-135m", "tiny"], default="smollm2-135m")
    p.add_argument("--requests", type=int, default=400, help="requests per scenario (all rounds)")
    p.add_argument("--unbatched-requests", type=int, default=None, help="default: --requests")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="scenarios alternate in this many rounds")
    p.add_argument("--rate", type=float, default=None, help="mixed: Poisson rate (req/s); default auto")
    p.add_argument("--rate-factor", type=float, default=1.25, help="auto rate = this x homogeneous req/s")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of composition popularity")
    p.add_argument("--tagsets", type=int, default=6)
    p.add_argument("--tag-length", type=int, default=10)
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica (torch threads)")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica (bf16 when > 0)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument(
        "--batch-wait-ms", type=float, default=None, help="user_config batch_wait_timeout_s (5 ms)"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measured load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None, help="a running app: homogeneous + mixed only")
    p.add_argument("--unbatched-url", default=None, help="with --url: an app with max_batch_size=1")
    p.add_argument("--token", default=os.environ.get("TAGRAY_SERVE_TOKEN"), help="bearer token (--url)")
    p.add_argument("--mixed-closed", action="store_true", help="also run the mixed workload closed loop")
    p.add_argument("--no-memory", action="store_true", help="skip the 1 vs 2 replica memory phase")
    p.add_argument("--no-micro", action="store_true", help="skip the in-process Predictor batch/single check")
    p.add_argument("--smoke", action="store_true", help="tiny model, 50 requests, 1 round")
    p.add_argument(
        "--ensemble-only",
        action="store_true",
        help="only the in-process ensemble-of-4 vs one-member measurement (no Ray); merged into --out",
    )
    p.add_argument("--ensemble-rounds", type=int, default=3, help="rounds of the ensemble measurement")
    p.add_argument(
        "--ensemble-requests", type=int, default=16, help="requests per call of the ensemble measurement"
    )
    p.add_argument("--render-docs", action="store_true", help="render --out's tables into the docs")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/serve_bench[_smoke].json)")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.requests, a.rounds, a.tagsets, a.tag_length = "tiny", min(a.requests, 50), 1, 5, 3
        a.ensemble_rounds = min(a.ensemble_rounds, 2)
    a.out = a.out or str(RESULTS / ("serve_bench_smoke.json" if a.smoke else "serve_bench.json"))
    return a


def write_json(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")


def _sigterm(*_: Any) -> None:
    raise KeyboardInterrupt  # run the clean-up in main's finally


def run_local(a: argparse.Namespace, res: dict, tmp: str, headers: dict) -> None:
    """Start Ray and the app, run the in-process checks, the scenarios and the memory phase into ``res``."""
    from ray import serve

    start_ray(tmp, a.cpus)
    dtype = "bfloat16" if a.gpus > 0 else "float32"  # what build_app's dtype=auto picks
    base = tiny_base_dir(os.path.join(tmp, "tiny")) if a.model == "tiny" else "smollm2-135m"
    registry = os.path.join(tmp, "registry")
    t = time.time()
    build_registry(base, registry, a.tagsets, a.tag_length, dtype)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def put(replicas: int, batch: int, version: str) -> None:
        cfg = app_config(registry, base, a.cpus, replicas, batch, version)
        cfg["args"].update(gpus=a.gpus, dtype=dtype)
        if a.batch_wait_ms is not None:
            cfg["deployments"][0]["user_config"]["batch_wait_timeout_s"] = a.batch_wait_ms / 1e3
        cfg["args"]["max_ongoing_requests"] = max(64, 2 * a.concurrency)
        deploy(cfg, url)

    def unbatched(on: bool) -> str:
        put(1, 1 if on else a.max_batch_size, "unbatched" if on else "batched")  # in place
        return url

    put(1, a.max_batch_size, "batched")
    res["startup_s"] = time.time() - t
    print(f"app up on {url} in {res['startup_s']:.0f}s ({a.model})", flush=True)
    if a.gpus == 0 and not a.no_micro:
        from tagray.ray.shared import attach_base, base_info

        m = measure_ensemble(a, res, attach_base(base_info(base, dtype)))  # the node's shared copy
        res["predictor_micro"] = mi = batch_vs_single(m)
        print(
            f"Predictor alone, {mi['requests']} requests: {mi['single_s']:.2f}s one by one, "
            f"{mi['batched_s']:.2f}s in one batch ({mi['batched_over_single']:.2f}x)",
            flush=True,
        )
    res["scenarios"] = run_scenarios(a, url, headers, unbatched)
    if not a.no_memory:
        one = list(replica_memory(1).values())
        put(2, a.max_batch_size, "two-replicas")  # scaled in place: the first replica stays
        shapes = compositions(httpx.get(url + "/v1/tags", timeout=60).json())[0]
        load(url, homogeneous(shapes, 4 * a.concurrency), a.concurrency, headers)  # both serve
        two = list(replica_memory(2).values())
        res["memory"] = (
            memory_report([mem_row(m) for m in one], [mem_row(m) for m in two], one[0]["base_bytes"])
            if len(two) == 2
            else {"error": f"reached {len(two)} of 2 replicas"}
        )


SHIPPED_FUNCTION_TAG_LENGTH = 2  # jobs/pipeline.yaml's stage-2 function tags (the paper's default is 10)


def measure_ensemble(a: argparse.Namespace, res: dict, base: Any) -> dict:
    """:func:`ensemble_micro` into ``res``: at ``--tag-length`` (``ensemble_micro`` and the headline
    ``ensemble4_over_single``), then at the shipped stage-2 function tag length
    (``ensemble_micro_by_tag_length``, ``ensemble4_over_single_by_tag_length``): the suffix every member
    adds is its function tag, so its length sets the ratio."""
    lengths = list(dict.fromkeys([a.tag_length, SHIPPED_FUNCTION_TAG_LENGTH]))
    res["ensemble_micro_by_tag_length"], res["ensemble4_over_single_by_tag_length"] = {}, {}
    for length in lengths:
        t, load_start = time.time(), os.getloadavg()
        m = ensemble_micro(
            base, max(1, int(a.cpus)), n=a.ensemble_requests, rounds=a.ensemble_rounds, length=length
        )
        m |= {"loadavg_start": load_start, "loadavg_end": os.getloadavg(), "measure_s": time.time() - t}
        m["cpus"] = os.cpu_count()
        if length == a.tag_length:
            res["ensemble_micro"], res["ensemble4_over_single"] = m, m["ensemble4_over_single"]
        else:
            res["ensemble_micro_by_tag_length"][str(length)] = m
        res["ensemble4_over_single_by_tag_length"][str(length)] = m["ensemble4_over_single"]
    print(render_ensemble(res), flush=True)
    return res["ensemble_micro"]


def ensemble_only(a: argparse.Namespace) -> int:
    """``--ensemble-only``: measure :func:`ensemble_micro` in this process (no Ray) on the real SmolLM2 (or
    the tiny model with ``--smoke``) and merge it into ``a.out``, keeping everything else there."""
    from tagray.core.base import load_base
    from tagray.core.tiny import tiny_base

    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    t = time.time()
    m = measure_ensemble(a, res, tiny_base() if a.model == "tiny" else load_base(a.model))
    m["total_s"] = time.time() - t  # with loading the base
    write_json(out, res)
    print(f"\nmerged ensemble_micro into {a.out} ({time.time() - t:.0f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.render_docs:
        render_docs(json.loads(Path(a.out).read_text()))
        print(f"rendered {a.out} into {DOCS}")
        return 0
    if a.ensemble_only:
        return ensemble_only(a)
    headers = {"Authorization": f"Bearer {a.token}"} if a.token else {}
    t_start = time.time()
    res: dict[str, Any] = {
        "config": {k: v for k, v in vars(a).items() if k != "token"},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "loadavg_start": os.getloadavg(),
        },
    }
    signal.signal(signal.SIGTERM, _sigterm)
    tmp = tempfile.mkdtemp(prefix="tagray-bench-")
    try:
        if a.url:
            url = a.url.rstrip("/")
            other = a.unbatched_url.rstrip("/") if a.unbatched_url else None
            res["scenarios"] = run_scenarios(a, url, headers, (lambda on: other) if other else None)
            res["memory"] = None  # needs the bench to own the deployment
        else:
            run_local(a, res, tmp, headers)
    finally:
        import ray

        if ray.is_initialized():
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()  # a local instance: stops every process it started, the base owner too
        shutil.rmtree(tmp, ignore_errors=True)
    res["ratios"] = ratios(res["scenarios"])
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["total_s"] = time.time() - t_start
    write_json(Path(a.out), res)
    print_table(res)
    print(f"\nwrote {a.out} ({res['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `python bench/serve_bench.py` from a checkout without `pip install -e`
    raise SystemExit(main())
