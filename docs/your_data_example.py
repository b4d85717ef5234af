"""The worked example of docs/your-data.md, end to end; it writes every number the doc shows.

    .venv/bin/python docs/your_data_example.py                 # data + baselines (+ Tag-LLM if possible)
    .venv/bin/python docs/your_data_example.py --steps data,baseline
    .venv/bin/python docs/your_data_example.py --steps train,eval,serve --init-from runs/demo/single

Steps (run from the repository root):
- ``data``: a user CSV from real measurements that ship with RDKit (ChEMBL assay CHEMBL2321810, 1,017
  pIC50 values, ``rdkit/Contrib/FreeWilson/data``), plus the task and pipeline YAML, in ``runs/pic50-data/``;
- ``baseline``: ``tagray baseline runs/pic50-data/pic50.yaml`` on the task's scaffold split;
- ``train``: ``tagray pipeline runs/pic50-data/pipeline.yaml --local`` (one stage from the demo artifact);
- ``eval``: ``tagray eval`` on the test split; ``serve``: ``tagray serve`` and one ``POST /v1/predict``.

Results go to ``docs/your-data.json`` and are rendered into docs/your-data.md between
``<!-- generated:NAME -->`` markers. Steps that need the demo artifact are skipped (and say so) without it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "your-data.md"
RESULTS = ROOT / "docs" / "your-data.json"
WORK = "runs/pic50-data"  # inputs (CSV, YAML), relative to the repository root as the YAML names them
RUN = "runs/your-data"  # the pipeline's output: <output>/<name>/<stage>
EXAMPLE_SMILES = "Cc1cnc(NS(=O)(=O)c2ccc(Oc3ccccc3-c3ccccc3)c(C#N)c2)s1"
PORT = 8011

TASK_YAML = f"""\
name: pic50
description: "pIC50 of a ChEMBL sulfonamide series (assay CHEMBL2321810, shipped with RDKit)"
source: {{path: {WORK}/chembl2321810.csv}}          # columns: smiles, chembl_id, pic50
fields: {{smiles: {{type: smiles}}}}
template: "# # Input: The SMILES of the molecule is <SMILES> {{smiles}}. # # Output: The pIC50 is <pIC50>"
function_tag: <pIC50>
target: {{kind: regression, columns: [pic50]}}
metrics: [mse, mae, pearson, spearman]
split: {{scaffold: smiles, valid: 0.1, test: 0.2}}   # whole Bemis-Murcko scaffolds per split
max_length: 192
"""

PIPELINE_YAML = f"""\
name: your-data
base: smollm2-135m
output: runs                      # the artifact lands in runs/your-data/pic50/
registry: auto                    # and is published to runs/registry as tag set "your-data"
# the demo's stage-2 recipe (docs/training.md): a 2-vector function tag moved down the leave-one-out
# error of its ridge head, all training rows in one step (batch_size >= the split)
train: {{tag_length: 2, head_mode: varpro, optimizer: ngd, lr: 3.0e-4, batch_size: 1024, epochs: 4,
        eval_every: 1, eval_rows: 200, prefix_cache_gb: 6}}
scaling: {{num_workers: 1, cpus_per_worker: 2}}
stages:
  - name: pic50
    init_from: runs/demo/single   # the demo's artifact: its trained <SMILES> domain tag
    tasks: [{WORK}/pic50.yaml]
    train_tags: [<pIC50>]         # only the new function tag (and its head) learns
"""


def make_data() -> dict:
    """The CSV (smiles, chembl_id, pic50) from RDKit's copy of the ChEMBL assay, and the two YAML files."""
    from rdkit import RDConfig

    src = Path(RDConfig.RDContribDir) / "FreeWilson" / "data"
    with open(src / "CHEMBL2321810_act.csv") as f:
        act = {r["Name"]: r["Act"] for r in csv.DictReader(f)}
    rows = []
    for line in (src / "CHEMBL2321810.smi").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] in act:
            rows.append({"smiles": parts[0], "chembl_id": f"CHEMBL{parts[1]}", "pic50": act[parts[1]]})
    work = ROOT / WORK
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "chembl2321810.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["smiles", "chembl_id", "pic50"])
        w.writeheader()
        w.writerows(rows)
    (work / "pic50.yaml").write_text(TASK_YAML)
    (work / "pipeline.yaml").write_text(PIPELINE_YAML)
    return {"rows": len(rows), "csv": f"{WORK}/chembl2321810.csv", "head": rows[:3]}


def run_baselines() -> dict:
    """``tagray baseline`` on the task (its scaffold split), read back from the JSON it writes."""
    out = f"{WORK}/baselines.json"
    _tagray("baseline", f"{WORK}/pic50.yaml", "--output", out)
    return json.loads((ROOT / out).read_text())


