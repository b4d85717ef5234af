"""Ray Data ingest (``scaling.ingest: ray_data``): the block-at-a-time split / limit / label functions keep
exactly the rows of the whole-file path (fast, no Ray), the Ray Data pipeline does too on real Ray, and
Train workers get disjoint shards whose union is the split, from a 1M-row CSV on S3 (slow)."""

from __future__ import annotations

import json
import random
import threading
import time
import zlib

import pandas as pd
import psutil
import pytest
import torch

from tagray.config import parse_pipeline, stage_hash
from tagray.core.artifacts import load_tagset
from tagray.core.errors import ConfigError
from tagray.tasks.dataset import build_task_data
from tagray.tasks.sources import rdkit_nci
from tagray.tasks.spec import load_task, parse_task
from tagray.tasks.splits import SPLITS
from tagray.tasks.stream import (
    assign_rows,
    combine_stats,
    label_rows,
    merge,
    partial_stats,
    select,
    summarize,
)

from . import factories
from .hooks import shard_log

slow = pytest.mark.slow

TASK = factories.ASSAY_TASK  # a user task over a SMILES file (the source is added per test)


def _mols_csv(tmp_path, n_valid=300, n_bad=300, seed=0):
    """NCI SMILES, exact duplicates and many invalid SMILES, shuffled: a limit must look past the
    invalid rows (the candidate set has to grow) and duplicates must be kept once."""
    smi = [r["smiles"] for r in rdkit_nci()[:n_valid]]
    rows = smi + smi[:40] + [f"C1CC(({i}" for i in range(n_bad)]
    random.Random(seed).shuffle(rows)
    fold = [
        ("train", "train", "valid", "test")[zlib.crc32(s.encode()) % 4] for s in rows
    ]  # same SMILES, same fold
    path = tmp_path / "mols.csv"
    pd.DataFrame({"smiles": rows, "fold": fold}).to_csv(path, index=False)
    return path


def _blocks(rows, seed):
    rng, out, i = random.Random(seed), [], 0
    while i < len(rows):
        j = i + rng.randint(1, 120)
        out.append(rows[i:j])
        i = j
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_block_candidates_keep_the_first_valid_rows_of_the_whole_file(tmp_path, seed):
    path = _mols_csv(tmp_path, seed=seed)
    spec = parse_task({**TASK, "source": {"path": str(path)}, "limits": {"train": 100, "test": 20}})
    whole = build_task_data(spec)
    rows = pd.read_csv(path).to_dict("records")
    blocks = _blocks(rows, seed)
    k = {"train": 60, "valid": None, "test": 12}  # too few: the invalid rows force the search to widen
    limits, widened = {"train": 100, "test": 20}, dict.fromkeys(SPLITS, 0)
    for s, limit in limits.items():
        while True:
            m = merge([summarize(spec, assign_rows(spec, b), k) for b in blocks], k)
            kept, _, reached = select(label_rows(spec, m["candidates"][s]), limit)
            if reached or m["complete"][s]:
                break
            k[s] *= 2
            widened[s] += 1
        assert [json.loads(r["_row"]) for r in kept] == whole.splits[s]
    assert widened["train"] and widened["test"], "the test must exercise the widening of the candidates"
    assert m["n"]["valid"] > 0 and sum(m["n"].values()) == len(rows)  # every row read, duplicates too


def test_split_statistics_combine_exactly_over_blocks():
    spec = load_task({"task": "qed", "limits": {"train": 200}})
    rows = build_task_data(spec).splits["train"]
    st = combine_stats([partial_stats(spec, b) for b in _blocks(rows, 3)])
    y = torch.tensor([r["_target"] for r in rows], dtype=torch.float64)
    assert st["n"] == len(rows)
    assert st["mean"] == pytest.approx(y.mean(0).tolist(), rel=1e-12)
    assert st["std"] == pytest.approx(y.std(0).tolist(), rel=1e-12)
    assert st["min"] == y.min(0).values.tolist() and st["max"] == y.max(0).values.tolist()
    chars = [spec.input_chars(r) for r in rows]
    assert st["chars"] == [min(chars), max(chars)]


def test_streaming_refuses_what_needs_every_row_and_names_the_field(tmp_path):
    from tagray.ray.ingest import ingest_task

    spec = parse_task({**TASK, "source": {"path": str(_mols_csv(tmp_path))}, "split": {"scaffold": "smiles"}})
    with pytest.raises(ConfigError) as e:
        ingest_task(spec)
    assert str(e.value).startswith("task assay.split.scaffold: ") and "ingest: local" in str(e.value)
    missing = parse_task({**TASK, "source": {"path": str(tmp_path / "nope.csv")}})
    with pytest.raises(ConfigError, match=r"^task assay.source.path: .*does not exist"):
        ingest_task(missing)


def test_ingest_is_a_scaling_key_that_keeps_existing_hashes():
    d = factories.tiny_pipeline_dict(stages=[factories.stage_dict("single", "qed")])
    local = parse_pipeline(d)
    explicit = parse_pipeline({**d, "scaling": {"ingest": "local"}})
    streamed = parse_pipeline({**d, "scaling": {"ingest": "ray_data"}})
    h = [stage_hash(c, c.stages[0]) for c in (local, explicit, streamed)]
    assert h[0] == h[1] != h[2]
    with pytest.raises(ConfigError, match="ingest"):
        parse_pipeline({**d, "scaling": {"ingest": "spark"}})


# ---- on real Ray -------------------------------------------------------------------------------------


def _rows(ds) -> list[dict]:
    return [json.loads(x) for _, x in sorted((r["_order"], r["_row"]) for r in ds.take_all())]


