"""Spatial terms on the candidates, beyond the paper (docs/METHOD.md section 13): what the words of an expression
say about the target's place, size and relations, scored from the candidates' masks and from the other objects'
own cross-attention maps, and added to the fused score between scoring and selection.

Every term is a function of tensors: masks bool [N, H, W], scores float [N], maps float [H, W] in [0, 1].
Geometry is read from each mask's bounding box as a share of the image side (y0, x0, y1, x1 in [0, 1]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .config import SPATIAL_TERMS, Preset
from .discriminative import mask_boxes
from .errors import InputError
from .expression import Expression, FrameTerm, Relation


@dataclass(frozen=True)
class Geometry:
    """Boxes of N candidates as shares of the image: y0, x0, y1, x1, centres cy, cx, area (mask pixels /
    image pixels), height and width (box sides)."""

    boxes: torch.Tensor  # float32 [N, 4]
    area: torch.Tensor  # float32 [N]

    @property
    def cy(self) -> torch.Tensor:
        return (self.boxes[:, 0] + self.boxes[:, 2]) / 2

    @property
    def cx(self) -> torch.Tensor:
        return (self.boxes[:, 1] + self.boxes[:, 3]) / 2

    @property
    def height(self) -> torch.Tensor:
        return self.boxes[:, 2] - self.boxes[:, 0]

    @property
    def width(self) -> torch.Tensor:
        return self.boxes[:, 3] - self.boxes[:, 1]


def _check_masks(masks: torch.Tensor) -> None:
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.dim() != 3:
        raise InputError("masks: expected a bool tensor [N, H, W]")


def geometry(masks: torch.Tensor) -> Geometry:
    """The boxes and areas of candidate masks [N, H, W], as shares of the image's height and width."""
    _check_masks(masks)
    h, w = int(masks.shape[1]), int(masks.shape[2])
    scale = torch.tensor([h, w, h, w], dtype=torch.float32)
    boxes = mask_boxes(masks.cpu()).to(torch.float32) / scale
    area = masks.reshape(masks.shape[0], -1).sum(dim=1).cpu().to(torch.float32) / float(h * w)
    return Geometry(boxes, area)


def candidate_pool(masks: torch.Tensor, scores: torch.Tensor, size: int, overlap: float = 0.8) -> list[int]:
    """The ``size`` best candidates by ``scores`` that match the target: best first, a candidate skipped when
    a better member covers ``overlap`` of the smaller of the two masks (a part of it, or the same object)."""
    _check_masks(masks)
    if scores.dim() != 1 or scores.shape[0] != masks.shape[0]:
        raise InputError(f"{masks.shape[0]} masks but scores of shape {tuple(scores.shape)}")
    if size < 1:
        raise InputError(f"spatial_pool must be >= 1, got {size}")
    order = torch.sort(torch.nan_to_num(scores.float(), nan=float("-inf")), descending=True, stable=True).indices
    flat = masks.reshape(masks.shape[0], -1).cpu()
    area = flat.sum(dim=1)
    pool: list[int] = []
    for i in (int(j) for j in order):
        if area[i] == 0 or bool(torch.isnan(scores[i])):
            continue
        dup = any(float((flat[i] & flat[j]).sum()) >= overlap * float(min(area[i], area[j])) for j in pool)
        if not dup:
            pool.append(i)
        if len(pool) == size:
            break
    return pool


def _on_pool(values: torch.Tensor, pool: Sequence[int], n: int) -> torch.Tensor:
    """[n] zeros with ``values`` [len(pool)] written at the pool's indices."""
    out = torch.zeros(n, dtype=torch.float32)
    if pool:
        out[torch.tensor(list(pool), dtype=torch.long)] = values.to(torch.float32)
    return out


def _coordinate(geo: Geometry, side: str) -> torch.Tensor:
    """A coordinate that grows away from ``side``: 0 at that side of the image, 1 at the other."""
    if side == "left":
        return geo.cx
    if side == "right":
        return 1 - geo.cx
    if side == "top":
        return geo.cy
    if side == "bottom":
        return 1 - geo.cy
    raise InputError(f"unknown side {side!r}; choose left, right, top or bottom")


