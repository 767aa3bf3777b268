"""Comparing two runs of the method on the same image: a reference (float32, or the library) and another (half
precision, or another backend such as the ComfyUI nodes), within bounds on how far their maps and scores may
differ.

A run is anything with ``Result``'s fields ``mask`` (bool [H, W]), ``proposals`` (bool [N, H, W]), ``scores``
("generative", "discriminative", "fused": float32 [N] or None), ``index`` and ``attention`` (c, float32 [H, W] or
None): a ``refdiff.Result`` or an ``Outcome``. With ``map_dev`` = max|c_other - c_ref|:

- generative score (Eq. 9, a difference of two means of c over the same mask): |s_G,other - s_G,ref| <=
  2 map_dev, exactly, when the proposals are the same; for a threshold proposal {c >= mu}, whose pixels within
  map_dev of mu may change side, ``threshold_bound``.
- discriminative score: within a given ``s_d_tol``.

A selection is "tied" when the reference scores of two proposals are closer than the sum of their score bounds;
otherwise ("decided") the other run must select the reference run's proposal, and its mask must be the reference
mask (for threshold proposals: up to pixels where the reference map lies within map_dev of the chosen threshold).
Violations raise AssertionError naming the run.

Half precision bounds, in units of the dtype's unit roundoff u (``UNIT_ROUNDOFF``), measured on the tiny random
models of ``refdiff.testing`` (tests/test_half_precision.py says how):

- c (min-max normalised, in [0, 1]): ``MAP_TOL_U`` = 32 u, ``REFINED_MAP_TOL_U`` = 64 u for DiffSegmenter's map
  (it also multiplies by a captured self-attention matrix); measured at most 13 u (25 u refined).
- s_D (a cosine): ``S_D_TOL_U`` = 4 u (measured at most 1.03 u).
- SAM's mask-decoder logits with half weights: ``SAM_LOGIT_TOL_U`` = 16 u of the largest logit (measured 7 u).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

UNIT_ROUNDOFF: dict[torch.dtype, float] = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
MAP_TOL_U = 32.0
REFINED_MAP_TOL_U = 64.0
S_D_TOL_U = 4.0
SAM_LOGIT_TOL_U = 16.0
SLACK = 1e-5  # float32 arithmetic of the scores themselves (and score_eps in Eq. 9's denominators)


@dataclass
class Outcome:
    """One image's run in ``refdiff.Result``'s field names, for runs that do not come from ``RefDiff``."""

    mask: np.ndarray  # bool [H, W]
    proposals: np.ndarray  # bool [N, H, W]
    scores: dict[str, np.ndarray | None]  # "generative", "discriminative", "fused"
    index: int
    attention: np.ndarray | None  # c, float32 [H, W]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def threshold_bound(c: np.ndarray, mu: float, dev: float) -> float:
    """Bound on |s_G,other - s_G,ref| of the threshold-mu proposal when the maps differ by at most ``dev``.

    Pixels within dev of mu ("band", d of them) may change side; the others ("core", n per side) stay. On each
    side a mean moves by at most dev (values) plus 2 d D / n (membership), D = the largest distance of a band
    value from the core's mean: adding x values to n changes a mean by x (mean_x - mean_core) / (n + x)."""
    inside, outside = c > mu + dev, c < mu - dev
    band = ~inside & ~outside
    d = int(band.sum())
    if not inside.any() or not outside.any():
        return float("inf")
    if d == 0:
        return 2 * dev
    spread = [float(np.abs(c[band] - c[core].mean()).max()) / int(core.sum()) for core in (inside, outside)]
    return 2 * dev + 2 * d * sum(spread)


def thresholds_of(mask: np.ndarray, c: np.ndarray, thresholds: tuple[float, ...]) -> list[float]:
    """The thresholds mu whose proposal {c >= mu} is ``mask``."""
    return [mu for mu in thresholds if np.array_equal(c >= np.float32(mu), mask)]


def _score_presence(ref: Any, other: Any, name: str) -> None:
    for key in ("generative", "discriminative", "fused"):
        _check((ref.scores[key] is None) == (other.scores[key] is None),
               f"{name}: {key} scores given by one run only")


