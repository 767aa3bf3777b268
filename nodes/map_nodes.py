"""Generative map (Eq. 5), threshold proposals (Eq. 8) and generative scores (Eq. 9) nodes."""
from __future__ import annotations

import uuid

import folder_paths
import torch
from comfy_api.latest import io, ui

from refdiff.config import DEFAULT_THRESHOLDS
from refdiff.errors import InputError
from refdiff.maps import RESIZE_MODES
from refdiff.proposals import threshold_proposals
from refdiff.scoring import generative_scores

from . import attention_maps, previews, runtime, sockets, tensors, text_inputs, token_positions
from .dit_options import check_parse_context
from .wire_types import AttentionBatch, ParsedBatch, ProposalBatch, ScoreBatch


# ------------------------------------------------------------------------------------------ stage functions
def token_choices(attention: AttentionBatch, parse: ParsedBatch, batch: int,
                  token_override: str = "") -> list[token_positions.TokenChoice]:
    """The token each image's c is read from: the parse's root, or the word / position ``token_override``
    names (one line for all images or one per image); checks the parse belongs to the captured text."""
    attention_maps.check_attention_batch(attention, batch)
    check_parse_context(attention.model_family, parse.context)
    items = parse.for_batch(batch, "parse")
    overrides = text_inputs.overrides_for_batch(token_override, batch)
    choices = []
    for i, (maps_i, item, override) in enumerate(zip(attention.maps, items, overrides)):
        attention_maps.check_prompt(attention.prompts[i], item.prompt, i)
        name = "token_override" if batch == 1 else f"token_override (image {i})"
        choice = token_positions.resolve_token(item, override, maps_i.num_tokens, name=name)
        if choice.position >= maps_i.num_tokens:
            raise InputError(f"parse: root token position {choice.position} is beyond the {maps_i.num_tokens} "
                             "captured tokens")
        choices.append(choice)
    return choices


def generative_maps(attention: AttentionBatch, parse: ParsedBatch, image: torch.Tensor, mode: str = "lanczos",
                    layer_eps: float = 1e-8, map_eps: float = 1e-8, token_override: str = "") -> torch.Tensor:
    """c of every image (Eq. 5) as a MASK batch [B, H, W] at the images' size, float32 in [0, 1].

    Each image's map is the root token's attention (last BPE piece; or the token ``token_override`` names),
    per-layer min-max normalised and averaged over layers and steps, resized to the padded square and
    cropped back to the image frame.
    """
    batch = int(image.shape[0])
    choices = token_choices(attention, parse, batch, token_override)
    geometry = tensors.frame_geometry(int(image.shape[1]), int(image.shape[2]), attention.image_hw[0])
    maps = [attention_maps.token_generative_map(maps_i.combined(attention.guidance_scale), choice.position, geometry,
                                                mode=mode, layer_eps=layer_eps, map_eps=map_eps)
            for maps_i, choice in zip(attention.maps, choices)]
    return tensors.masks_to_output(maps)


def token_strips(attention: AttentionBatch, parse: ParsedBatch, image: torch.Tensor, token_override: str = "",
                 mode: str = "lanczos", layer_eps: float = 1e-8, map_eps: float = 1e-8) -> list[dict]:
    """What the web extension shows on the node: per image (at most VIEW_MAX_IMAGES) the map of every word
    over the image as thumbnails in ComfyUI's temp folder, the root token marked (see previews.token_strip_view)."""
    batch = int(image.shape[0])
    choices = token_choices(attention, parse, batch, token_override)
    items = parse.for_batch(batch, "parse")
    overrides = text_inputs.overrides_for_batch(token_override, batch)
    size = previews.thumb_size(int(image.shape[1]), int(image.shape[2]))
    prefix = "refdiff_tokens_" + uuid.uuid4().hex[:10]
    views = []
    for i in range(min(batch, previews.VIEW_MAX_IMAGES)):
        item = items[i]
        shown = previews.strip_words(item)
        positions = token_positions.item_word_positions(item)
        combined = attention.maps[i].combined(attention.guidance_scale)
        maps = previews.token_thumb_maps(combined, [positions[w][-1] for w in shown], size, mode=mode,
                                         layer_eps=layer_eps, map_eps=map_eps)
        frames = previews.heat_frames(previews.thumb_image(image[i], size), maps)
        thumbs = previews.save_thumbnails(list(frames), folder_paths.get_temp_directory(), f"{prefix}_{i}")
        view = previews.token_strip_view(item, choices[i], shown, thumbs, image=i, override=overrides[i])
        view["batch"] = batch
        views.append(view)
    return views


