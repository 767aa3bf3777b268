"""Fusion and selection node (Eq. 1, 2): the best proposal per image, the top-k, and the scores."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import folder_paths
import torch
from comfy_api.latest import io, ui

from refdiff.config import Preset
from refdiff.errors import InputError
from refdiff.scoring import fuse_and_select
from refdiff.scoring import fusion_weights as preset_fusion_weights

from . import previews, runtime, sockets, tensors
from .wire_types import ProposalBatch, ScoreBatch, check_unfused_scores


@dataclass
class Selection:
    """What fuse_select returns: masks per image, the top-k batch, the chosen indices and a text table."""

    best: torch.Tensor  # MASK [B, H, W]
    top_k: torch.Tensor  # MASK [B * k, H, W], image-major, empty masks where an image has fewer than k
    indices: list[int]  # chosen proposal per image, -1 when there is none
    fused: list[torch.Tensor]
    table: str
    orders: list[list[int]] = field(default_factory=list)  # per image the top-k proposal indices, best first


def fusion_weights(preset: Preset, both: bool, gen_weight: float | None = None,
                   disc_weight: float | None = None) -> tuple[float, float]:
    """(gen_weight, disc_weight): the preset's (or given) weights when both scores are fused, else 1 and 1."""
    return preset_fusion_weights(preset, both, gen_weight, disc_weight)


