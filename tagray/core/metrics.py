"""Metrics: MSE / MAE / Pearson / Spearman for regression; accuracy, ROC-AUC, F1 for classification;
perplexity and BLEU (sacrebleu, local) for LM tasks. Pure torch: the serving path needs no scikit-learn.
"""

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


def roc_auc(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Binary ROC-AUC of ``scores (N,)`` (higher = positive) against ``target (N,)`` in {0, 1}.

    The Mann-Whitney U statistic with average ranks, so tied scores count one half (as scikit-learn's
    ``roc_auc_score``). NaN when ``target`` holds a single class: the AUC is undefined there.
    """
    s, y = scores.double().flatten(), target.flatten().long()
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _rank(s)
    return float((r[y == 1].sum() - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg))


def f1(pred: torch.Tensor, target: torch.Tensor, n_classes: int, positive: int = 1) -> float:
    """F1 of class ``positive`` when ``n_classes == 2``, else the macro mean over classes.

    A class that is neither predicted nor present scores 0 (scikit-learn's ``zero_division=0``) and,
    in the macro mean, only classes present in ``target`` or ``pred`` are averaged.
    """
    p, y = pred.flatten().long(), target.flatten().long()

    def one(c: int) -> float:
        tp = int(((p == c) & (y == c)).sum())
        den = int((p == c).sum()) + int((y == c).sum())
        return 2 * tp / den if den else 0.0

    if n_classes == 2:
        return one(positive)
    present = sorted(set(p.tolist()) | set(y.tolist()))
    return sum(one(c) for c in present) / max(1, len(present))


def classification_metrics(probs: torch.Tensor, target: torch.Tensor, positive: int = 1) -> dict[str, float]:
    """Accuracy, ROC-AUC and F1 from class probabilities (or any scores) ``probs (N, C)``.

    Binary (``C == 2``): ROC-AUC of ``probs[:, positive]`` and the F1 of class ``positive``. Multi-class:
    macro one-vs-rest ROC-AUC over the classes present in ``target`` (each needs positives and negatives)
    and macro F1. Predictions are ``probs.argmax(1)``.
    """
    probs, y = probs.double(), target.flatten().long()
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    if n_classes == 2:
        auc = roc_auc(probs[:, positive], y == positive)
    else:
        aucs = [roc_auc(probs[:, c], y == c) for c in range(n_classes)]
        aucs = [a for a in aucs if a == a]
        auc = sum(aucs) / len(aucs) if aucs else float("nan")
    return {**accuracy(pred, y), "roc_auc": auc, "f1": f1(pred, y, n_classes, positive)}


def lm_metrics(total_loss: float, n_tokens: int) -> dict[str, float]:
    loss = total_loss / max(n_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def bleu(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU with sacrebleu's default 13a tokenizer; computed locally, nothing is downloaded."""
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score)}
