"""Referring segmentation metrics: per-sentence IoU, mIoU, oIoU and Pr@X.

Conventions (those of the common RIS evaluation code, e.g. LAVT/CRIS): IoU = I / U, and 0 when U = 0 (both
masks empty), counted like any other sentence; mIoU is the mean of per-sentence IoUs (not area weighted);
oIoU = sum I / sum U; Pr@X is the fraction of sentences with IoU >= X. Metrics are reported in percent.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError

PR_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, float]:
    """Intersection, union and IoU of two boolean masks of the same shape (IoU 0 when the union is empty)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise InputError(f"prediction of shape {pred.shape} does not match the ground truth {gt.shape}")
    inter = int(np.count_nonzero(pred & gt))
    union = int(np.count_nonzero(pred | gt))
    return inter, union, (inter / union if union > 0 else 0.0)


def pr_key(threshold: float) -> str:
    """Name of a precision column: 0.5 -> 'Pr@0.5'."""
    return f"Pr@{threshold:g}"


def summarize_ious(ious: Sequence[float], inters: Sequence[int], unions: Sequence[int],
                   thresholds: Sequence[float] = PR_THRESHOLDS) -> dict[str, float | int | None]:
    """mIoU, oIoU and Pr@X in percent, plus n; metrics are None when there is no sentence."""
    iou = np.asarray(ious, dtype=np.float64)
    n = int(iou.size)
    out: dict[str, float | int | None] = {"n": n}
    if n == 0:
        out.update({"mIoU": None, "oIoU": None, **{pr_key(t): None for t in thresholds}})
        return out
    total_i = int(np.sum(np.asarray(inters, dtype=np.int64)))
    total_u = int(np.sum(np.asarray(unions, dtype=np.int64)))
    out["mIoU"] = 100.0 * float(iou.mean())
    out["oIoU"] = 100.0 * (total_i / total_u) if total_u > 0 else 0.0
    for t in thresholds:
        out[pr_key(t)] = 100.0 * float(np.mean(iou >= t))
    out["inter"] = total_i
    out["union"] = total_u
    return out


__all__ = ["PR_THRESHOLDS", "mask_iou", "pr_key", "summarize_ious"]
