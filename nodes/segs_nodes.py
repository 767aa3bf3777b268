"""SEGS nodes (ComfyUI-Impact-Pack's detection format): SEGS from any detector as proposals, and the fused
selection as SEGS for Impact's detailers. Neither needs Impact Pack installed (segs_convert)."""
from __future__ import annotations

from comfy_api.latest import io
from comfy_execution.validation import validate_node_input

from refdiff.errors import InputError
from refdiff.external import RESIZE_MODES

from . import runtime, select_nodes, sockets
from .input_checks import linked_type_problem
from .segs_convert import SEGS_TYPE, one_image, segs_proposal_batch, selection_segs

Segs = io.Custom(SEGS_TYPE)
ONE_IMAGE_NOTE = " A SEGS describes one image (Impact Pack): the image batch must hold one image."


class RefDiffSEGSProposals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffSEGSProposals",
            display_name="RefDiff SEGS Proposals",
            category=sockets.CATEGORY,
            description="Impact Pack SEGS (from any detector: YOLO / GroundingDINO / SAM / SAM 2 detectors) as "
                        "candidate masks: each SEG's cropped mask pasted at its crop region, then read as any "
                        "external mask (inside where >= threshold; empty masks left out and named)."
                        + ONE_IMAGE_NOTE,
            inputs=[
                Segs.Input("segs", tooltip="SEGS of the image, ((H, W), [SEG, ...]) as Impact Pack's detectors "
                                           "output them; each SEG becomes one proposal."),
                io.Image.Input("image", tooltip="The one image the SEGS were detected on (batch of 1)."),
                io.Combo.Input("resize", options=list(RESIZE_MODES), default="error",
                               tooltip="When the SEGS size differs from the image's: 'error' refuses, 'nearest' "
                                       "resizes the masks (same aspect ratio only)."),
                io.Float.Input("threshold", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="A soft SEG mask is inside where its value is >= this."),
            ],
            outputs=[
                sockets.Proposals.Output(display_name="proposals", tooltip="One proposal per non-empty SEG "
                                                                           "(REFDIFF_PROPOSALS), in SEG order."),
                io.String.Output(display_name="info", tooltip="How many proposals the SEGS gave, their labels, "
                                                              "and what was left out or resized."),
            ],
        )

    @classmethod
    def validate_inputs(cls, resize="error", threshold=0.5) -> bool | str:
        if isinstance(resize, str) and resize not in RESIZE_MODES:
            return f"resize: must be one of {list(RESIZE_MODES)}, got {resize!r}"
        if isinstance(threshold, (int, float)) and not 0 < threshold <= 1:
            return f"threshold: must be in (0, 1], got {threshold!r}"
        return True

    @classmethod
    def execute(cls, segs, image, resize, threshold) -> io.NodeOutput:
        proposals, info = segs_proposal_batch(segs, image, resize, threshold)
        runtime.warn(proposals.warnings)
        runtime.show_on_node(proposals.warnings)
        return io.NodeOutput(proposals, "\n".join(info))