# ------------------------------------------------------------------------------------------ stage function
def score_parts(generative: ScoreBatch | None, discriminative: ScoreBatch | None, fused: ScoreBatch | None,
                i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Image i's s_G and s_D: from their inputs, or those the fused scores were made of."""
    if fused is not None:
        g, d = fused.parts.get("generative"), fused.parts.get("discriminative")
        return (g[i] if g is not None else None), (d[i] if d is not None else None)
    return (generative.scores[i] if generative is not None else None,
            discriminative.scores[i] if discriminative is not None else None)


def spatial_of(fused: ScoreBatch | None, i: int) -> Any:
    """Image i's refdiff.spatial.SpatialScores of RefDiffSpatial's scores; None without them."""
    if fused is None or i >= len(fused.spatial):
        return None
    return fused.spatial[i]


def fuse_select(proposals: ProposalBatch, generative: ScoreBatch | None, discriminative: ScoreBatch | None,
                gen_weight: float, disc_weight: float, top_k: int = 5, pin_index: int = -1,
                fused_scores: ScoreBatch | None = None) -> Selection:
    """s = gen_weight s_G + disc_weight s_D per proposal; the best (or the pinned) proposal of each image: one
    refdiff.scoring.fuse_and_select call per image (the given weights when both scores are connected; one
    score alone is used as it is).

    An image without proposals gets an empty mask of its size, never the whole image. ``fused`` (RefDiffSpatial's
    scores: fused already, spatial terms added) is ranked as it is, in place of the two scores.
    """
    if fused_scores is not None:
        if generative is not None or discriminative is not None:
            raise InputError("fused: these scores already hold s_G and s_D (RefDiffSpatial); disconnect generative "
                             "and discriminative, or disconnect fused")
        if fused_scores.kind != "fused":
            raise InputError(f"fused: these are {fused_scores.kind} scores; connect RefDiffSpatial's scores here, "
                             f"or connect them to the {fused_scores.kind} input")
        fused_scores.check_against(proposals, "fused")
    else:
        check_unfused_scores(proposals, generative, discriminative,
                             "come from RefDiffSpatial (already fused); connect them to the fused input instead")
    best, tops, indices, fused_all, orders, lines = [], [], [], [], [], []
    for i, masks in enumerate(proposals.masks):
        n, h, w = masks.shape
        s_g, s_d = score_parts(generative, discriminative, fused_scores, i)
        try:
            if fused_scores is not None:
                choice = fuse_and_select(masks, None, fused_scores.scores[i], top_k=top_k, pin_index=pin_index,
                                         gen_weight=1.0, disc_weight=1.0)
                gw, dw = fused_scores.weights
            else:
                choice = fuse_and_select(masks, s_g, s_d, top_k=top_k, pin_index=pin_index, gen_weight=gen_weight,
                                         disc_weight=disc_weight)
                gw, dw = choice.gen_weight, choice.disc_weight
        except InputError as exc:
            raise InputError(f"image {i}: {exc}") from exc
        fused, order, chosen = choice.fused, choice.top_k, choice.index
        best.append(choice.mask)
        empty = torch.zeros(h, w, dtype=torch.bool)
        tops.extend([masks[j] for j in order] + [empty] * (top_k - len(order)))
        indices.append(chosen)
        fused_all.append(fused)
        orders.append([int(j) for j in order])
        applied = spatial_of(fused_scores, i)
        header = (f"image {i}: {n} proposals ({proposals.source}), weights s_G x {gw:g}, s_D x {dw:g}"
                  + (", spatial terms " + (", ".join(applied.contributions) or "none") if fused_scores is not None
                     else ""))
        lines.append(previews.score_table(masks, fused, order, chosen, s_g, s_d, header,
                                          base=applied.base if applied is not None else None,
                                          terms=applied.contributions if applied is not None else None))
        if i in proposals.notes:  # why this image has no proposal (the post-filter removed them all, ...)
            lines.append(f"  why: {proposals.notes[i]}")
    top_batch = tensors.masks_to_output(tops) if tops else torch.zeros(0, *proposals.masks[0].shape[1:])
    return Selection(tensors.masks_to_output(best), top_batch, indices, fused_all, "\n".join(lines), orders)


def preview_selection(image: torch.Tensor | None, best: torch.Tensor) -> torch.Tensor:
    """The chosen mask tinted over each image (black where no image is given), IMAGE [B, H, W, 3]."""
    frames = []
    for i in range(best.shape[0]):
        frame = None
        if image is not None:
            frame = image[i if image.shape[0] > 1 else 0]
            if tuple(frame.shape[:2]) != tuple(best.shape[1:]):
                frame = None
        frames.append(previews.overlay(frame, best[i]))
    return runtime.intermediate(torch.stack(frames))


def proposal_galleries(proposals: ProposalBatch, generative: ScoreBatch | None, discriminative: ScoreBatch | None,
                       selection: Selection, image: torch.Tensor | None, pin_index: int = -1,
                       weights: tuple[float, float] = (1.0, 1.0), fused_scores: ScoreBatch | None = None
                       ) -> list[dict]:
    """What the web extension shows on the node: per image (at most VIEW_MAX_IMAGES) the proposals ranked by
    fused score with their scores and thumbnails in ComfyUI's temp folder (see previews.proposal_gallery_view)."""
    prefix = "refdiff_proposals_" + uuid.uuid4().hex[:10]
    views = []
    for i, masks in enumerate(proposals.masks[:previews.VIEW_MAX_IMAGES]):
        n, h, w = masks.shape
        size = previews.thumb_size(h, w)
        frame = None
        if image is not None:
            candidate = image[i if image.shape[0] > 1 else 0]
            if tuple(candidate.shape[:2]) == (h, w):
                frame = previews.thumb_image(candidate, size)
        fused = selection.fused[i]
        shown = previews.gallery_order(fused, selection.indices[i])
        frames = previews.mask_frames(frame, previews.thumb_masks(masks[shown] if shown else masks[:0], size))
        thumbs = previews.save_thumbnails(list(frames), folder_paths.get_temp_directory(), f"{prefix}_{i}")
        s_g, s_d = score_parts(generative, discriminative, fused_scores, i)
        applied = spatial_of(fused_scores, i)
        view = previews.proposal_gallery_view(
            masks, fused, s_g, s_d, shown, selection.indices[i], thumbs, image=i, pin_index=pin_index,
            weights=fused_scores.weights if fused_scores is not None else weights, source=proposals.source,
            base=applied.base if applied is not None else None,
            terms=applied.contributions if applied is not None else None, spatial=fused_scores is not None)
        view["batch"] = len(proposals)
        views.append(view)
    return views


# ------------------------------------------------------------------------------------------ node
class RefDiffFuseSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffFuseSelect",
            display_name="RefDiff Fuse & Select",
            category=sockets.CATEGORY,
            description="Fuse the scores (Eq. 1, 2: s = gen_weight s_G + disc_weight s_D; one kind alone is used "
                        "as it is) and output the best proposal of each image.",
            inputs=[
                sockets.Proposals.Input("proposals", tooltip="Proposals the scores were computed on."),
                sockets.Scores.Input("generative", optional=True, tooltip="s_G from RefDiffGenerativeScore."),
                sockets.Scores.Input("discriminative", optional=True, tooltip="s_D from RefDiffCLIPScore."),
                sockets.preset_input("Preset fusion weights: official s_D + 0.05 s_G; paper 0.1 s_G + 0.9 s_D."),
                io.Float.Input("gen_weight", default=-1.0, min=-1.0, max=100.0, step=0.01,
                               tooltip="Weight of s_G when both scores are given (alpha in the paper); -1 = the "
                                       "preset's."),
                io.Float.Input("disc_weight", default=-1.0, min=-1.0, max=100.0, step=0.01,
                               tooltip="Weight of s_D when both scores are given (1 - alpha); -1 = the preset's."),
                io.Int.Input("top_k", default=5, min=1, max=100,
                             tooltip="How many best proposals per image go to the top_k output."),
                io.Int.Input("pin_index", default=-1, min=-1, max=10000,
                             tooltip="Select this proposal index instead of the best (-1 = by score)."),
                io.Image.Input("image", optional=True, tooltip="Original images, for the preview."),
                sockets.Scores.Input("fused", optional=True,
                                     tooltip="Scores from RefDiffSpatial (s_G and s_D fused there, spatial terms "
                                             "added), ranked as they are; connect it instead of generative and "
                                             "discriminative (gen_weight and disc_weight then do not apply)."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="The selected mask per image, MASK [B, H, W] (empty "
                                                            "when nothing qualifies)."),
                io.Mask.Output(display_name="top_k", tooltip="The k best masks of each image, MASK [B*k, H, W], "
                                                             "image by image, best first (empty masks pad)."),
                io.String.Output(display_name="scores", tooltip="Every ranked proposal with its scores."),
                io.Image.Output(display_name="preview", tooltip="The selected mask over the image."),
            ],
        )

    @classmethod
    def execute(cls, proposals, preset, gen_weight, disc_weight, top_k, pin_index, generative=None,
                discriminative=None, image=None, fused=None) -> io.NodeOutput:
        gw, dw = fusion_weights(sockets.preset(preset), generative is not None and discriminative is not None,
                                None if gen_weight < 0 else gen_weight, None if disc_weight < 0 else disc_weight)
        sel = fuse_select(proposals, generative, discriminative, gw, dw, top_k, pin_index, fused)
        preview = preview_selection(image, sel.best)
        galleries = proposal_galleries(proposals, generative, discriminative, sel, image, pin_index, (gw, dw), fused)
        # the preview image, and what web/js/refdiff.js shows on the node
        ui_output = {**ui.PreviewImage(preview, cls=cls).as_dict(), "refdiff_proposals": galleries}
        return io.NodeOutput(sel.best, sel.top_k, sel.table, preview, ui=ui_output)


NODES = [RefDiffFuseSelect]
__all__ = ["Selection", "fusion_weights", "score_parts", "spatial_of", "fuse_select", "preview_selection",
           "proposal_galleries", "NODES",
           "RefDiffFuseSelect"]