def _tagray(*args: str, timeout: int = 7200) -> str:
    cmd = [sys.executable, "-m", "tagray.cli", *args]
    print("+ tagray", " ".join(args), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise SystemExit(f"tagray {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out.stdout


def run_train(init_from: str) -> dict:
    cfg = ROOT / WORK / "pipeline.yaml"
    t = time.time()
    out = _tagray("pipeline", str(cfg), "--local", "--set", f"stages.0.init_from={init_from}")
    return {"seconds": time.time() - t, "summary": out.strip().splitlines()[-12:]}


def run_eval() -> dict:
    out = _tagray("eval", f"{RUN}/pic50", "--task", f"{WORK}/pic50.yaml", "--split", "test")
    return json.loads(out[out.index("{") :])["pic50"]


def run_serve() -> dict:
    """``tagray serve`` on the registry, one prediction over HTTP, then SIGTERM."""
    registry = str(ROOT / "runs" / "registry")
    cmd = [sys.executable, "-m", "tagray.cli", "serve", "--registry", registry, "--port", str(PORT)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{PORT}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                    if json.load(r).get("status") == "ok":
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit("tagray serve did not become healthy")
            time.sleep(2)
        body = {"task": "pic50", "tagset": "your-data", "inputs": {"smiles": EXAMPLE_SMILES}}
        req = urllib.request.Request(
            f"{url}/v1/predict", json.dumps(body).encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return {"request": body, "response": json.load(r)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def _table(res: dict) -> str:
    from tagray.baselines import format_baselines

    return "```\n" + format_baselines(res) + "\n```"


def _tagllm(results: dict) -> str:
    ev, base = results.get("eval"), results.get("baseline")
    if not ev:
        return (
            "_Not run yet: this needs the demo artifact (`make demo`), then_ "
            "`.venv/bin/python docs/your_data_example.py --steps train,eval,serve`."
        )
    rows = [("Tag-LLM `<pIC50>` (SmolLM2-135M)", ev)]
    if base:
        rows += [
            (f"best baseline ({base['best']})", base["models"][base["best"]]["test"]),
            ("train mean", base["models"]["mean"]["test"]),
        ]
    lines = ["| model (test split) | MSE | MAE | Pearson | Spearman |", "|---|---|---|---|---|"]
    for name, m in rows:
        cells = [("-" if m.get(k) is None else f"{m[k]:.3f}") for k in ("mse", "mae", "pearson", "spearman")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    took = results.get("train", {}).get("seconds")
    note = f"; training took {took / 60:.0f} min" if took else ""
    verdict = ""
    if base and ev.get("mse") is not None:
        best = base["models"][base["best"]]["test"].get("mse")
        if best is not None:
            who = "the tag beats" if ev["mse"] < best else "the tag loses to"
            verdict = (
                f" On test MSE {who} the best expert baseline at this budget (issue 9 tracks the recipe)."
            )
    return "\n".join(lines) + f"\n\n{ev.get('n', '?')} test rows{note}.{verdict}"


def _served(results: dict) -> str:
    s = results.get("serve")
    if not s:
        return "_Not run yet (see above)._"
    return (
        "```bash\ncurl -s localhost:8000/v1/predict -H 'content-type: application/json' -d '"
        + json.dumps(s["request"])
        + "'\n# "
        + json.dumps(s["response"])
        + "\n```"
    )


def render(results: dict) -> None:
    """Replace each ``<!-- generated:NAME -->`` ... ``<!-- /generated:NAME -->`` block of the doc."""
    blocks = {
        "data": f"{results['data']['rows']} molecules; the first rows of `{results['data']['csv']}`:\n\n```\n"
        + "smiles,chembl_id,pic50\n"
        + "\n".join(f"{r['smiles']},{r['chembl_id']},{r['pic50']}" for r in results["data"]["head"])
        + "\n```",
        "task_yaml": f"`{WORK}/pic50.yaml`:\n\n```yaml\n{TASK_YAML}```",
        "pipeline_yaml": f"`{WORK}/pipeline.yaml`:\n\n```yaml\n{PIPELINE_YAML}```",
        "baselines": _table(results["baseline"]) if "baseline" in results else "_Not run yet._",
        "tagllm": _tagllm(results),
        "served": _served(results),
    }
    text = DOC.read_text()
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- generated:{name} -->\n).*?(\n<!-- /generated:{name} -->)", re.S)
        if not pat.search(text):
            raise SystemExit(f"{DOC}: no generated:{name} block")
        text = pat.sub(lambda m, b=body: m.group(1) + b + m.group(2), text)
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="data,baseline,train,eval,serve")
    ap.add_argument("--init-from", default="runs/demo/single", help="tag set the pIC50 stage starts from")
    args = ap.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    steps = args.steps.split(",")
    from tagray.baselines import format_baselines

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["data"] = make_data()  # cheap, and every other step reads its files
    if "baseline" in steps:
        results["baseline"] = run_baselines()
        print(format_baselines(results["baseline"]))
    have_init = (ROOT / args.init_from / "tagset.json").exists()
    if {"train", "eval", "serve"} & set(steps) and not have_init:
        print(f"skipping train/eval/serve: no tag set at {args.init_from} (run `make demo` first)")
    elif have_init:
        if "train" in steps:
            results["train"] = run_train(args.init_from)
        if "eval" in steps:
            results["eval"] = run_eval()
        if "serve" in steps:
            results["serve"] = run_serve()
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    render(results)
    print(f"wrote {RESULTS.relative_to(ROOT)} and {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
