"""Scores of proposals: generative matching (Eq. 9), fusion (Eq. 1, 2), ranking and selection
(docs/METHOD.md sections 7 and 9). ``fuse_and_select`` is the one assembly of fusion and selection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import Preset
from .errors import InputError


def _check_scores(scores: torch.Tensor, name: str) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        desc = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise InputError(f"{name}: expected a 1-D tensor [N], got {desc}")


def generative_scores(c: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 9: s_G(i) = mean of c inside M_i - mean of c outside M_i (eps in both denominators), float32 [N].

    A mask covering the whole image has an outside mean of 0 / eps = 0. Computed as two mask-by-map
    products, so it costs two [N, H*W] float buffers at a time.
    """
    if not isinstance(c, torch.Tensor) or c.dim() != 2:
        raise InputError(f"generative map: expected a 2-D tensor [H, W], got "
                         f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.dim() != 3:
        raise InputError("masks: expected a bool tensor [N, H, W]")
    if masks.shape[1:] != c.shape:
        raise InputError(f"masks are {tuple(masks.shape[1:])} but the generative map is {tuple(c.shape)}; "
                         "both must be at the image's resolution")
    if torch.isnan(c).any():
        raise InputError("generative map: contains NaN; recompute it from a finite attention map")
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=c.device)
    cf = c.reshape(-1).to(torch.float32)
    m = masks.reshape(n, -1).to(device=c.device, dtype=torch.float32)
    area = m.sum(dim=1)
    inside = m @ cf
    m.neg_().add_(1.0)  # now the complement, reusing the buffer
    outside = m @ cf
    out_area = cf.numel() - area
    return inside / (area + eps) - outside / (out_area + eps)


def fuse_scores(generative: torch.Tensor | None, discriminative: torch.Tensor | None, gen_weight: float = 0.05,
                disc_weight: float = 1.0) -> torch.Tensor:
    """Eq. 1/2: s = gen_weight * s_G + disc_weight * s_D; a None term is left out (variant G, GS or DS)."""
    terms = []
    if generative is not None:
        _check_scores(generative, "generative scores")
        terms.append(gen_weight * generative.to(torch.float32))
    if discriminative is not None:
        _check_scores(discriminative, "discriminative scores")
        terms.append(disc_weight * discriminative.to(torch.float32))
    if not terms:
        raise InputError("fuse_scores: both the generative and the discriminative scores are None; "
                         "give at least one")
    if len(terms) == 2 and terms[0].shape != terms[1].shape:
        raise InputError(f"generative scores {tuple(generative.shape)} and discriminative scores "
                         f"{tuple(discriminative.shape)} must score the same proposals")
    return terms[0] if len(terms) == 1 else terms[0] + terms[1].to(terms[0].device)