def position_term(geo: Geometry, pool: Sequence[int], sides: Sequence[str]) -> torch.Tensor:
    """[N] in [0, 1]: per side, 1 for the pool member nearest that side, 0 for the farthest, linear between
    (box centres); the mean over ``sides``; 0 outside the pool and when the pool has no spread."""
    n = geo.area.shape[0]
    if not pool or not sides:
        return torch.zeros(n)
    idx = torch.tensor(list(pool))
    total = torch.zeros(len(pool))
    for side in sides:
        c = _coordinate(geo, side)[idx]
        spread = c.max() - c.min()
        total += (c.max() - c) / spread if spread > 0 else torch.zeros_like(c)
    return _on_pool(total / len(sides), pool, n)


def middle_term(geo: Geometry, pool: Sequence[int]) -> torch.Tensor:
    """[N] in [0, 1]: 1 for a pool member whose box centre is at the middle of the pool's horizontal span, 0 at
    its ends (linear); 0 outside the pool and when the pool has no spread."""
    n = geo.area.shape[0]
    if len(pool) < 2:
        return torch.zeros(n)
    cx = geo.cx[torch.tensor(list(pool))]
    half = (cx.max() - cx.min()) / 2
    if half <= 0:
        return torch.zeros(n)
    return _on_pool((1 - (cx - (cx.max() + cx.min()) / 2).abs() / half).clamp(0, 1), pool, n)


def ordinal_term(geo: Geometry, pool: Sequence[int], order: int, side: str) -> torch.Tensor:
    """[N] one-hot: 1 for the ``order``-th pool member counted from ``side`` (box centres); all 0 when the pool
    has fewer members."""
    n = geo.area.shape[0]
    if order < 1:
        raise InputError(f"order must be >= 1, got {order}")
    if len(pool) < order:
        return torch.zeros(n)
    c = _coordinate(geo, side)[torch.tensor(list(pool))]
    ranked = torch.sort(c, stable=True).indices
    values = torch.zeros(len(pool))
    values[ranked[order - 1]] = 1.0
    return _on_pool(values, pool, n)


def size_term(geo: Geometry, pool: Sequence[int], sign: int, measure: str = "area") -> torch.Tensor:
    """[N] one-hot: 1 for the pool member with the largest (``sign`` +1) or smallest (-1) mask area, box height
    or box width (``measure``); all 0 with fewer than two members."""
    n = geo.area.shape[0]
    if sign not in (1, -1):
        raise InputError(f"sign must be +1 or -1, got {sign}")
    values = {"area": geo.area, "height": geo.height, "width": geo.width}.get(measure)
    if values is None:
        raise InputError(f"unknown size measure {measure!r}; choose area, height or width")
    if len(pool) < 2:
        return torch.zeros(n)
    v = values[torch.tensor(list(pool))] * sign
    one = torch.zeros(len(pool))
    one[int(torch.argmax(v))] = 1.0
    return _on_pool(one, pool, n)


def _region_box(region: torch.Tensor) -> torch.Tensor | None:
    """The box (y0, x0, y1, x1 as shares) of a bool region [H, W]; None when it is empty."""
    if not bool(region.any()):
        return None
    h, w = region.shape
    box = mask_boxes(region[None])[0].to(torch.float32)
    return box / torch.tensor([h, w, h, w], dtype=torch.float32)


def _soft_order(delta: torch.Tensor, margin: float) -> torch.Tensor:
    """0..1: how surely ``delta`` > 0, sure at +margin (1), 0.5 at 0, 0 at -margin."""
    return ((delta / max(margin, 1e-6)).clamp(-1, 1) + 1) / 2