@slow
def test_ray_data_ingest_keeps_the_rows_of_the_whole_file_path(ray_local, tmp_path):
    from tagray.ray.ingest import ingest_task

    path = str(_mols_csv(tmp_path))
    cases = [
        {"limits": {"train": 100, "valid": 10, "test": 20}},  # candidates widen past invalid rows
        {"limits": {}},  # every row: a hash shuffle deduplicates
        {"split": {"column": "fold"}, "limits": {"test": 15}},
    ]
    for extra in cases:
        spec = parse_task({**TASK, "source": {"path": path}, **extra})
        whole = build_task_data(spec)
        _, ds, meta = ingest_task(spec)
        for s in SPLITS:
            assert _rows(ds[s]) == whole.splits[s], (extra, s)
            assert meta["rows"][s] == len(whole.splits[s])
        assert meta["dropped"] == whole.dropped, extra
        y = torch.tensor([r["_target"] for r in whole.splits["train"]], dtype=torch.float64)
        assert meta["stats"]["mean"] == pytest.approx(y.mean(0).tolist(), rel=1e-12)
    amp = load_task({"task": "amp", "limits": {"train": 40, "valid": 8, "test": 8}})
    amp = parse_task({**amp.to_json(), "target": {"kind": "classification", "column": "amp"}})  # no classes
    spec, ds, meta = ingest_task(amp)
    assert meta["classes"] == ["AMP", "UniProt"] == list(build_task_data(amp).spec.target.classes)
    assert _rows(ds["train"]) == build_task_data(amp).splits["train"]
    bad = parse_task({**TASK, "source": {"path": path}, "split": {"column": "smiles"}})
    with pytest.raises(ConfigError, match=r"^task assay.split.column: column 'smiles' has values that name"):
        ingest_task(bad)


class _PeakRSS:
    """This process's peak resident memory, sampled every 20 ms while in the ``with`` block (MiB)."""

    def __enter__(self):
        self.proc, self.start, self.peak, self.done = psutil.Process(), 0.0, 0.0, False
        self.start = self.peak = self.proc.memory_info().rss / 2**20
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.done:
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()


@slow
def test_a_million_row_csv_on_s3_streams_to_disjoint_worker_shards(
    ray_local, tiny_base_dir, s3_bucket, tmp_path
):
    import boto3

    from tagray.pipeline import plan
    from tagray.ray.train import fit_stage

    n = 1_000_000
    rng = random.Random(0)
    aa = "ACDEFGHIKLMNPQRSTVWY"
    seqs = ["".join(rng.choices(aa, k=rng.randint(12, 40))) for _ in range(n)]
    csv = "seq,y\n" + "".join(f"{s},{len(s) * 0.1 + rng.random():.4f}\n" for s in seqs)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="big/peptides.csv", Body=csv.encode())
    mb = len(csv) / 2**20
    del csv
    task = {
        "name": "peplen",
        "source": {"path": f"s3://{s3_bucket}/big/peptides.csv"},
        "fields": {"seq": {"type": "protein"}},
        "template": "<Protein> {seq} <Len>",
        "function_tag": "<Len>",
        "target": {"kind": "regression", "columns": ["y"]},
        "split": {"key": "seq", "valid": 0.1, "test": 0.1},
        "limits": {"train": 64, "valid": 8, "test": 8},
    }
    cfg = factories.tiny_pipeline(
        tiny_base_dir,
        str(tmp_path / "out"),
        name="bigcsv",
        train={"max_steps": 2},
        scaling={"num_workers": 2, "cpus_per_worker": 1, "ingest": "ray_data"},
        stages=[{"name": "single", "tasks": [task]}],
    )
    job, h, _ = plan(cfg)[0]
    with _PeakRSS() as driver:
        fit_stage(
            job,
            storage=str(tmp_path / "_ray"),
            config_hash=h,
            worker_setup=shard_log,
            extra={"shard_log": str(tmp_path / "shards")},
        )
    shards = [json.load(open(tmp_path / "shards" / f"rank{r}.json"))["peplen"] for r in (0, 1)]
    keys = [{r["seq"] for r in s} for s in shards]
    assert len(shards[0]) == len(shards[1]) == 32 and not keys[0] & keys[1], "equal, disjoint shards"
    meta = load_tagset(job.output).meta
    assert meta["sharded"] and meta["train_rows"] == {"peplen": 64} and meta["steps"] == 2
    # the union is the training split: the same 64 rows the whole-file path keeps (limits, hash order)
    assigned = assign_rows(parse_task(task), [{"seq": s} for s in seqs])
    split = sorted((r["_order"], r["seq"]) for r in assigned if r["_split"] == "train")[:64]
    assert keys[0] | keys[1] == {s for _, s in split}
    ing = meta["ingest"]["peplen"]
    data_rss = ing["peak_rss_mb"]["data_tasks"]
    print(
        f"\n{n:,}-row CSV ({mb:.0f} MiB) on S3, read in {ing['blocks']} blocks: driver RSS {driver.start:.0f}"
        f" -> peak {driver.peak:.0f} MiB, Ray Data tasks peak {data_rss:.0f} MiB, train worker (rank 0) peak"
        f" {meta['peak_rss_mb']:.0f} MiB"
    )
    # no task held the file as one block, and the driver never held its rows: a million Python dicts
    # alone take more than 180 MiB (a dict is over 180 bytes), over five times this file on disk
    assert ing["blocks"] >= 4, ing
    assert driver.peak - driver.start < 3 * mb, (driver.start, driver.peak)
    assert data_rss < 500, data_rss
    assert meta["peak_rss_mb"] < 1000, meta["peak_rss_mb"]