def threshold_batch(c: torch.Tensor, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> ProposalBatch:
    """Eq. 8 on every map of a MASK batch: {c >= mu} for each threshold mu, empty and duplicate masks dropped."""
    return ProposalBatch([threshold_proposals(m, thresholds) for m in tensors.mask_maps(c)], source="threshold")


def generative_score_batch(c: torch.Tensor, proposals: ProposalBatch, eps: float = 1e-6) -> ScoreBatch:
    """Eq. 9 for every proposal of every image: mean of c inside minus mean outside."""
    maps = tensors.mask_maps(c)
    if len(maps) == 1 and len(proposals) > 1:
        maps = maps * len(proposals)
    if len(maps) != len(proposals):
        raise InputError(f"c holds {len(maps)} map(s) but the proposals are for {len(proposals)} image(s)")
    scores = [generative_scores(m, p, eps=eps) for m, p in zip(maps, proposals.masks)]
    return ScoreBatch(scores, kind="generative", counts=[int(p.shape[0]) for p in proposals.masks])


def preview_maps(image: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The images with the heatmap of c blended over them, IMAGE [B, H, W, 3]."""
    frames = [previews.heat_frames(image[i if image.shape[0] > 1 else 0], c[i][None])[0] for i in range(c.shape[0])]
    return runtime.intermediate(torch.stack(frames))


# ------------------------------------------------------------------------------------------ nodes
class RefDiffGenerativeMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffGenerativeMap",
            display_name="RefDiff Generative Map",
            category=sockets.CATEGORY,
            description="The generative map c (Eq. 5): attention of the root token, resized to the padded square, "
                        "cropped to each image and min-max normalised to [0, 1].",
            inputs=[
                sockets.Attention.Input("attention", tooltip="Captured maps from RefDiffCaptureAttention."),
                sockets.Parse.Input("parse", tooltip="The parse of the same text (gives the root token)."),
                io.Image.Input("image", tooltip="The ORIGINAL images (before RefDiffPrepareImage): c is cropped "
                                                "to their frame and size."),
                sockets.preset_input("Preset for 'resize: preset' and the normalisation epsilons."),
                io.Combo.Input("resize", options=["preset", *RESIZE_MODES], default="preset",
                               tooltip="Resize filter of the map: 'bilinear' (paper) or 'lanczos' (official)."),
                io.String.Input("token_override", default="", optional=True,
                                tooltip="Optional: read c from this word of the text (or this token position) "
                                        "instead of the root word; empty = the parse's root. One line for all "
                                        "images or one per image. Clicking a word in the node's token strip "
                                        "sets it. Changes c and s_G only (the root word of the CLIP score "
                                        "comes from RefDiffParseText)."),
            ],
            outputs=[
                io.Mask.Output(display_name="c", tooltip="Generative map per image, MASK [B, H, W] in [0, 1]."),
                io.Image.Output(display_name="preview", tooltip="Heatmap of c over the images."),
            ],
        )

    @classmethod
    def execute(cls, attention, parse, image, preset, resize, token_override="") -> io.NodeOutput:
        p = sockets.preset(preset)
        mode = p.map_resize if resize == "preset" else resize
        c = generative_maps(attention, parse, image, mode=mode, layer_eps=p.layer_norm_eps, map_eps=p.map_eps,
                            token_override=token_override or "")
        preview = preview_maps(image, c)
        strips = token_strips(attention, parse, image, token_override or "", mode=mode, layer_eps=p.layer_norm_eps,
                              map_eps=p.map_eps)
        # the preview image, and what web/js/refdiff.js shows on the node
        ui_output = {**ui.PreviewImage(preview, cls=cls).as_dict(), "refdiff_tokens": strips}
        return io.NodeOutput(c, preview, ui=ui_output)


class RefDiffThresholdProposals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffThresholdProposals",
            display_name="RefDiff Threshold Proposals",
            category=sockets.CATEGORY,
            description="Weight-free proposals (Eq. 8): one mask {c >= mu} per threshold mu (0.05, 0.10, ..., "
                        "0.95); empty masks and duplicates are dropped.",
            inputs=[
                io.Mask.Input("c", tooltip="Generative maps from RefDiffGenerativeMap."),
                io.String.Input("thresholds", default="preset",
                                tooltip="'preset' (0.05 to 0.95 in steps of 0.05) or your own list, e.g. "
                                        "'0.3, 0.5, 0.7'."),
                sockets.preset_input(),
            ],
            outputs=[
                sockets.Proposals.Output(display_name="proposals", tooltip="Candidate masks per image "
                                                                           "(REFDIFF_PROPOSALS)."),
                io.String.Output(display_name="info", tooltip="How many proposals each image got."),
            ],
        )

    @classmethod
    def execute(cls, c, thresholds, preset) -> io.NodeOutput:
        proposals = threshold_batch(c, text_inputs.parse_thresholds(thresholds, sockets.preset(preset).thresholds))
        return io.NodeOutput(proposals, proposals.describe())


class RefDiffGenerativeScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffGenerativeScore",
            display_name="RefDiff Generative Score",
            category=sockets.CATEGORY,
            description="Generative matching (Eq. 9): for each proposal, the mean of c inside it minus the mean "
                        "outside.",
            inputs=[
                io.Mask.Input("c", tooltip="Generative maps from RefDiffGenerativeMap."),
                sockets.Proposals.Input("proposals", tooltip="Proposals of the same images (SAM or threshold)."),
                sockets.preset_input("Preset for the epsilon of the means."),
            ],
            outputs=[
                sockets.Scores.Output(display_name="scores", tooltip="s_G per proposal (REFDIFF_SCORES)."),
            ],
        )

    @classmethod
    def execute(cls, c, proposals, preset) -> io.NodeOutput:
        return io.NodeOutput(generative_score_batch(c, proposals, eps=sockets.preset(preset).score_eps))


NODES = [RefDiffGenerativeMap, RefDiffThresholdProposals, RefDiffGenerativeScore]
__all__ = ["token_choices", "generative_maps", "token_strips", "threshold_batch", "generative_score_batch",
           "preview_maps",
           "NODES", *[n.__name__ for n in NODES]]
