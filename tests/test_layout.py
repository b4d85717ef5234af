"""The package's shape is a contract: small modules and functions, a Ray-free core and application layer,
Ray only in thin executors that import nothing above them (README "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "tagray"
FILES = sorted(p for p in PKG.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved against the package)."""
    mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    pkg = mod.rsplit(".", 1)[0] if path.name != "__init__.py" else mod
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return out


def test_module_and_function_sizes():
    big = [f"{p.relative_to(PKG)} ({n})" for p in FILES if (n := len(p.read_text().splitlines())) > 400]
    ray_big = [
        f"{p.relative_to(PKG)} ({n})"
        for p in FILES
        if p.parent.name == "ray" and (n := len(p.read_text().splitlines())) > 250
    ]
    long_fns = []
    for p in FILES:
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno + 1 > 80
            ):
                long_fns.append(f"{p.relative_to(PKG)}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert not big, f"modules over 400 lines: {big}"
    assert not ray_big, f"tagray/ray files over 250 lines: {ray_big}"
    assert not long_fns, f"functions over 80 lines: {long_fns}"


def test_ray_only_in_executors_and_no_arrow_up():
    for p in FILES:
        rel = p.relative_to(PKG)
        imps = _imports(p)
        in_ray = rel.parts[0] == "ray"
        if not in_ray and rel.name not in ("cli.py", "cluster.py"):
            assert not any(i == "ray" or i.startswith("ray.") for i in imps), f"{rel} imports Ray"
            assert not any(i.startswith("tagray.ray") for i in imps), f"{rel} imports tagray.ray"
        if in_ray:
            above = [i for i in imps if i.startswith(("tagray.cli", "tagray.pipeline"))]
            assert not above, f"{rel} imports {above} (tagray/ray must import nothing above it)"
        if rel.parts[0] == "core":
            app = [i for i in imps if i.startswith("tagray.") and not i.startswith("tagray.core")]
            assert not app or all(i.startswith("tagray.__") or i == "tagray" for i in app), f"{rel}: {app}"
