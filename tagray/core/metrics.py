"""Metrics: MSE / MAE / Pearson / Spearman for regression, accuracy, perplexity, BLEU (sacrebleu, local)."""

from __future__ import annotations

import math

import torch


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    uniq, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inv, ranks)
    counts = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inv, torch.ones_like(x))
    return (sums / counts)[inv]


def pearson(p: torch.Tensor, y: torch.Tensor) -> float:
    p, y = p.double() - p.double().mean(), y.double() - y.double().mean()
    den = (p.norm() * y.norm()).item()
    return float((p @ y).item() / den) if den > 0 else 0.0


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``pred``, ``target``: ``(N,)`` in the target's units."""
    pred, target = pred.double().flatten(), target.double().flatten()
    return {
        "mse": float(((pred - target) ** 2).mean()),
        "mae": float((pred - target).abs().mean()),
        "pearson": pearson(pred, target),
        "spearman": pearson(_rank(pred), _rank(target)),
    }


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((pred.flatten().long() == target.flatten().long()).double().mean())}


def lm_metrics(total_loss: float, n_tokens: int) -> dict[str, float]:
    loss = total_loss / max(n_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def bleu(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU with sacrebleu's default 13a tokenizer; computed locally, nothing is downloaded."""
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score)}
