"""Render the numbers in README.md and docs/*.md from the JSON files commands wrote (never typed by hand).

A document marks each generated block with ``<!-- render:NAME -->`` ... ``<!-- /render:NAME -->``; this
script replaces the text between the markers with :data:`SECTIONS[NAME]` applied to its JSON file.
``python bench/render.py`` rewrites every document; ``--check`` exits 1 when one is out of date (a test
runs it, so a committed JSON and its page cannot drift apart).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return (
            f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
        )
    return str(v)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(out)


def load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


# ---- sections ----------------------------------------------------------------------------------------


def _line_search(d: dict) -> str:
    rows = [
        [r["step_rms"], r["feature_shift"], r["fixed"], r["recentred"], r["refit"]] for r in d["line"]["rows"]
    ]
    return table(
        [
            "step (RMS per tag coordinate)",
            "feature shift (RMS, in feature stds)",
            "val loss: head fixed",
            "head re-centred",
            "head re-fitted (ridge)",
        ],
        rows,
    )


def _runs(runs: list[dict]) -> str:
    rows = [
        [
            r["name"],
            r["step0_val"],
            r["best_val"],
            r["best_step"],
            r["curve"][-1]["step"],
            next(iter(r["test"].values())) if r.get("test") else None,
        ]
        for r in runs
    ]
    return table(["run", "val loss step 0", "best val loss", "best step", "steps", "test (kept state)"], rows)


def _diag(key: str) -> Callable[[dict], str]:
    return lambda d: _runs(d["runs"][key]) if key in d.get("runs", {}) else "(not run)"


def _varpro(d: dict) -> str:
    v = d.get("varpro")
    if not v:
        return "(not run)"
    rows = [[c["step"], c["val"]] for c in v["curve"]]
    return table(["step (full-batch, normalised, ridge re-fit)", "val loss"], rows)


def _diag_command(a: dict) -> str:
    runs = " ".join(f"--run '{r}'" for r in a.get("run", []))
    return (
        f"python bench/diagnose.py --task {a['task']} --rows {a['rows']} --valid {a['valid']} --test {a['test']} "
        f"--p {a['p']} --only {' '.join(a['only'])} {runs}"
    )


def _diag_curves(d: dict) -> str:
    """A ``diagnose.py --run`` file: each run's validation and training-objective curves and its test."""
    rows = []
    for r in d.get("custom", []):
        by = {
            k: ", ".join(f"{c['step']}: {fmt(c[k])}" for c in r["curve"] if c[k] == c[k])
            for k in ("val", "train")
        }
        rows.append([r["name"], by["val"], by["train"], r["best_step"], next(iter(r["test"].values()))])
    probe = "; ".join(
        f"{h} step-0 ridge probe on {v['rows']} rows, lambda {fmt(v.get('lambda'))}"
        for h, v in d["probe"].items()
    )
    head = f"`{_diag_command(d['args'])}` ({probe})\n\n"
    return head + table(
        ["run", "validation loss at step", "training objective at step", "kept step", "test MSE (kept)"], rows
    )


def _main_metric(m: dict) -> tuple[str, float | None]:
    for k in ("mse", "accuracy", "loss"):
        if k in m:
            return k, m[k]
    return "-", None


def _demo(d: dict) -> str:
    """``bench/results/demo_summary.json`` (a copy of ``runs/demo/summary.json``): per stage and task the
    kept step, the step-0 and the trained test metric, and the references each must beat."""
    rows = []
    for stage, r in d.items():
        for task, m in r["test"].items():
            if not isinstance(m, dict):
                continue
            key, val = _main_metric(m)
            s0 = r.get("step0", {}).get(task, {}).get(key)
            ref = {"mse": m.get("baseline_mse"), "loss": m.get("unigram_loss")}.get(key)
            untagged = m.get("untagged_loss") if key == "loss" else None
            kept = r.get("kept_step", {}).get(task, "-")
            best = r.get("baselines_best", {}).get(task)
            expert = r.get("baselines", {}).get(task, {}).get(best, {}).get(key) if best else None
            rows.append(
                [
                    stage,
                    task,
                    f"{key}",
                    s0,
                    val,
                    kept,
                    ref,
                    untagged,
                    f"{fmt(expert)} ({best})" if best else "-",
                ]
            )
    secs = {st: r["seconds"] for st, r in d.items() if r.get("seconds")}
    took = ", ".join(f"{st} {fmt(v / 60, 3)}" for st, v in secs.items())
    if len(secs) == len(d) and len(secs) > 1:
        took += f" (all stages: {fmt(sum(secs.values()) / 60, 3)})"
    return table(
        [
            "stage",
            "task",
            "test metric",
            "step 0",
            "trained (kept state)",
            "kept step",
            "train-mean MSE / unigram LM loss",
            "untagged prompt LM loss",
            "best expert model (chosen on valid)",
        ],
        rows,
    ) + (f"\n\nStage wall time (minutes, setup to test metrics): {took}." if took else "")