def relation_term(masks: torch.Tensor, geo: Geometry, pool: Sequence[int], other_map: torch.Tensor, family: str,
                  threshold: float = 0.5, near_scale: float = 0.1, order_margin: float = 0.05) -> torch.Tensor:
    """[N] in [0, 1]: how well each pool member stands in relation ``family`` to the other object, whose
    region is ``other_map`` >= ``threshold`` (its own cross-attention map at the image's size).

    Every family is multiplied by 1 - IoU(candidate, region), so the other object itself scores low. near: exp(-box
    gap / near_scale), the gap as a share of the diagonal; behind / front: horizontal overlap of the boxes times
    the candidate's box bottom above / below the region's (farther objects stand higher on the ground plane); on
    / under: horizontal overlap times the candidate's centre above / below the region's; left_of / right_of: the
    candidate's centre left / right of the region's; holding ("with", "wearing"): the share of the map's mass
    inside the candidate's box grown by a quarter of its sides. Orders are soft within ``order_margin``."""
    _check_masks(masks)
    n = masks.shape[0]
    if other_map.shape != masks.shape[1:]:
        raise InputError(f"the other object's map is {tuple(other_map.shape)} but the masks are "
                         f"{tuple(masks.shape[1:])}; both must be at the image's size")
    region = other_map.cpu().float() >= threshold
    rbox = _region_box(region)
    if not pool or rbox is None:
        return torch.zeros(n)
    idx = torch.tensor(list(pool))
    boxes = geo.boxes[idx]
    flat = masks[idx].reshape(len(pool), -1).cpu()
    rflat = region.reshape(-1)
    inter = (flat & rflat).sum(dim=1).float()
    union = (flat | rflat).sum(dim=1).float().clamp_min(1)
    apart = 1 - inter / union
    cy, cx = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    ry, rx = (rbox[0] + rbox[2]) / 2, (rbox[1] + rbox[3]) / 2
    hov = ((torch.minimum(boxes[:, 3], rbox[3]) - torch.maximum(boxes[:, 1], rbox[1])).clamp_min(0)
           / torch.minimum(boxes[:, 3] - boxes[:, 1], rbox[3] - rbox[1]).clamp_min(1e-6)).clamp(0, 1)
    if family == "near":
        gy = torch.maximum(rbox[0] - boxes[:, 2], boxes[:, 0] - rbox[2]).clamp_min(0)
        gx = torch.maximum(rbox[1] - boxes[:, 3], boxes[:, 1] - rbox[3]).clamp_min(0)
        value = torch.exp(-torch.sqrt(gy ** 2 + gx ** 2) / math.sqrt(2) / max(near_scale, 1e-6))
    elif family in ("behind", "front"):
        delta = rbox[2] - boxes[:, 2]
        value = hov * _soft_order(delta if family == "behind" else -delta, order_margin)
    elif family in ("on", "under"):
        delta = ry - cy
        value = hov * _soft_order(delta if family == "on" else -delta, order_margin)
    elif family in ("left_of", "right_of"):
        delta = rx - cx
        value = _soft_order(delta if family == "left_of" else -delta, order_margin)
    elif family == "holding":
        h, w = masks.shape[1], masks.shape[2]
        mass = other_map.cpu().float().clamp_min(0)
        total = float(mass.sum())
        value = torch.zeros(len(pool))
        if total > 0:
            for k in range(len(pool)):
                y0, x0, y1, x1 = boxes[k].tolist()
                gy, gx = (y1 - y0) / 4, (x1 - x0) / 4
                r0, r1 = max(0, int((y0 - gy) * h)), min(h, int(math.ceil((y1 + gy) * h)))
                c0, c1 = max(0, int((x0 - gx) * w)), min(w, int(math.ceil((x1 + gx) * w)))
                value[k] = float(mass[r0:r1, c0:c1].sum()) / total
    else:
        raise InputError(f"unknown relation family {family!r}")
    return _on_pool(value * apart, pool, n)


def negative_similarity(image_features: torch.Tensor, other_features: torch.Tensor) -> torch.Tensor:
    """[N]: cosine of each candidate's CLIP image feature [N, D] with the mean of the other nouns' text features
    [K, D] (each L2-normalised first); zeros when K is 0."""
    if image_features.dim() != 2:
        raise InputError(f"image features must be [N, D], got {tuple(image_features.shape)}")
    n = image_features.shape[0]
    if other_features.numel() == 0:
        return torch.zeros(n)
    if other_features.dim() != 2 or other_features.shape[1] != image_features.shape[1]:
        raise InputError(f"other nouns' text features must be [K, {image_features.shape[1]}], got "
                         f"{tuple(other_features.shape)}")
    t = other_features.float()
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    mean = t.mean(dim=0)
    mean = mean / mean.norm().clamp_min(1e-12)
    f = image_features.float()
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (f @ mean.to(f.device)).cpu()


