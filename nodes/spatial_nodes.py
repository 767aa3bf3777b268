"""Spatial terms node (beyond the paper, docs/METHOD.md section 13): between scoring and selection, the fused
score plus what the words say about the target's place, size and relations (refdiff.spatial)."""
from __future__ import annotations

from typing import Any

import spacy  # noqa: F401  (the parser; without it this node is disabled, not broken)
import torch
from comfy_api.latest import io

from refdiff.config import PLUS, SPATIAL_TERMS, Preset
from refdiff.errors import InputError
from refdiff.spatial import candidate_negatives

from . import runtime, sockets, tensors
from .spatial_scores import WEIGHT_FIELDS, NegativesFn, spatial_preset, spatial_score_batch

_TERM_HELP = {
    "position": "left / right / top / bottom: the candidates of the pool ranked by box centre from that side",
    "middle": "middle / center: the pool member nearest the middle of the pool's horizontal span",
    "ordinals": "'second from the left', 'leftmost': the n-th pool member counted from a side",
    "size": "'biggest', 'smaller', 'tallest': the extreme pool member by area, height or width",
    "relations": "'next to', 'behind', 'on', 'holding' X: a rule against X's own cross-attention map (from the "
                 "attention input, the same capture; no extra UNet run)",
    "negatives": "the other nouns of the sentence: the candidates' CLIP similarity to them is subtracted (needs "
                 "clip and image; applied only with discriminative connected, as it adjusts the CLIP score s_D)",
}


def clip_negatives(clip: Any, image: torch.Tensor, batch: int, preset: Preset) -> NegativesFn:
    """spatial_score_batch's negatives: image i's candidates' CLIP similarity to the sentence's other nouns
    (refdiff.spatial.candidate_negatives), with the scorer on the compute device."""
    rgbs = tensors.images_to_rgb(image)
    if len(rgbs) not in (1, batch):
        raise InputError(f"image holds {len(rgbs)} image(s) but the proposals are for {batch}")

    def negatives(i: int, expr: Any, masks: torch.Tensor) -> torch.Tensor:
        runtime.check_interrupt()
        with runtime.on_compute_device(clip.scorer.model):
            rgb = rgbs[i if len(rgbs) > 1 else 0]
            return candidate_negatives(clip.scorer, torch.from_numpy(rgb), masks, expr, preset)

    return negatives


def _term_inputs() -> list[Any]:
    """A switch and a weight per spatial term; defaults are the 'plus' preset's."""
    out: list[Any] = []
    for term in SPATIAL_TERMS:
        out.append(io.Boolean.Input(term, default=bool(getattr(PLUS, f"spatial_{term}")),
                                    tooltip=f"Switch the {term} term on: {_TERM_HELP[term]}. Adds nothing when the "
                                            "words say no such thing."))
        out.append(io.Float.Input(f"{term}_weight", default=float(getattr(PLUS, WEIGHT_FIELDS[term])), min=0.0,
                                  max=100.0, step=0.01,
                                  tooltip=f"Weight of the {term} term ("
                                          + ("in units of the fused score" if term == "negatives" else
                                             "in units of the pool margin: above 1 a one-hot term decides among "
                                             "the target's instances")
                                          + f"; 'plus' preset: {getattr(PLUS, WEIGHT_FIELDS[term]):g})."))
    return out


class RefDiffSpatial(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffSpatial",
            display_name="RefDiff Spatial Terms",
            category=sockets.CATEGORY,
            description="Beyond the paper: fuse s_G and s_D (Eq. 1, 2) and add what the words say about the "
                        "target's place (left, middle, second from the left), size (biggest) and relations (next "
                        "to X), scored on the best candidates; connect its scores to RefDiffFuseSelect's fused "
                        "input. Bypassing it (scores straight to RefDiffFuseSelect) is the ablation.",
            inputs=[
                sockets.Proposals.Input("proposals", tooltip="Proposals the scores were computed on."),
                sockets.Parse.Input("parse", tooltip="The parse of the referring expression(s) (RefDiffParseText): "
                                                     "its words give the terms."),
                sockets.Scores.Input("generative", optional=True, tooltip="s_G from RefDiffGenerativeScore."),
                sockets.Scores.Input("discriminative", optional=True, tooltip="s_D from RefDiffCLIPScore."),
                sockets.Attention.Input("attention", optional=True,
                                        tooltip="The captured attention the generative map came from: the "
                                                "relations read the other object's own map from it."),
                sockets.ClipModel.Input("clip", optional=True,
                                        tooltip="The CLIP model (RefDiffLoadCLIP), for the negatives term (applied "
                                                "when discriminative is connected)."),
                io.Image.Input("image", optional=True, tooltip="The original images, for the negatives term."),
                io.Combo.Input("preset", options=sockets.PRESET_NAMES, default="plus",
                               tooltip="Preset for the fusion weights, the pool and the relation constants (the "
                                       "term switches and weights are this node's own inputs). "
                                       + sockets.PLUS_TOOLTIP),
                io.Float.Input("gen_weight", default=-1.0, min=-1.0, max=100.0, step=0.01,
                               tooltip="Weight of s_G when both scores are given; -1 = the preset's."),
                io.Float.Input("disc_weight", default=-1.0, min=-1.0, max=100.0, step=0.01,
                               tooltip="Weight of s_D when both scores are given; -1 = the preset's."),
                io.Int.Input("pool", default=int(PLUS.spatial_pool), min=1, max=100,
                             tooltip="At most this many whole instances of the target, best first, are ranked by "
                                     "the terms: bands, groups, parts, duplicates and candidates scoring more than "
                                     "the preset's margin below the best instance are left out and get no term."),
                *_term_inputs(),
            ],
            outputs=[
                sockets.Scores.Output(display_name="scores",
                                      tooltip="The fused score plus the terms, per proposal (REFDIFF_SCORES of "
                                              "kind fused): connect it to RefDiffFuseSelect's fused input."),
                io.String.Output(display_name="info", tooltip="Per image what the words say (target, attributes, "
                                                              "spatial terms, relations) and what was applied."),
            ],
        )

    @classmethod
    def execute(cls, proposals, parse, preset, gen_weight, disc_weight, pool, generative=None, discriminative=None,
                attention=None, clip=None, image=None, **terms: Any) -> io.NodeOutput:
        if generative is None and discriminative is None:
            raise InputError("scores: connect generative, discriminative or both to RefDiffSpatial")
        on = [t for t in SPATIAL_TERMS if terms.get(t)]
        weights = {t: float(terms[f"{t}_weight"]) for t in SPATIAL_TERMS if f"{t}_weight" in terms}
        p, chosen = spatial_preset(sockets.preset(preset), on, weights, pool)
        negatives = clip_negatives(clip, image, len(proposals), p) if clip is not None and image is not None else None
        progress = runtime.Progress(len(proposals))
        scores, notes = spatial_score_batch(proposals, generative, discriminative, parse, p, chosen, attention,
                                            negatives, None if gen_weight < 0 else gen_weight,
                                            None if disc_weight < 0 else disc_weight,
                                            progress=progress.step)
        skipped = [n.strip() for n in notes if "not applied" in n]
        if skipped:
            runtime.warn(skipped)
            runtime.show_on_node(skipped)
        return io.NodeOutput(scores, "\n".join(notes))


NODES = [RefDiffSpatial]
__all__ = ["NODES", "RefDiffSpatial"]
