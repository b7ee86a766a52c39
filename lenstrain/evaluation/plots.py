"""Figures for TensorBoard and evaluation reports (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def pred_vs_true(pred: np.ndarray, true: np.ndarray, name: str):
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.scatter(true, pred, s=6, alpha=0.5)
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel(f"true {name}")
    ax.set_ylabel(f"predicted {name}")
    ax.set_title("predicted vs true")
    fig.tight_layout()
    return fig


def roc_and_confusion(probs: np.ndarray, true: np.ndarray, classes: list[str]):
    from sklearn.metrics import confusion_matrix, roc_curve

    fig, (ax_roc, ax_cm) = plt.subplots(1, 2, figsize=(9, 4.2), dpi=100)
    for k, name in enumerate(classes):
        if (true == k).any() and (true != k).any():
            fpr, tpr, _ = roc_curve(true == k, probs[:, k])
            ax_roc.plot(fpr, tpr, label=name)
    ax_roc.plot([0, 1], [0, 1], "k--", lw=1)
    ax_roc.set_xlabel("false positive rate")
    ax_roc.set_ylabel("true positive rate")
    ax_roc.legend(loc="lower right")
    ax_roc.set_title("ROC (one vs rest)")
    cm = confusion_matrix(true, probs.argmax(-1), labels=list(range(len(classes))))
    ax_cm.imshow(cm, cmap="Blues")
    ax_cm.set_xticks(range(len(classes)), classes, rotation=45)
    ax_cm.set_yticks(range(len(classes)), classes)
    for (i, j), v in np.ndenumerate(cm):
        ax_cm.text(j, i, str(v), ha="center", va="center")
    ax_cm.set_xlabel("predicted")
    ax_cm.set_ylabel("true")
    ax_cm.set_title("confusion")
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path)
    plt.close(fig)