def _curves(d: dict) -> str:
    """Validation loss per task at every evaluation of each demo stage (``demo_curves.json``)."""
    out = []
    for stage, hist in d.items():
        tasks = sorted(
            {k.split("/")[1] for h in hist for k in h if k.startswith("val/") and k.endswith("/loss")}
        )
        rows = [[h["step"], *[h.get(f"val/{t}/loss") for t in tasks]] for h in hist]
        out += [
            f"Stage `{stage}` (validation loss; step 0 = the untrained start):",
            "",
            table(["step", *tasks], rows),
            "",
        ]
    return "\n".join(out).rstrip()


def _search(d: dict) -> str:
    """``search_bench.json``: seconds per trial of each variant, the totals and the speed-ups."""
    c, secs = d["config"], d["seconds_per_trial"]
    variants = list(secs)
    rows = [
        [f"p={p}, lr={lr:g}", *[f"{secs[v][i]:.1f}" for v in variants]] for i, (p, lr) in enumerate(c["grid"])
    ]
    rows.append(["**total**", *[f"{d['total_s'][v]:.1f}" for v in variants]])
    met = "met" if d["speedup_shared_vs_own"] >= 3 else "missed"
    ratios = [f"shared vs own: **{d['speedup_shared_vs_own']:.2f}x** (issue 10's target, 3x: {met})"]
    if "speedup_shared_vs_off" in d:
        ratios.append(f"shared vs off: **{d['speedup_shared_vs_off']:.2f}x**")
    same = "identical" if d.get("same_results") else "**not identical**"
    return (
        table(["trial (seconds)", *variants], rows)
        + f"\n\n{'; '.join(ratios)}. Kept states' test losses {same} across variants. "
        + f"{c['trials']} trials of `{c['task']}` on {c['base']}, {c['rows']} training rows, {c['epochs']:g} "
        + f"epoch(s), {c['threads']} threads; peak RSS {d['peak_rss_bytes'] / 2**30:.1f} GiB."
    )


SECTIONS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "search-bench": ("search_bench.json", _search),
    "demo-curves": ("demo_curves.json", _curves),
    "demo-results": ("demo_summary.json", _demo),
    "diagnose-varpro": ("diagnose.json", _varpro),
    "diagnose-old-recipe": ("diagnose_old_recipe.json", _diag_curves),
    "diagnose-lr": ("diagnose_lr.json", _diag_curves),
    "diagnose-rows": ("diagnose_rows.json", _diag_curves),
    "diagnose-custom": ("diagnose.json", _diag("custom")),
    "diagnose-line": ("diagnose.json", _line_search),
    "diagnose-grid": ("diagnose.json", _diag("grid")),
    "diagnose-track": ("diagnose.json", _diag("track")),
    "diagnose-accum": ("diagnose.json", _diag("accum")),
    "diagnose-probe": ("diagnose.json", _diag("probe")),
    "diagnose-epochs": ("diagnose.json", _diag("epochs")),
}


def render_text(text: str, extra: dict[str, tuple[str, Callable[[dict], str]]] | None = None) -> str:
    sections = {**SECTIONS, **(extra or {})}

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in sections:
            raise KeyError(f"unknown render section {name!r}")
        file, fn = sections[name]
        data = load(file)
        body = fn(data) if data is not None else f"(no {file} yet: run the command above)"
        return f"<!-- render:{name} -->\n{body}\n<!-- /render:{name} -->"

    return re.sub(r"<!-- render:([\w\-]+) -->.*?<!-- /render:\1 -->", sub, text, flags=re.S)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a document is out of date")
    args = p.parse_args(argv)
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = render_text(text)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print("out of date (run python bench/render.py):", ", ".join(map(str, stale)))
        return 1
    print("rendered" if not args.check else "up to date", ", ".join(map(str, stale)) or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
