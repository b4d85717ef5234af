"""Tiny pipeline configs for tests: the dict ``tagray.config.parse_pipeline`` reads, and its parsed form.

Plain data and tagray imports only: ``tests/scripts/multinode_stage.py`` imports this module too (with the
repository root on its path), outside pytest.
"""

from __future__ import annotations

from typing import Any

from tagray.config import PipelineConfig, parse_pipeline

SMALL = {"train": 16, "valid": 4, "test": 4}
"""Rows per split of a tiny task."""

ASSAY_TASK = {
    "name": "assay",
    "fields": {"smiles": {"type": "smiles"}},
    "derive": {"logp": {"fn": "rdkit.logp", "args": ["smiles"]}},
    "template": "The molecule <SMILES> {smiles} has activity <Act>",
    "function_tag": "<Act>",
    "target": {"kind": "regression", "columns": ["logp"]},
}
"""A user task over a SMILES file with a derived label (add ``source``): a user's regression CSV."""

TINY_TRAIN = {
    "max_steps": 2,
    "eval_every": 2,
    "batch_size": 2,
    "eval_rows": 4,
    "tag_length": 2,
    "probe_rows": 8,
}
"""Training settings of a tiny stage: two steps and one evaluation on a few rows."""


def stage_dict(name: str, *tasks: str, limits: dict | None = None, **extra: Any) -> dict:
    """A stage of ``tasks``, each limited to ``limits`` rows per split (default ``SMALL``); ``extra``: other
    stage keys (``train_tags``, ``untrained_tags``, ...)."""
    limits = dict(SMALL) if limits is None else limits
    return {"name": name, "tasks": [{"task": t, "limits": limits} for t in tasks], **extra}


def tiny_pipeline_dict(
    base: str | None = None,
    output: str | None = None,
    *,
    name: str = "t",
    stages: list[dict] | None = None,
    train: dict | None = None,
    tiny_train: bool = True,
    scaling: dict | None = None,
    **top: Any,
) -> dict:
    """A pipeline dict: ``stages`` (default: a ``smiles_lm`` domain stage, then a ``qed`` single stage) with
    ``train`` merged over ``TINY_TRAIN`` (``tiny_train=False``: ``train`` alone, the library's defaults for
    the rest). ``base``, ``output`` and ``scaling`` are left out when not given (the library's defaults);
    ``top``: other top-level keys (``registry``, ``tune``, ...)."""
    d: dict[str, Any] = {"name": name}
    if base is not None:
        d["base"] = base
    if output is not None:
        d["output"] = output
    d["train"] = {**(TINY_TRAIN if tiny_train else {}), **(train or {})}
    if scaling is not None:
        d["scaling"] = scaling
    d["stages"] = (
        stages if stages is not None else [stage_dict("domain", "smiles_lm"), stage_dict("single", "qed")]
    )
    return {**d, **top}


def tiny_pipeline(base: str | None = None, output: str | None = None, **kw: Any) -> PipelineConfig:
    """``parse_pipeline(tiny_pipeline_dict(base, output, **kw))``."""
    return parse_pipeline(tiny_pipeline_dict(base, output, **kw))
