"""Masks from any node as proposals: a ComfyUI MASK batch (SAM 2, SAM 3, GroundingDINO + SAM, a drawing) turned
into REFDIFF_PROPOSALS for the scoring and fusion nodes, and back (docs/NODES.md, "RefDiff Mask Proposals")."""
from __future__ import annotations

from comfy_api.latest import io

from refdiff.external import RESIZE_MODES

from . import runtime, sockets
from .external_masks import counts_problem, mask_proposal_batch, proposals_to_masks
from .proposal_filter import sam_filter_settings

COUNTS_TOOLTIP = ("How many masks of the batch belong to each image, in batch order: '3, 5' = the first 3 masks "
                  "are image 0's, the next 5 image 1's. Empty with one image: every mask is that image's. With "
                  "several images it must be given (an even split is never guessed), or connect SAM3_Detect's boxes instead.")
BOXES_TOOLTIP = ("Optional: the boxes output of ComfyUI core's SAM3_Detect (individual_masks on), connected with its "
                 "masks: per image a list of boxes, so image b's masks are the next len(boxes[b]) of the batch. "
                 "Gives the counts with no typing; leave counts empty then.")
RESIZE_TOOLTIP = ("Masks of another size than the image: 'error' stops and names both sizes; 'nearest' resizes "
                  "them (nearest-neighbour) when the aspect ratio agrees. Another aspect ratio is always refused.")


class RefDiffMaskProposals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffMaskProposals",
            display_name="RefDiff Mask Proposals",
            category=sockets.CATEGORY,
            description="Candidate masks from any segmenter node (SAM 2, SAM 3, GroundingDINO + SAM, a drawn "
                        "mask): a MASK batch becomes proposals of the images, scored and selected by the same "
                        "nodes as SAM's. Inside where the mask is >= 0.5; empty masks are left out (named in "
                        "info); no post-filter unless asked.",
            inputs=[
                io.Mask.Input("masks", tooltip="MASK batch [N, H, W] of candidate masks, from any node (values in "
                                               "[0, 1], inside where >= 0.5), at the image's size."),
                io.Image.Input("image", tooltip="The images these masks belong to (one or a batch)."),
                io.String.Input("counts", default="", tooltip=COUNTS_TOOLTIP),
                io.Combo.Input("resize", options=list(RESIZE_MODES), default="error", tooltip=RESIZE_TOOLTIP),
                sockets.preset_input("Preset for 'post_filter: preset'."),
                *sockets.post_filter_inputs(default="none"),
                sockets.BoundingBoxes.Input("boxes", optional=True, tooltip=BOXES_TOOLTIP),
            ],
            outputs=[
                sockets.Proposals.Output(display_name="proposals", tooltip="Candidate masks per image "
                                                                           "(REFDIFF_PROPOSALS), as SAM's."),
                io.String.Output(display_name="info", tooltip="Per image: how many proposals, which masks of the "
                                                              "batch they are, what was left out or resized."),
            ],
        )

    @classmethod
    def validate_inputs(cls, counts="") -> bool | str:
        # At queue time: counts that do not read as numbers (whether they fit the batch is known at run time).
        return counts_problem(counts) or True

    @classmethod
    def execute(cls, masks, image, counts, resize, preset, post_filter, keep_largest, min_area,
                area_filter="preset", boxes=None) -> io.NodeOutput:
        settings = (None if post_filter == "none" else
                    sam_filter_settings(post_filter, sockets.preset(preset), keep_largest, min_area, area_filter))
        runtime.check_interrupt()
        proposals, lines = mask_proposal_batch(masks, image, counts, resize, settings, boxes=boxes)
        runtime.warn(proposals.warnings)
        runtime.show_on_node(proposals.warnings)
        head = proposals.describe() + (f" ({settings.describe()})" if settings else " (no post-filter)")
        info = "\n".join([head, *lines, *(f"warning: {w}" for w in proposals.warnings)])
        return io.NodeOutput(proposals, info)


class RefDiffProposalsToMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffProposalsToMasks",
            display_name="RefDiff Proposals to MASK",
            category=sockets.CATEGORY,
            description="The proposals of every image as one ComfyUI MASK batch (image 0's first), with the "
                        "number of masks of each image: to edit them with mask nodes (grow, combine, draw) and "
                        "score them again through RefDiff Mask Proposals, or to use them elsewhere.",
            inputs=[sockets.Proposals.Input("proposals", tooltip="Candidate masks per image (REFDIFF_PROPOSALS) "
                                                                 "from any RefDiff proposal node.")],
            outputs=[
                io.Mask.Output(display_name="masks", tooltip="Every proposal as a MASK batch [N, H, W], image by "
                                                             "image in batch order."),
                io.String.Output(display_name="counts", tooltip="The masks of each image ('3, 5'), as RefDiff Mask "
                                                                "Proposals' counts input takes them."),
            ],
        )

    @classmethod
    def execute(cls, proposals) -> io.NodeOutput:
        masks, counts = proposals_to_masks(proposals)
        return io.NodeOutput(masks, counts)


NODES = [RefDiffMaskProposals, RefDiffProposalsToMasks]
__all__ = ["NODES", "RefDiffMaskProposals", "RefDiffProposalsToMasks", "COUNTS_TOOLTIP", "RESIZE_TOOLTIP", "BOXES_TOOLTIP"]