class RefDiffToSEGS(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffToSEGS",
            display_name="RefDiff to SEGS",
            category=sockets.CATEGORY,
            description="The fused selection (as RefDiff Fuse & Select makes it) as Impact Pack SEGS: the selected "
                        "proposal and the top-k, each SEG with its box, a crop region crop_factor times the box, "
                        "its mask, the image crop, the fused score as confidence and the expression as label. "
                        "Empty proposals make no SEG." + ONE_IMAGE_NOTE,
            inputs=[
                sockets.Proposals.Input("proposals", tooltip="Proposals the scores were computed on."),
                io.Image.Input("image", tooltip="The one image of the proposals (batch of 1), for the crops."),
                sockets.Scores.Input("generative", optional=True, tooltip="s_G from RefDiffGenerativeScore."),
                sockets.Scores.Input("discriminative", optional=True, tooltip="s_D from RefDiffCLIPScore."),
                sockets.preset_input("Preset fusion weights: official s_D + 0.05 s_G; paper 0.1 s_G + 0.9 s_D."),
                io.Float.Input("gen_weight", default=-1.0, min=-1.0, max=100.0, step=0.01,
                               tooltip="Weight of s_G when both scores are given; -1 = the preset's."),
                io.Float.Input("disc_weight", default=-1.0, min=-1.0, max=100.0, step=0.01,
                               tooltip="Weight of s_D when both scores are given; -1 = the preset's."),
                io.Int.Input("top_k", default=5, min=1, max=100,
                             tooltip="How many best proposals go to the top_k SEGS, best first."),
                io.Int.Input("pin_index", default=-1, min=-1, max=10000,
                             tooltip="Select this proposal index instead of the best (-1 = by score)."),
                io.Float.Input("crop_factor", default=3.0, min=1.0, max=100.0, step=0.1,
                               tooltip="Crop region size as a multiple of the mask's box (Impact Pack's "
                                       "crop_factor; 1 = the box itself), moved inside the image."),
                io.String.Input("label", default="",
                                tooltip="Label of every SEG; empty = the expression of parse when connected, "
                                        "else 'refdiff'."),
                sockets.Parse.Input("parse", optional=True,
                                    tooltip="The parsed expression, whose text labels the SEGs when label is "
                                            "empty."),
                sockets.Scores.Input("fused", optional=True,
                                     tooltip="Scores from RefDiffSpatial (s_G and s_D fused there, spatial terms "
                                             "added), ranked as they are; connect it instead of generative and "
                                             "discriminative (gen_weight and disc_weight then do not apply)."),
            ],
            outputs=[
                Segs.Output(display_name="segs", tooltip="The selected proposal as SEGS (no SEG when nothing "
                                                         "was selected)."),
                Segs.Output(display_name="top_k_segs", tooltip="The top-k proposals as SEGS, best first."),
                io.String.Output(display_name="scores", tooltip="Every ranked proposal with its scores, and "
                                                                "what became a SEG."),
            ],
        )

    @classmethod
    def validate_inputs(cls, input_types=None) -> bool | str:
        # At queue time: at least one kind of score must be linked (asking for input_types turns ComfyUI's own
        # type check of the linked inputs off, hence linked_type_problem).
        received = input_types or {}
        problem = linked_type_problem(received, cls.INPUT_TYPES(), validate_node_input)
        if problem:
            return problem
        if not {"generative", "discriminative", "fused"} & set(received):
            return ("scores: connect generative scores (RefDiffGenerativeScore), discriminative scores "
                    "(RefDiffCLIPScore) or both, or RefDiffSpatial's scores to fused")
        return True

    @classmethod
    def execute(cls, proposals, image, preset, gen_weight, disc_weight, top_k, pin_index, crop_factor, label,
                generative=None, discriminative=None, parse=None, fused=None) -> io.NodeOutput:
        gw, dw = select_nodes.fusion_weights(sockets.preset(preset), generative is not None and
                                             discriminative is not None, None if gen_weight < 0 else gen_weight,
                                             None if disc_weight < 0 else disc_weight)
        if len(proposals) != 1:
            raise InputError(f"proposals: they are of {len(proposals)} images, but a SEGS describes one image (Impact "
                             "Pack); give the proposals of one image (split the image batch before the proposal "
                             "node, e.g. with ImageFromBatch)")
        one_image(image)
        sel = select_nodes.fuse_select(proposals, generative, discriminative, gw, dw, top_k, pin_index,
                                       fused_scores=fused)
        if not label.strip() and parse is not None and len(parse) == 1:
            label = parse.items[0].parsed.text
        segs, top, info = selection_segs(proposals.masks[0], sel.fused[0], sel.indices[0], sel.orders[0], image,
                                         label, crop_factor)
        return io.NodeOutput(segs, top, f"{sel.table}\n{info}")


NODES = [RefDiffSEGSProposals, RefDiffToSEGS]
__all__ = ["Segs", "RefDiffSEGSProposals", "RefDiffToSEGS", "NODES"]