def compare_same_proposals(ref: Any, other: Any, weights: tuple[float, float], map_dev: float, s_d_tol: float,
                           name: str = "", slack: float = SLACK) -> bool:
    """SAM and cluster proposals: the same masks, scores within their bounds (``weights``: the fusion weights of
    s_G and s_D), the reference choice unless tied. Returns whether the reference choice was decided."""
    np.testing.assert_array_equal(other.proposals, ref.proposals, err_msg=f"{name}: proposals")
    if len(ref.proposals) == 0:  # nothing to score (a run may give empty scores or none)
        _check(ref.index == other.index == -1 and not other.mask.any(), f"{name}: a choice without proposals")
        return True
    _score_presence(ref, other, name)
    wg, wd = weights
    bound = 0.0
    if ref.scores["generative"] is not None:
        dev_g = float(np.abs(other.scores["generative"] - ref.scores["generative"]).max(initial=0.0))
        _check(dev_g <= 2 * map_dev + slack, f"{name}: s_G moved by {dev_g:.3g} > 2 x map deviation {map_dev:.3g}")
        bound += wg * 2 * map_dev
    if ref.scores["discriminative"] is not None:
        dev_d = float(np.abs(other.scores["discriminative"] - ref.scores["discriminative"]).max(initial=0.0))
        _check(dev_d <= s_d_tol, f"{name}: s_D moved by {dev_d:.3g} > {s_d_tol:.3g}")
        bound += wd * s_d_tol
    fused = ref.scores["fused"]
    dev_f = float(np.abs(other.scores["fused"] - fused).max())
    _check(dev_f <= bound + slack, f"{name}: fused scores moved by {dev_f:.3g} > {bound + slack:.3g}")
    _check(fused[ref.index] - fused[other.index] <= 2 * bound + slack,
           f"{name}: chose {other.index} (fused {fused[other.index]:.6g}), not tied with the reference's "
           f"{ref.index} ({fused[ref.index]:.6g})")
    others = np.delete(fused, ref.index)
    decided = bool(len(others) == 0 or fused[ref.index] - others.max() > 2 * bound + slack)
    if decided:
        _check(other.index == ref.index, f"{name}: chose {other.index}, the reference {ref.index}")
        np.testing.assert_array_equal(other.mask, ref.mask, err_msg=f"{name}: mask")
    return decided


def compare_threshold_proposals(ref: Any, other: Any, thresholds: tuple[float, ...], map_dev: float,
                                name: str = "", slack: float = SLACK) -> None:
    """Threshold proposals (Eq. 8) of maps within map_dev, proposal by proposal: the same count, each mask the
    reference's up to the band of its threshold, each s_G within ``threshold_bound`` of the reference's."""
    _check(other.proposals.shape == ref.proposals.shape,
           f"{name}: proposals {other.proposals.shape}, the reference {ref.proposals.shape}")
    _score_presence(ref, other, name)
    c = ref.attention
    for i, (prop_ref, prop) in enumerate(zip(ref.proposals, other.proposals)):
        mus = thresholds_of(prop_ref, c, thresholds)
        _check(bool(mus), f"{name}: reference proposal {i} is no threshold proposal of its map")
        band = np.zeros_like(prop_ref)
        for mu in mus:
            band |= np.abs(c - np.float32(mu)) <= map_dev
        outside = int(((prop != prop_ref) & ~band).sum())
        _check(outside == 0, f"{name}: proposal {i} (threshold {mus[0]}) differs in {outside} pixel(s) away from "
                             f"the threshold's band of {map_dev:.3g}")
        if ref.scores["generative"] is not None:
            dev = abs(float(other.scores["generative"][i]) - float(ref.scores["generative"][i]))
            bound = min(threshold_bound(c, mu, map_dev) for mu in mus)
            _check(dev <= bound + slack, f"{name}: s_G of proposal {i} moved by {dev:.3g} > {bound:.3g}")


def compare_threshold_choice(ref: Any, other: Any, thresholds: tuple[float, ...], map_dev: float, name: str = "",
                             slack: float = SLACK) -> bool:
    """Threshold proposals (Eq. 8) of maps within map_dev: the other run picks the reference threshold unless
    tied, and its mask differs from the reference mask only in that threshold's band. Returns whether decided."""
    c = ref.attention
    score_ref = {}  # threshold -> reference score and bound of its proposal
    for i, prop in enumerate(ref.proposals):
        for mu in thresholds_of(prop, c, thresholds):
            score_ref[mu] = (float(ref.scores["fused"][i]), threshold_bound(c, mu, map_dev))
    best = thresholds_of(ref.mask, c, thresholds)
    chosen = thresholds_of(other.mask, other.attention, thresholds)
    _check(bool(best and chosen), f"{name}: a chosen mask is no threshold proposal of its own map")
    s_best, b_best = score_ref[best[0]]
    # some threshold the other run may have meant is the reference best or tied with it
    _check(any(mu in score_ref and s_best - score_ref[mu][0] <= b_best + score_ref[mu][1] + slack for mu in chosen)
           or any(mu not in score_ref and threshold_bound(c, mu, map_dev) == float("inf") for mu in chosen),
           f"{name}: chose threshold {chosen}, not tied with the reference's {best}")
    decided = all(s_best - s > b_best + b + slack for mu, (s, b) in score_ref.items() if mu not in best)
    if decided:
        band = np.abs(c - np.float32(best[0])) <= map_dev
        outside = int(((other.mask != ref.mask) & ~band).sum())
        _check(outside == 0, f"{name}: mask differs in {outside} pixel(s) away from threshold {best[0]}'s band")
    return decided


__all__ = ["UNIT_ROUNDOFF", "MAP_TOL_U", "REFINED_MAP_TOL_U", "S_D_TOL_U", "SAM_LOGIT_TOL_U", "SLACK", "Outcome",
           "threshold_bound", "thresholds_of", "compare_same_proposals", "compare_threshold_proposals",
           "compare_threshold_choice"]