def negative_prompts(expr: Expression) -> tuple[str, ...]:
    """The texts of the negatives: "a photo of <noun>" for each other noun of the expression."""
    return tuple(f"a photo of {noun}" for noun in expr.others)


@dataclass(frozen=True)
class SpatialScores:
    """The terms applied to N candidates: ``base`` (the fused score), each term's weighted ``contributions``
    [N], ``pool`` (the candidates the geometry ranked) and ``total`` = base + sum of the contributions."""

    base: torch.Tensor
    total: torch.Tensor
    contributions: dict[str, torch.Tensor] = field(default_factory=dict)
    pool: list[int] = field(default_factory=list)


def needs_maps(expr: Expression, terms: Sequence[str]) -> bool:
    """Whether the terms need the other objects' attention maps (a relation is parsed and switched on)."""
    return "relations" in terms and bool(expr.relations)


def needs_negatives(expr: Expression, terms: Sequence[str]) -> bool:
    """Whether the terms need CLIP features of the other nouns (negatives on and other nouns named)."""
    return "negatives" in terms and bool(expr.others)


def negatives_apply(expr: Expression, terms: Sequence[str], uses_clip: bool) -> bool:
    """Whether the negative term applies: switched on, other nouns named, and the scores it adjusts hold a CLIP
    score (``uses_clip``: s_D, as in full, GS, DS, sam-clip; not G). The caller still needs a CLIP scorer."""
    return bool(uses_clip) and needs_negatives(expr, terms)


