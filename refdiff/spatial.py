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
from .expression import FRAME_KINDS, Expression, FrameTerm, Relation


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


@dataclass(frozen=True)
class Pool:
    """The candidates the terms rank (``members``, best first) and why each other candidate is left out:
    index -> "band", "group", "part of <j>", "duplicate of <j>", "below the margin" or "over the pool size"."""

    members: list[int]
    left_out: dict[int, str] = field(default_factory=dict)


def _sampled(masks: torch.Tensor, side: int = 256) -> torch.Tensor:
    """Masks [N, H, W] sampled on a grid of at most ``side`` cells along the longer side (every k-th pixel), as
    float [N, h*w]: enough to measure how much of one mask lies inside another."""
    step = max(1, -(-max(int(masks.shape[1]), int(masks.shape[2])) // side))
    return masks[:, ::step, ::step].reshape(masks.shape[0], -1).cpu().to(torch.float32)


def instance_pool(masks: torch.Tensor, scores: torch.Tensor, size: int, margin: float | None,
                  overlap: float = 0.8, group_cover: float = 0.6, band: float = 0.95) -> Pool:
    """The whole instances of the target among N candidates, best first (docs/METHOD.md section 13).

    Left out, in this order: empty or NaN candidates; bands (box spanning ``band`` of the image width: sky, road,
    table top); groups (a mask holding >= 2 apart candidates that cover ``group_cover`` of it); parts (a mask
    ``overlap`` inside a larger candidate that is not a group, whatever their scores); duplicates (IoU >=
    ``overlap``: the lower score), all judged among the candidates within two margins of the best, so that a part
    outscoring its whole cannot push the whole out; then candidates scoring more than ``margin`` below the best
    instance (None: no margin, the open class of a placeholder target); at most ``size`` remain."""
    _check_masks(masks)
    n = masks.shape[0]
    if scores.dim() != 1 or scores.shape[0] != n:
        raise InputError(f"{n} masks but scores of shape {tuple(scores.shape)}")
    if size < 1:
        raise InputError(f"spatial_pool must be >= 1, got {size}")
    if margin is not None and margin < 0:
        raise InputError(f"spatial_pool_margin must be >= 0, got {margin}")
    s = torch.nan_to_num(scores.detach().float().cpu(), nan=float("-inf"))
    left: dict[int, str] = {}
    if n == 0:
        return Pool([], left)
    geo = geometry(masks)
    for i in range(n):
        if geo.area[i] == 0 or not math.isfinite(float(s[i])):
            left[i] = "empty" if geo.area[i] == 0 else "no score"
        elif float(geo.width[i]) >= band:
            left[i] = "band"
    live = sorted((i for i in range(n) if i not in left), key=lambda i: (-float(s[i]), i))
    best = float(s[live[0]]) if live else 0.0
    while True:  # wholes, parts and groups within two margins of the best; again when the best was a part
        near = [i for i in live if margin is None or float(s[i]) >= best - 2 * margin]
        kept, why = _wholes(masks, near, s, overlap, group_cover)
        if not kept or float(s[kept[0]]) >= best:
            break
        best = float(s[kept[0]])
    left.update(why)
    members: list[int] = []
    for i in live:
        if i in why:
            continue
        if i not in kept or (margin is not None and float(s[i]) < best - margin):
            left[i] = "below the margin"
        elif len(members) >= size:
            left[i] = "over the pool size"
        else:
            members.append(i)
    return Pool(members, left)


def _wholes(masks: torch.Tensor, idx: Sequence[int], s: torch.Tensor, overlap: float, group_cover: float
            ) -> tuple[list[int], dict[int, str]]:
    """Of the candidates ``idx`` (best first), the whole instances (best first) and why each other one is not:
    groups, then parts of the remaining wholes, then duplicates (see ``instance_pool``)."""
    if not idx:
        return [], {}
    flat = _sampled(masks[torch.tensor(list(idx))])
    area = flat.sum(dim=1).clamp_min(1)
    inter = flat @ flat.T
    inside = inter / area[:, None]  # inside[a, b]: the share of a inside b
    iou = inter / (area[:, None] + area[None, :] - inter).clamp_min(1)
    k = len(idx)
    why: dict[int, str] = {}
    contained = [[a for a in range(k) if a != b and inside[a, b] >= overlap and area[a] < overlap * area[b]]
                 for b in range(k)]
    for b in range(k):  # a group: two or more apart children (not parts of each other) covering most of it
        top = [a for a in contained[b] if not any(a in contained[c] for c in contained[b])]
        apart = [a for a in top if all(iou[a, c] < 1 - overlap for c in top if c != a)]
        if len(apart) >= 2 and float(flat[torch.tensor(apart)].amax(dim=0) @ flat[b] / area[b]) >= group_cover:
            why[idx[b]] = "group"
    for b in range(k):  # parts of a whole, whatever their scores
        if idx[b] not in why:
            for a in contained[b]:
                why.setdefault(idx[a], f"part of {idx[b]}")
    kept: list[int] = []
    for a in range(k):  # duplicates: the better of two near-equal masks stays
        if idx[a] in why:
            continue
        twin = next((b for b in kept if iou[a, b] >= overlap), None)
        if twin is None:
            kept.append(a)
        else:
            why[idx[a]] = f"duplicate of {idx[twin]}"
    return [idx[a] for a in kept], why


def pool_summary(pool: Pool) -> str:
    """A line on the pool: its members and how many candidates were left out for each reason."""
    reasons: dict[str, int] = {}
    for why in pool.left_out.values():
        key = why.split(" of ")[0]
        reasons[key] = reasons.get(key, 0) + 1
    out = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"members {pool.members}; left out: {out or 'none'}"


def pool_margin(preset: Preset, uses_clip: bool, open_class: bool = False) -> float | None:
    """The pool's margin for a score with s_D (``uses_clip``) or s_G alone; None for an open target class."""
    if open_class:
        return None
    return float(preset.spatial_pool_margin if uses_clip else preset.spatial_pool_margin_generative)


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
    left_out: dict[int, str] = field(default_factory=dict)  # candidate -> why it is not in the pool
    notes: list[str] = field(default_factory=list)  # what the words said that was not applied, or how


def needs_maps(expr: Expression, terms: Sequence[str]) -> bool:
    """Whether the terms need the other objects' attention maps (a relation is parsed and switched on)."""
    return "relations" in terms and bool(expr.relations)


def needs_negatives(expr: Expression, terms: Sequence[str]) -> bool:
    """Whether the terms need CLIP features of the other nouns (negatives on and other nouns named)."""
    return "negatives" in terms and bool(expr.others)


def _target_frame(expr: Expression, kind: str) -> tuple[FrameTerm, ...]:
    """The frame terms of one kind that the parse attaches to the target (not to a related object)."""
    return tuple(t for t in expr.frame_of(kind) if getattr(t, "of", None) is None)


def _is_open(expr: Expression) -> bool:
    """Whether the target class is open: the expression names no object for the target ("the one on the left")."""
    opened = getattr(expr, "open", None)
    return bool(opened) if opened is not None else bool(expr.parsed is not None and not expr.parsed.root_is_noun)


def frame_values(geo: Geometry, pool: Sequence[int], expr_terms: Mapping[str, tuple[FrameTerm, ...]],
                 terms: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each frame term switched on in ``terms`` and present in ``expr_terms`` (kind -> terms), its value [N] on
    the pool: position (mean over the sides named), middle, the first ordinal, the first size word."""
    out: dict[str, torch.Tensor] = {}
    if "position" in terms and expr_terms.get("position"):
        sides = list(dict.fromkeys(t.side for t in expr_terms["position"] if t.side))
        out["position"] = position_term(geo, pool, sides)
    if "middle" in terms and expr_terms.get("middle"):
        out["middle"] = middle_term(geo, pool)
    if "ordinals" in terms and expr_terms.get("ordinal"):
        t = expr_terms["ordinal"][0]
        out["ordinals"] = ordinal_term(geo, pool, t.order or 1, t.side or "left")
    if "size" in terms and expr_terms.get("size"):
        t = expr_terms["size"][0]
        out["size"] = size_term(geo, pool, t.sign, t.measure or "area")
    return out


def other_instance(other_map: torch.Tensor, frame: Sequence[FrameTerm], threshold: float = 0.5,
                   max_parts: int = 32) -> tuple[torch.Tensor, str | None]:
    """The related object's map kept on the one instance its own frame words pick ("next to the biggest plate":
    the biggest connected region of the plates' map >= ``threshold``), with a note; unchanged without words."""
    if not frame:
        return other_map, None
    from scipy import ndimage

    region = (other_map.detach().cpu().float() >= threshold).numpy()
    labels, count = ndimage.label(region)
    if count < 2:
        return other_map, None
    lab = torch.from_numpy(labels)
    parts = torch.stack([lab == k for k in range(1, count + 1)])
    parts = parts[torch.argsort(parts.reshape(count, -1).sum(1), descending=True, stable=True)[:max_parts]]
    geo = geometry(parts)
    pool = list(range(parts.shape[0]))
    kinds = {k: tuple(t for t in frame if t.kind == k) for k in FRAME_KINDS}
    values = frame_values(geo, pool, kinds, SPATIAL_TERMS)
    if not values:
        return other_map, None
    name, value = next(iter(values.items()))
    pick = int(torch.argmax(value))
    words = " ".join(t.word for t in frame)
    note = f"'{words}' picked one of {parts.shape[0]} regions of the related object's map ({name})"
    return other_map * parts[pick].to(other_map.device, other_map.dtype), note


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
                   negatives: torch.Tensor | None = None, uses_clip: bool = True) -> SpatialScores:
    """The one assembly of the spatial terms: fused [N] -> fused + weighted terms.

    The negative term (``negatives``: ``negative_similarity`` [N]) comes first, as a change of the CLIP score:
    -spatial_negative_weight * similarity. The pool (``instance_pool``: whole instances within the margin of
    ``pool_margin``, ``uses_clip``: the score holds s_D) is then ranked on that score, and each frame term the
    parse attaches to the target adds weight * margin * value on the pool; a relation uses
    ``other_maps[relation.other]`` (the first relation with a map), kept on the instance its own words pick."""
    bad = [t for t in terms if t not in SPATIAL_TERMS]
    if bad:
        raise InputError(f"unknown spatial term(s) {bad}; choose among {', '.join(SPATIAL_TERMS)}")
    _check_masks(masks)
    n = masks.shape[0]
    base = fused.detach().to(torch.float32).cpu()
    if base.shape != (n,):
        raise InputError(f"{n} masks but fused scores of shape {tuple(fused.shape)}")
    contributions: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    score = base.clone()
    if "negatives" in terms and negatives is not None and expr.others:
        contributions["negatives"] = -preset.spatial_negative_weight * negatives.to(torch.float32).cpu()
        score = score + contributions["negatives"]
    if n == 0:
        return SpatialScores(base, score, contributions, [], notes=notes)
    open_class = _is_open(expr)
    unit = pool_margin(preset, uses_clip)
    pool = instance_pool(masks, score, preset.spatial_pool, pool_margin(preset, uses_clip, open_class),
                         preset.spatial_pool_overlap, preset.spatial_pool_group_cover, preset.spatial_pool_band)
    members = pool.members
    if open_class and len(members) > 1:  # the scores carry no class: the words decide among all whole objects
        spread = score[torch.tensor(members)]
        unit = max(unit, float(spread.max() - spread.min()))
    geo = geometry(masks)
    weights = {"position": preset.spatial_position_weight, "middle": preset.spatial_middle_weight,
               "ordinals": preset.spatial_ordinal_weight, "size": preset.spatial_size_weight}
    frame = {k: _target_frame(expr, k) for k in FRAME_KINDS}
    for name, value in frame_values(geo, members, frame, terms).items():
        contributions[name] = weights[name] * unit * value
    said = any(frame[k] for k in FRAME_KINDS) or bool(expr.relations)
    if said and len(members) < 2:
        notes.append(f"pool: {len(members)} whole instance(s) of the target, so the frame and relation words rank "
                     f"nothing ({pool_summary(pool)})")
    if "relations" in terms and other_maps:
        rel: Relation | None = next((r for r in expr.relations if r.other in other_maps), None)
        if rel is not None:
            own = tuple(t for t in expr.frame if getattr(t, "of", None) == rel.other)
            other_map, note = other_instance(other_maps[rel.other], own, preset.spatial_relation_threshold)
            if note:
                notes.append(note)
            value = relation_term(masks, geo, members, other_map, rel.family,
                                  threshold=preset.spatial_relation_threshold, near_scale=preset.spatial_near_scale,
                                  order_margin=preset.spatial_order_margin)
            contributions["relations"] = preset.spatial_relation_weight * unit * value
    dropped = [t.word for t in expr.frame if getattr(t, "of", None) is not None
               and not ("relations" in terms and other_maps and t.of in other_maps)]
    if dropped:
        notes.append(f"not applied: {', '.join(dropped)} (words about another object, whose map is not given)")
    for name, value in contributions.items():
        if name != "negatives":
            score = score + value
    return SpatialScores(base, score, contributions, members, pool.left_out, notes)


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
                     other_maps: Mapping[str, torch.Tensor] | None = None, negatives: torch.Tensor | None = None,
                     uses_clip: bool = True) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[SpatialScores]]:
    """The ``adjust`` of ``refdiff.scoring.fuse_and_select`` that adds the spatial terms (``spatial_scores``),
    and the list that receives the applied SpatialScores (base, contributions, pool) once it has run."""
    applied: list[SpatialScores] = []

    def adjust(fused: torch.Tensor) -> torch.Tensor:
        applied.append(spatial_scores(expr, masks, fused, preset, terms, other_maps, negatives, uses_clip))
        return applied[-1].total.to(fused.device)

    return adjust, applied


__all__ = ["Geometry", "geometry", "Pool", "instance_pool", "pool_summary", "pool_margin", "frame_values", "other_instance", "position_term", "middle_term", "ordinal_term", "size_term",
           "relation_term", "negative_similarity", "negative_prompts", "SpatialScores", "spatial_scores",
           "needs_maps", "needs_negatives", "negatives_apply", "spatial_negatives", "relation_maps",
           "candidate_negatives", "spatial_adjuster"]
