"""Copy what the last `make demo` wrote into the committed results, for bench/render.py.

    .venv/bin/python bench/collect_demo.py [--run runs/demo] && .venv/bin/python bench/render.py

- ``runs/demo/summary.json``         -> ``bench/results/demo_summary.json`` (README Results)
- ``runs/demo/<stage>/curves.json``  -> ``bench/results/demo_curves.json`` (docs/training.md)
- ``runs/demo/<stage>/curves.png``   -> ``docs/img/demo_<stage>_curves.png``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(ROOT / "runs" / "demo"))
    args = p.parse_args(argv)
    run = Path(args.run)
    summary = run / "summary.json"
    if not summary.exists():
        print(f"run: {summary} not found (run `make demo` first)", file=sys.stderr)
        return 2
    results = ROOT / "bench" / "results"
    d = json.loads(summary.read_text())
    (results / "demo_summary.json").write_text(json.dumps(d, indent=1))
    curves = {}
    for stage in d:
        c = run / stage / "curves.json"
        if c.exists():
            curves[stage] = json.loads(c.read_text())
        png = run / stage / "curves.png"
        if png.exists():
            shutil.copy(png, ROOT / "docs" / "img" / f"demo_{stage}_curves.png")
    (results / "demo_curves.json").write_text(json.dumps(curves, indent=1))
    print(f"wrote {results / 'demo_summary.json'} and demo_curves.json ({', '.join(curves)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
