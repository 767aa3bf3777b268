"""The spatial terms on a batch of scored proposals (docs/METHOD.md section 13): fuse s_G and s_D, add the terms
the words of each image's expression say (refdiff.spatial), and keep every term's contribution for the
selection node's table and gallery. No ComfyUI import (tested offline).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from refdiff.config import SPATIAL_TERMS, Preset
from refdiff.errors import InputError
from refdiff.expression import Expression, parse_expression
from refdiff.scoring import fuse_and_select
from refdiff.spatial import (needs_maps, needs_negatives, negatives_apply, relation_maps, spatial_adjuster,
                             spatial_negatives)

from . import attention_maps, tensors
from .token_positions import describe_expression
from .wire_types import AttentionBatch, ParsedBatch, ParsedItem, ProposalBatch, ScoreBatch, check_unfused_scores

# Each term's switch and weight field of the Preset, by term (SPATIAL_TERMS order).
WEIGHT_FIELDS = {"position": "spatial_position_weight", "middle": "spatial_middle_weight",
                 "ordinals": "spatial_ordinal_weight", "size": "spatial_size_weight",
                 "relations": "spatial_relation_weight", "negatives": "spatial_negative_weight"}

# The negatives of one image: (image index, expression, masks [N, H, W]) -> similarity [N].
NegativesFn = Callable[[int, Expression, torch.Tensor], torch.Tensor]


def spatial_preset(preset: Preset, on: Sequence[str], weights: dict[str, float] | None = None,
                   pool: int | None = None) -> tuple[Preset, tuple[str, ...]]:
    """``preset`` with the given term weights (term -> weight; missing: the preset's) and pool size, and the terms
    switched on (``on``) in SPATIAL_TERMS order."""
    bad = [t for t in list(on) + list(weights or {}) if t not in SPATIAL_TERMS]
    if bad:
        raise InputError(f"unknown spatial term(s) {bad}; choose among {', '.join(SPATIAL_TERMS)}")
    changes: dict[str, Any] = {WEIGHT_FIELDS[t]: float(w) for t, w in (weights or {}).items()}
    if pool is not None:
        if int(pool) < 1:
            raise InputError(f"pool must be >= 1, got {pool}")
        changes["spatial_pool"] = int(pool)
    return preset.with_(**changes), tuple(t for t in SPATIAL_TERMS if t in set(on))


def item_relation_positions(item: ParsedItem) -> Callable[[Any], list[int]]:
    """The BPE positions of a relation's other noun, read from the parse's word positions (the word whose span
    in the text is the noun's)."""
    spans = {(int(s), int(e)): i for i, (_, s, e) in enumerate(item.parsed.words)}

    def positions(rel: Any) -> list[int]:
        i = spans.get((int(rel.other_span[0]), int(rel.other_span[1])))
        return list(item.word_positions[i]) if i is not None and i < len(item.word_positions) else []

    return positions


def spatial_score_batch(proposals: ProposalBatch, generative: ScoreBatch | None, discriminative: ScoreBatch | None,
                        parse: ParsedBatch, preset: Preset, terms: Sequence[str],
                        attention: AttentionBatch | None = None, negatives: NegativesFn | None = None,
                        gen_weight: float | None = None, disc_weight: float | None = None, nlp: Any = None,
                        progress: Callable[[], None] | None = None) -> tuple[ScoreBatch, list[str]]:
    """Per image, refdiff.scoring.fuse_and_select with the spatial terms as its ``adjust``
    (refdiff.spatial.spatial_adjuster, as RefDiff runs them): the fused score (given weights, else the
    preset's) plus each term of ``terms`` the expression says. Relations read the other noun's map from
    ``attention`` (the same capture as the root's); negatives call ``negatives`` where
    refdiff.spatial.negatives_apply (only with s_D among the scores, as RefDiff). Returns a "fused" ScoreBatch
    and the notes: per image what was understood and applied, and why a term said by the words was not."""
    check_unfused_scores(proposals, generative, discriminative,
                         "already went through RefDiffSpatial; connect the generative / discriminative scores "
                         "themselves")
    batch = len(proposals)
    items = parse.for_batch(batch, "parse")
    if attention is not None:
        attention_maps.check_attention_batch(attention, batch)
    totals, applied_all, notes = [], [], []
    uses_clip = discriminative is not None  # s_D (RefDiffCLIPScore, either mode) among the scores
    weights = (1.0, 1.0)
    for i, (masks, item) in enumerate(zip(proposals.masks, items)):
        expr = parse_expression(item.parsed.text, nlp=nlp, parsed=item.parsed)
        notes.append(f"image {i}: {describe_expression(expr)}")
        other_maps = None
        if needs_maps(expr, terms) and masks.shape[0]:
            if attention is None:
                notes.append(f"  relations not applied: connect attention (the capture of '{item.prompt}')")
            else:
                attention_maps.check_prompt(attention.prompts[i], item.prompt, i)
                frame = tensors.frame_geometry(int(masks.shape[1]), int(masks.shape[2]), attention.image_hw[0])
                combined = attention.maps[i].combined(attention.guidance_scale)
                other_maps = relation_maps(expr, combined, item_relation_positions(item), frame, preset)
                missing = [r.other for r in expr.relations if r.other not in other_maps]
                if missing:
                    notes.append(f"  relations: no captured token for {missing}")
        neg = None
        if masks.shape[0]:
            if negatives_apply(expr, terms, uses_clip) and negatives is None:
                notes.append("  negatives not applied: connect clip and image")
            elif needs_negatives(expr, terms) and not uses_clip:
                notes.append("  negatives: none (they adjust the CLIP score s_D, and these scores hold none)")
            similarity = None if negatives is None else (lambda: negatives(i, expr, masks))
            neg = spatial_negatives(expr, terms, uses_clip, similarity)
        adjust, applied = spatial_adjuster(expr, masks, preset, terms, other_maps, neg, uses_clip=uses_clip)
        s_g = generative.scores[i] if generative is not None else None
        s_d = discriminative.scores[i] if discriminative is not None else None
        try:
            choice = fuse_and_select(masks, s_g, s_d, preset, top_k=1, gen_weight=gen_weight,
                                     disc_weight=disc_weight, adjust=adjust)
        except InputError as exc:
            raise InputError(f"image {i}: {exc}") from exc
        weights = (choice.gen_weight, choice.disc_weight)
        totals.append(choice.fused.float().cpu())
        applied_all.append(applied[0] if applied else None)
        if applied:
            said = ", ".join(f"{k} (max {float(v.abs().max()):.3g})" for k, v in applied[0].contributions.items())
            notes.append(f"  applied: {said or 'no term (the words say none of the terms switched on)'}")
            notes.extend(f"  {note}" for note in applied[0].notes)
        if progress is not None:
            progress()
    parts = {"generative": generative.scores if generative is not None else None,
             "discriminative": discriminative.scores if discriminative is not None else None}
    out = ScoreBatch(totals, kind="fused", counts=[int(m.shape[0]) for m in proposals.masks], parts=parts,
                     spatial=applied_all, weights=weights)
    return out, notes


__all__ = ["WEIGHT_FIELDS", "NegativesFn", "spatial_preset", "item_relation_positions", 
           "spatial_score_batch"]