def rank(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the min(k, N) best scores, best first; ties keep the lower index first. NaN scores count
    as -inf (ranked last) so that a broken score can never win."""
    _check_scores(scores, "scores")
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}")
    clean = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    return torch.sort(clean, descending=True, stable=True).indices[:k]


def select_mask(masks: torch.Tensor, scores: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The best-scoring mask, bool [H, W]; an all-false mask (never the whole image) when there is no
    proposal or every score is NaN."""
    _check_scores(scores, "scores")
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        raise InputError("masks: expected a tensor [N, H, W]")
    if masks.shape[0] != scores.shape[0]:
        raise InputError(f"{masks.shape[0]} masks but {scores.shape[0]} scores; give one score per mask")
    if masks.shape[0] and tuple(masks.shape[1:]) != (height, width):
        raise InputError(f"masks are {tuple(masks.shape[1:])}, expected ({height}, {width}) = the image's size")
    if masks.shape[0] == 0 or bool(torch.isnan(scores).all()):
        return torch.zeros(height, width, dtype=torch.bool, device=masks.device)
    return masks[int(rank(scores, 1)[0])].to(torch.bool)


def fusion_weights(preset: Preset | None, both: bool, gen_weight: float | None = None,
                   disc_weight: float | None = None) -> tuple[float, float]:
    """(gen_weight, disc_weight) of Eq. 1/2: the given ones, else the preset's, when both scores are fused;
    1 and 1 when one score is used alone (variants G, GS, DS, sam-clip: the score as it is)."""
    if not both:
        return 1.0, 1.0
    if preset is None and (gen_weight is None or disc_weight is None):
        raise InputError("fusion weights: give gen_weight and disc_weight, or a preset to take them from")
    return (float(preset.gen_weight if gen_weight is None else gen_weight),
            float(preset.disc_weight if disc_weight is None else disc_weight))


@dataclass(frozen=True)
class Choice:
    """What ``fuse_and_select`` chose among N proposals."""

    fused: torch.Tensor  # float32 [N]: the fused scores (zeros(0) without proposals)
    top_k: list[int]  # the min(k, N) best proposals, best first (NaN last)
    index: int  # the chosen proposal (the best, or the pinned one); -1 when there is none
    mask: torch.Tensor  # bool [H, W]: masks[index], all False when index is -1 (never the whole image)
    gen_weight: float  # the weights the fusion used
    disc_weight: float
    base: torch.Tensor | None = None  # the fused scores before ``adjust`` (None: no adjustment)


def fuse_and_select(masks: torch.Tensor, generative: torch.Tensor | None, discriminative: torch.Tensor | None,
                    preset: Preset | None = None, top_k: int | None = None, pin_index: int = -1,
                    gen_weight: float | None = None, disc_weight: float | None = None,
                    adjust: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Choice:
    """Eq. 1, 2 and the selection, the one assembly every caller uses: fuse s_G and s_D of proposals ``masks``
    [N, H, W] with ``fusion_weights`` (given weights, else the preset's), rank the ``top_k`` (None: the
    preset's) and choose the best proposal,
    or ``pin_index`` when it is >= 0 (and there are proposals). No proposal, or only NaN scores (unpinned):
    index -1 and an empty mask. ``adjust`` (fused [N] -> [N]) changes the fused scores before the ranking: the
    spatial terms beyond the paper (refdiff.spatial); ``Choice.fused`` is then the adjusted score."""
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        raise InputError("masks: expected a bool tensor [N, H, W]")
    n, height, width = (int(v) for v in masks.shape)
    if top_k is None and preset is None:
        raise InputError("top_k: give it, or a preset to take it from")
    k = preset.top_k if top_k is None else int(top_k)
    gw, dw = fusion_weights(preset, generative is not None and discriminative is not None, gen_weight, disc_weight)
    empty = torch.zeros(height, width, dtype=torch.bool, device=masks.device)
    if n == 0:  # nothing to choose, pinned or not
        return Choice(torch.zeros(0, dtype=torch.float32), [], -1, empty, gw, dw)
    fused = fuse_scores(generative, discriminative, gen_weight=gw, disc_weight=dw)
    if fused.shape[0] != n:
        raise InputError(f"{n} proposals but {fused.shape[0]} scores; give one score per proposal")
    base = None
    if adjust is not None:
        base, fused = fused, adjust(fused)
        if fused.shape != base.shape:
            raise InputError(f"adjust returned scores of shape {tuple(fused.shape)} for {n} proposals")
    order = [int(i) for i in rank(fused, k)]
    if pin_index >= 0:
        if pin_index >= n:
            raise InputError(f"pin_index {pin_index} is out of range: there are {n} proposals (0..{n - 1}); use -1 "
                             "to select by score")
        index = int(pin_index)
    else:
        best = int(rank(fused, 1)[0])
        index = -1 if bool(torch.isnan(fused[best])) else best
    mask = masks[index].to(torch.bool) if index >= 0 else empty
    return Choice(fused, order, index, mask, gw, dw, base)


__all__ = ["generative_scores", "fuse_scores", "rank", "select_mask", "fusion_weights", "Choice",
           "fuse_and_select"]
