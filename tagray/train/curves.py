"""Every stage's train / validation curves, written beside its artifact as JSON and PNG."""

from __future__ import annotations

import io
import json

import fsspec


def write_curves(history: list[dict], path: str, title: str) -> None:
    """``curves.json`` (the validation history) and ``curves.png`` under ``path`` (local or s3://)."""
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    with fs.open(root + "/curves.json", "w") as f:
        json.dump(history, f, indent=1, default=float)
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(
        {k.split("/")[1] for h in history for k in h if k.startswith("val/") and k.endswith("/loss")}
    )
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(3.6 * (len(tasks) + 1), 3.0), squeeze=False)
    steps = [h["step"] for h in history]
    ax = axes[0, 0]
    ax.plot(steps[1:], [h["train_loss"] for h in history[1:]], "o-", label="train (window mean)")
    ax.plot(steps, [h["val_loss"] for h in history], "s-", label="valid (task mean)")
    ax.set_title("stage loss")
    ax.legend(fontsize=7)
    for ax, t in zip(axes[0, 1:], tasks, strict=True):
        ys = [h.get(f"val/{t}/loss") for h in history]
        ax.plot(steps, ys, "s-", color="C1")
        ax.axhline(ys[0], color="gray", ls=":", lw=1, label="step 0")
        ax.set_title(f"{t} (valid)")
        ax.legend(fontsize=7)
    for ax in axes[0]:
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with fs.open(root + "/curves.png", "wb") as f:
        f.write(buf.getvalue())