def spatial_negatives(expr: Expression, terms: Sequence[str], uses_clip: bool,
                      similarity: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The ``negatives`` of spatial_scores: ``similarity()`` (the candidates' CLIP similarity to the other nouns,
    None without a CLIP scorer) where ``negatives_apply``, else None."""
    if similarity is None or not negatives_apply(expr, terms, uses_clip):
        return None
    return similarity()


def spatial_scores(expr: Expression, masks: torch.Tensor, fused: torch.Tensor, preset: Preset,
                   terms: Sequence[str], other_maps: Mapping[str, torch.Tensor] | None = None,
                   negatives: torch.Tensor | None = None) -> SpatialScores:
    """The one assembly of the spatial terms: fused [N] -> fused + weighted terms.

    The negative term (``negatives``: ``negative_similarity`` [N]) comes first, as a change of the CLIP score:
    -spatial_negative_weight * similarity. The pool (``candidate_pool`` of spatial_pool) is then ranked on that
    score, and each frame term of ``expr`` switched on in ``terms`` adds its weight times its value on the pool;
    a relation uses ``other_maps[relation.other]`` (the first relation with a map). Terms not parsed add nothing.
    """
    bad = [t for t in terms if t not in SPATIAL_TERMS]
    if bad:
        raise InputError(f"unknown spatial term(s) {bad}; choose among {', '.join(SPATIAL_TERMS)}")
    _check_masks(masks)
    n = masks.shape[0]
    base = fused.detach().to(torch.float32).cpu()
    if base.shape != (n,):
        raise InputError(f"{n} masks but fused scores of shape {tuple(fused.shape)}")
    contributions: dict[str, torch.Tensor] = {}
    score = base.clone()
    if "negatives" in terms and negatives is not None and expr.others:
        contributions["negatives"] = -preset.spatial_negative_weight * negatives.to(torch.float32).cpu()
        score = score + contributions["negatives"]
    if n == 0:
        return SpatialScores(base, score, contributions, [])
    pool = candidate_pool(masks, score, preset.spatial_pool, preset.spatial_pool_overlap)
    geo = geometry(masks)
    frame: dict[str, tuple[FrameTerm, ...]] = {k: expr.frame_of(k) for k in ("position", "middle", "ordinal",
                                                                              "size")}
    if "position" in terms and frame["position"]:
        sides = list(dict.fromkeys(t.side for t in frame["position"] if t.side))
        contributions["position"] = preset.spatial_position_weight * position_term(geo, pool, sides)
    if "middle" in terms and frame["middle"]:
        contributions["middle"] = preset.spatial_middle_weight * middle_term(geo, pool)
    if "ordinals" in terms and frame["ordinal"]:
        t = frame["ordinal"][0]
        contributions["ordinals"] = preset.spatial_ordinal_weight * ordinal_term(geo, pool, t.order or 1,
                                                                                 t.side or "left")
    if "size" in terms and frame["size"]:
        t = frame["size"][0]
        contributions["size"] = preset.spatial_size_weight * size_term(geo, pool, t.sign, t.measure or "area")
    if "relations" in terms and other_maps:
        rel: Relation | None = next((r for r in expr.relations if r.other in other_maps), None)
        if rel is not None:
            value = relation_term(masks, geo, pool, other_maps[rel.other], rel.family,
                                  threshold=preset.spatial_relation_threshold, near_scale=preset.spatial_near_scale,
                                  order_margin=preset.spatial_order_margin)
            contributions["relations"] = preset.spatial_relation_weight * value
    for name, value in contributions.items():
        if name != "negatives":
            score = score + value
    return SpatialScores(base, score, contributions, pool)


def relation_maps(expr: Expression, combined: torch.Tensor, positions: Callable[[Relation], Sequence[int]],
                  frame: object, preset: Preset) -> dict[str, torch.Tensor]:
    """The map of each related object's noun at the image's size, from the same capture as the root word's:
    combined maps [L, h, w, T], the noun's last BPE piece (``positions(relation)``), Eq. 4-5 as for the root
    (per-layer min-max, resize to the prepared square ``frame``, crop, min-max). A noun without a token inside
    the captured ones is left out."""
    from .capture import token_map
    from .maps import generative_map

    out: dict[str, torch.Tensor] = {}
    for rel in expr.relations:
        where = list(positions(rel))
        if rel.other in out or not where or where[-1] >= combined.shape[-1] - 1:
            continue
        small = token_map(combined, where[-1], eps=preset.layer_norm_eps)
        out[rel.other] = generative_map(small, frame, mode=preset.map_resize, eps=preset.map_eps).cpu()
    return out


def candidate_negatives(scorer: object, image: torch.Tensor, masks: torch.Tensor, expr: Expression,
                        preset: Preset) -> torch.Tensor:
    """``negative_similarity`` of the candidates' unbiased CLIP crop features (``preset.clip_layer``) with the
    other nouns of ``expr`` (``negative_prompts``), for a ``refdiff.discriminative.ClipScorer``."""
    feats = scorer.crop_features(image, masks, None, layer=preset.clip_layer)
    texts = scorer.encode_text(list(negative_prompts(expr)))
    return negative_similarity(feats.float().cpu(), texts.float().cpu())


def spatial_adjuster(expr: Expression, masks: torch.Tensor, preset: Preset, terms: Sequence[str],
                     other_maps: Mapping[str, torch.Tensor] | None = None, negatives: torch.Tensor | None = None
                     ) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[SpatialScores]]:
    """The ``adjust`` of ``refdiff.scoring.fuse_and_select`` that adds the spatial terms (``spatial_scores``),
    and the list that receives the applied SpatialScores (base, contributions, pool) once it has run."""
    applied: list[SpatialScores] = []

    def adjust(fused: torch.Tensor) -> torch.Tensor:
        applied.append(spatial_scores(expr, masks, fused, preset, terms, other_maps, negatives))
        return applied[-1].total.to(fused.device)

    return adjust, applied


__all__ = ["Geometry", "geometry", "candidate_pool", "position_term", "middle_term", "ordinal_term", "size_term",
           "relation_term", "negative_similarity", "negative_prompts", "SpatialScores", "spatial_scores",
           "needs_maps", "needs_negatives", "negatives_apply", "spatial_negatives", "relation_maps",
           "candidate_negatives", "spatial_adjuster"]
