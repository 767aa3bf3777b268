"""All-in-one node: every stage of Ref-Diff for an IMAGE batch, built from the stage nodes' own functions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io, ui
from comfy_execution.validation import validate_node_input

from refdiff.capture import LayerSelector
from refdiff.config import (Preset, get_variant, needs_map, prompt_kwargs, proposal_source, sam_generator_kwargs,
                            spatial_terms_of)
from refdiff.errors import InputError
from refdiff.flow import DEFAULT_FLOW_T
from refdiff.text import DEFAULT_NO_NOUN

from refdiff.external import RESIZE_MODES

from . import (comfy_backend, diffusion_nodes, dit_backend, dit_capture, external_masks, map_nodes, runtime,
               select_nodes, sockets, text_nodes, token_positions)
from .dit_options import (DEFAULT_BACKGROUND, DEFAULT_BLOCKS, DEFAULT_MAP_KIND, DitOptions, dit_inputs_on_unet,
                          dit_options, dit_options_problem)
from .input_checks import (PROPOSAL_MODE_CHOICES, PROPOSALS_INPUT, VARIANT_CHOICES, capture_factor, concept_mode,
                           linked_type_problem, proposal_mode_preset, variant_inputs_problem)
from .proposal_filter import AREA_FILTER_OPTIONS, AREA_FILTER_TOOLTIP, FilterSettings, segment_filter_settings


@dataclass
class Segmentation:
    """What segment returns: the selection, c per image ([B, H, W], zeros when the variant needs no diffusion),
    the report, and the warnings (a text naming no object, an image left without a proposal and why)."""

    selection: select_nodes.Selection
    c: torch.Tensor
    report: str
    warnings: list[str]


def segment(model: Any, clip: Any, vae: Any, image: torch.Tensor, text: str, variant: str, preset: Preset,
            seed: int = 0, sam: Any = None, clip_scorer: Any = None, amg: dict | None = None,
            top_k: int | None = None, filter_settings: FilterSettings | None = None, factor: int | None = None,
            no_noun: str = DEFAULT_NO_NOUN, external: torch.Tensor | None = None, external_counts: str = "",
            external_resize: str = "error", dit: DitOptions | None = None, sam3: Any = None) -> Segmentation:
    """Run one variant (full, G, GS, DS, sam-clip) on every image. ``factor`` None and ``filter_settings`` None
    take the preset's; the checks that need no computation (models connected, the MODEL's cross-attention at
    ``factor``, the text, the ``external`` masks) come before the VAE encode. ``external`` (a MASK batch split
    between the images by ``external_counts``, nodes/external_masks.py) replaces SAM's proposals, automatic or
    prompted, without SAM's post-filter. A Flux / SD 3 MODEL gives c from its joint attention, read as ``dit``
    says (section 15 defaults when None). ``sam3`` (RefDiff SAM 3 Loader) gives the SAM variants SAM 3's instances
    of the target noun under proposal_mode "concept" (or a preset with concept_with_sam3, plus), through the same
    library function as RefDiff Concept Proposals; an image with none falls back to SAM's automatic proposals when
    a SAM is connected (said in the warnings)."""
    v = get_variant(variant)
    p = preset
    batch, height, width = int(image.shape[0]), int(image.shape[1]), int(image.shape[2])
    connected = {name for name, value in (("sam", sam), ("clip_scorer", clip_scorer), (PROPOSALS_INPUT, external),
                                          ("sam3", sam3)) if value is not None}
    concept = p.proposal_mode == "concept" or (p.concept_with_sam3 and sam3 is not None)
    problem = variant_inputs_problem(v.name, connected, concept=concept)
    if problem:
        raise InputError(problem)
    given = None
    if external is not None:
        given = external_masks.mask_proposal_batch(external, image, external_counts, external_resize,
                                                   name=PROPOSALS_INPUT, counts_name="proposal_counts")
        p = p.with_(proposal_mode="automatic", concept_with_sam3=False)  # they stand in for SAM's or SAM 3's
    source = proposal_source(v, p, sam3 is not None)
    with_map = needs_map(v, p, sam3 is not None)  # prompted SAM proposals need c, even for DS and sam-clip
    layers = None
    joint = with_map and dit_backend.dit_family(model) is not None
    if joint:
        dit_backend.check_dit_family(model)
        if factor:
            raise InputError("factor: picks UNet cross-attention levels; a Flux / SD 3 MODEL has none: leave factor "
                             "at -1 and choose dit_blocks")
    elif with_map:
        # The MODEL is not known when ComfyUI validates the prompt (linked values are not passed to
        # validate_inputs), so its family and its cross-attention at the factor are checked here, first.
        problem = dit_inputs_on_unet(dit, comfy_backend.model_family(model))
        if problem:
            raise InputError(problem)
        layers = comfy_backend.select_layers(model, LayerSelector(factor or p.capture_factor, p.capture_blocks))
    parse, parse_info = text_nodes.parse_texts(text, clip, p.root_rule, p.prompt_suffix, no_noun=no_noun)
    parse.for_batch(batch, "text")
    report = [parse_info]
    warnings = list(parse.warnings)

    c = attention = None
    if with_map:
        square = diffusion_nodes.prepare_images(image, p.image_size, p.resize_filter)
        latent = diffusion_nodes.inject_noise({"samples": vae.encode(square[:, :, :, :3])}, seed, p.strength,
                                              p.ddim_steps, p.num_train_timesteps)
        if joint:
            attention, info = diffusion_nodes.capture_attention(
                model, latent, clip=clip, parse=parse, prompt_suffix=p.prompt_suffix,
                guidance_scale=p.guidance_scale, use_cfg=p.use_cfg, kind="probs", dit=dit or DitOptions())
        else:
            attention, info = diffusion_nodes.capture_attention(
                model, latent, clip=clip, parse=parse, prompt_suffix=p.prompt_suffix,
                guidance_scale=p.guidance_scale, use_cfg=p.use_cfg, kind=p.capture_kind, factor=layers[0].factor,
                blocks=p.capture_blocks)
        c = map_nodes.generative_maps(attention, parse, image, mode=p.map_resize, layer_eps=p.layer_norm_eps,
                                      map_eps=p.map_eps)
        report.append(info)
    runtime.check_interrupt()

    if given is not None:
        proposals, lines = given
        runtime.warn(proposals.warnings)
        report.append(f"external masks: {proposals.describe()} (no post-filter)\n" + "\n".join(lines))
    elif v.proposals == "threshold":
        proposals = map_nodes.threshold_batch(c, p.thresholds)
    elif source == "concept":
        proposals, lines = concept_stage(sam3, sam, image, parse, p, amg, filter_settings)
        report.append("SAM 3 concept proposals: " + proposals.describe() + "\n" + "\n".join(lines))
    elif source == "prompted":
        from . import sam_nodes

        settings = filter_settings or segment_filter_settings(p)
        proposals = sam_nodes.prompted_proposal_batch(sam, image, c, prompt_kwargs(p), settings,
                                                      lower_min_area="lower min_area")
        report.append(f"SAM prompted at c's peaks: {proposals.describe()} ({settings.describe()})\n"
                      + "\n".join(proposals.prompts_info))
    else:
        from . import sam_nodes

        settings = filter_settings or segment_filter_settings(p)
        proposals = sam_nodes.sam_proposal_batch(sam, image, amg or sam_generator_kwargs(p), settings,
                                                 lower_min_area="lower min_area")
        report.append(f"SAM {proposals.describe()} ({settings.describe()})")
    s_g = map_nodes.generative_score_batch(c, proposals, eps=p.score_eps) if v.generative else None
    s_d = None
    if v.discriminative:
        from . import clip_nodes

        s_d = clip_nodes.clip_score_batch(clip_scorer, image, proposals, parse, p,
                                          mode="sam-clip" if v.sam_clip else "ref-diff")
    gw, dw = select_nodes.fusion_weights(p, s_g is not None and s_d is not None)
    terms = spatial_terms_of(p, v.spatial)
    if terms and (s_g is not None or s_d is not None):
        fused, notes = spatial_terms(proposals, s_g, s_d, parse, p, terms, attention, clip_scorer, image)
        report.append("spatial terms (beyond the paper)\n" + "\n".join(notes))
        skipped = [n.strip() for n in notes if "not applied" in n]
        runtime.warn(skipped)
        warnings.extend(skipped)
        selection = select_nodes.fuse_select(proposals, None, None, gw, dw, top_k or p.top_k, fused_scores=fused)
    else:
        selection = select_nodes.fuse_select(proposals, s_g, s_d, gw, dw, top_k or p.top_k)
    for i, index in enumerate(selection.indices):
        if i in proposals.notes:
            warnings.append(f"image {i}: {proposals.notes[i]}")
        elif index < 0:
            note = f"image {i}: no proposal to select ({proposals.source} proposals: none), so the mask is empty"
            runtime.warn([note])
            warnings.append(note)
    report.append(f"variant {v.name}, preset {p.name}\n{selection.table}")
    if warnings:
        report.append("\n".join(f"warning: {w}" for w in warnings))
    if c is None:
        c = torch.zeros(batch, height, width)
    return Segmentation(selection, c, "\n".join(report), warnings)


def concept_stage(sam3: Any, sam: Any, image: torch.Tensor, parse: Any, preset: Preset, amg: dict | None,
                  filter_settings: FilterSettings | None) -> tuple[Any, list[str]]:
    """SAM 3's instances of each image's target noun (sam3_nodes.concept_proposal_batch, i.e.
    refdiff.sam3_models.concept_proposals); an image with none gets SAM's automatic proposals when a SAM is
    connected, as refdiff.RefDiff falls back, else none; either way its note says so."""
    from . import sam3_nodes

    expressions = sam3_nodes.concept_expressions(int(image.shape[0]), parse, "", preset)
    proposals, _, lines = sam3_nodes.concept_proposal_batch(sam3, image, expressions, preset)
    for i in sorted(proposals.notes):
        if sam is None:
            proposals.notes[i] += "; connect a SAM to 'sam' to fall back to its automatic proposals"
            continue
        from . import sam_nodes

        settings = filter_settings or segment_filter_settings(preset)
        fallback = sam_nodes.sam_proposal_batch(sam, image[i:i + 1], amg or sam_generator_kwargs(preset), settings,
                                                lower_min_area="lower min_area")
        proposals.masks[i] = fallback.masks[0]
        reason = proposals.notes.pop(i).split(", so ")[0]
        proposals.notes.update({i: fallback.notes[0]} if 0 in fallback.notes else {})
        lines.append(f"image {i}: {reason}, so the preset's automatic SAM proposals are used instead: "
                     f"{fallback.masks[0].shape[0]} ({settings.describe()})")
    runtime.warn([line for line in lines if "automatic SAM proposals are used instead" in line])
    return proposals, lines


def spatial_terms(proposals: Any, s_g: Any, s_d: Any, parse: Any, preset: Preset, terms: tuple[str, ...],
                  attention: Any, clip_scorer: Any, image: torch.Tensor) -> tuple[Any, list[str]]:
    """The preset's spatial terms (beyond the paper; on in ``plus``) on the fused scores, as RefDiffSpatial adds
    them: relations from the same capture, negatives from the CLIP scorer where refdiff.spatial.negatives_apply
    (a variant with s_D)."""
    from . import spatial_nodes  # spaCy's parser: needed only when a term is on

    negatives = (spatial_nodes.clip_negatives(clip_scorer, image, len(proposals), preset)
                 if clip_scorer is not None else None)
    return spatial_nodes.spatial_score_batch(proposals, s_g, s_d, parse, preset, terms, attention, negatives)


class RefDiffSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = sam_generator_kwargs(Preset(name="defaults"))
        return io.Schema(
            node_id="RefDiffSegment",
            display_name="RefDiff Segment (all-in-one)",
            category=sockets.CATEGORY,
            description="Referring segmentation in one node: the mask of the object the text describes, for every "
                        "image. Runs the same stages as the separate RefDiff nodes. An image left without a "
                        "mask, or a text naming no object, is named on the node, in the report and the console.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x/2.x or SDXL MODEL (used by the variants with the generative "
                                                     "map; not the SDXL refiner), or a Flux.1 / SD 3 MODEL (its "
                                                     "joint attention, read with the Flux / SD 3 inputs)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (prompt encoding and token positions); for "
                                              "Flux / SD 3 their text encoders (DualCLIPLoader / TripleCLIPLoader)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE."),
                io.Image.Input("image", tooltip="Images to segment."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="Referring expression: one line for all images, or one line per image."),
                io.Combo.Input("variant", options=VARIANT_CHOICES, default="full",
                               tooltip="full = SAM + s_G + s_D; G = threshold proposals + s_G; GS = SAM + s_G; "
                                       "DS = SAM + s_D; sam-clip = SAM + CLIP crop baseline; prompted = full with "
                                       "SAM prompted at the peaks of c (fast, beyond the paper)."),
                sockets.preset_input(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the injected noise."),
                io.Int.Input("image_size", default=0, min=0, max=4096, step=64,
                             tooltip="Side of the square the UNet sees; 0 = the preset's (1024)."),
                io.Int.Input("top_k", default=0, min=0, max=100, tooltip="Proposals listed per image; 0 = preset's."),
                io.Int.Input("points_per_side", default=d["points_per_side"], min=1, max=128,
                             tooltip="SAM: point grid per image side."),
                io.Float.Input("pred_iou_thresh", default=d["pred_iou_thresh"], min=0.0, max=1.0, step=0.01,
                               tooltip="SAM: minimum predicted IoU of a mask."),
                io.Float.Input("stability_score_thresh", default=d["stability_score_thresh"], min=0.0, max=1.0,
                               step=0.01, tooltip="SAM: minimum stability score of a mask."),
                io.Int.Input("keep_largest", default=-1, min=-1, max=1000, optional=True,
                             tooltip="SAM post-filter: keep only the N largest masks; -1 = the preset's (official "
                                     "10, paper all), 0 = all."),
                io.Int.Input("min_area", default=-1, min=-1, max=100000000, optional=True,
                             tooltip="SAM post-filter: drop masks of at most this many pixels (at a 640 x 480 image "
                                     "when area_filter is relative); -1 = the preset's (official 10000, paper 0), "
                                     "0 = no threshold."),
                io.Combo.Input("area_filter", options=AREA_FILTER_OPTIONS, default="preset", optional=True,
                               tooltip=AREA_FILTER_TOOLTIP),
                io.Int.Input("factor", default=-1, min=-1, max=64, optional=True,
                             tooltip="Capture the cross-attention layers whose grid is the latent downsampled by "
                                     "this factor (4: 32x32 for a 1024 image); -1 = the preset's (4). A MODEL "
                                     "without cross-attention there is refused before any work, with the factors "
                                     "it has. UNet only: leave -1 for Flux / SD 3 (dit_blocks)."),
                io.Combo.Input("proposal_mode", options=PROPOSAL_MODE_CHOICES, default="preset", optional=True,
                               tooltip="How the SAM variants get their proposals: 'automatic' = SAM's automatic "
                                       "generator on the point grid (the paper); 'prompted' = SAM prompted at the "
                                       "peaks of c (a few object-level masks, much faster; DS and sam-clip then "
                                       "run the diffusion pass for c; beyond the paper); 'concept' = SAM 3's "
                                       "instances of the target noun (connect a RefDiff SAM 3 Loader to 'sam3'; no "
                                       "SAM needed); 'preset' = the preset's (automatic in official and paper, "
                                       "prompted in plus, concept in plus when a SAM 3 is connected)."),
                text_nodes.no_noun_input(),
                sockets.SamModel.Input("sam", optional=True, tooltip="SAM (variants full, GS, DS, sam-clip)."),
                sockets.ClipModel.Input("clip_scorer", optional=True,
                                        tooltip="CLIP scorer (variants full, DS, sam-clip)."),
                io.Mask.Input(PROPOSALS_INPUT, optional=True,
                              tooltip="Optional MASK batch of candidate masks from any segmenter (SAM 2, SAM 3, "
                                      "GroundingDINO + SAM, ...): when connected they replace SAM's proposals "
                                      "(variants full, GS, DS, sam-clip; no SAM needed, no post-filter); inside "
                                      "where >= 0.5, empty masks left out."),
                io.String.Input("proposal_counts", default="", optional=True,
                                tooltip="With proposals and several images: how many masks belong to each image, "
                                        "in batch order ('3, 5'); empty with one image = every mask is its."),
                io.Combo.Input("proposals_resize", options=list(RESIZE_MODES), default="error", optional=True,
                               tooltip="Proposals of another size than the image: 'error' stops and names both "
                                       "sizes; 'nearest' resizes them when the aspect ratio agrees."),
                *dit_capture.dit_inputs(with_steps=False),
                sockets.Sam3Model.Input("sam3", optional=True,
                                        tooltip="SAM 3 from RefDiff SAM 3 Loader: under proposal_mode 'concept' (or "
                                                "preset plus) the SAM variants' proposals are its instances of the "
                                                "target noun; an image with none falls back to SAM's automatic "
                                                "proposals when 'sam' is connected."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="The selected mask per image, MASK [B, H, W]."),
                io.Mask.Output(display_name="c", tooltip="Generative map per image (zeros for DS / sam-clip with automatic proposals)."),
                io.String.Output(display_name="report", tooltip="Parse, capture, proposals, ranked scores, and "
                                                                "warnings (why a mask is empty)."),
                io.Image.Output(display_name="preview", tooltip="The selected mask over the image."),
            ],
        )

    @classmethod
    def validate_inputs(cls, text=None, variant="full", no_noun=DEFAULT_NO_NOUN, proposal_counts="", map_kind=None,
                        dit_blocks=None, flow_t=None, proposal_mode="preset", preset="official",
                        input_types=None) -> bool | str:
        # At queue time, before any model loads. ComfyUI passes widget values only; asking for input_types gives
        # the types of the linked inputs, so a missing SAM / CLIP scorer is seen here (asking for it also turns
        # ComfyUI's own check of those types off, hence linked_type_problem). The MODEL is not known yet: its
        # cross-attention factors are checked first thing in execute.
        received = input_types or {}
        return (linked_type_problem(received, cls.INPUT_TYPES(), validate_node_input)
                or variant_inputs_problem(variant, received, concept_mode(proposal_mode, preset, received))
                or token_positions.text_problem(text, no_noun)
                or external_masks.counts_problem(proposal_counts, "proposal_counts")
                or dit_options_problem(map_kind, dit_blocks, flow_t) or True)

    @classmethod
    def execute(cls, model, clip, vae, image, text, variant, preset, seed, image_size, top_k, points_per_side,
                pred_iou_thresh, stability_score_thresh, keep_largest=-1, min_area=-1, area_filter="preset",
                factor=-1, no_noun=DEFAULT_NO_NOUN, sam=None, clip_scorer=None, proposal_mode="preset", proposals=None,
                proposal_counts="", proposals_resize="error", map_kind=DEFAULT_MAP_KIND, dit_blocks=DEFAULT_BLOCKS,
                flow_t=DEFAULT_FLOW_T, background=DEFAULT_BACKGROUND, sam3=None) -> io.NodeOutput:
        p = proposal_mode_preset(sockets.preset(preset), proposal_mode)
        if image_size:
            p = p.with_(image_size=int(image_size))
        amg = {**sam_generator_kwargs(p), "points_per_side": points_per_side, "pred_iou_thresh": pred_iou_thresh,
               "stability_score_thresh": stability_score_thresh}
        result = segment(model, clip, vae, image, text, variant, p, seed=seed, sam=sam, clip_scorer=clip_scorer,
                         amg=amg, top_k=top_k or None,
                         filter_settings=segment_filter_settings(p, keep_largest, min_area, area_filter),
                         factor=None if int(factor) < 0 else capture_factor(factor, p), no_noun=no_noun,
                         external=proposals, external_counts=proposal_counts, external_resize=proposals_resize,
                         dit=dit_options(map_kind, dit_blocks, flow_t, 1, background), sam3=sam3)
        runtime.show_on_node(result.warnings)
        best = result.selection.best
        preview = select_nodes.preview_selection(image, best)
        return io.NodeOutput(best, result.c, result.report, preview, ui=ui.PreviewImage(preview, cls=cls))


NODES = [RefDiffSegment]
__all__ = ["Segmentation", "segment", "NODES", "RefDiffSegment"]
