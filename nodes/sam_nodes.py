"""SAM nodes: load a Segment Anything (models/sams) or SAM 2 / 2.1 (models/sam2) checkpoint; automatic mask proposals
and proposals prompted at the generative map's peaks (docs/METHOD.md 6)."""
from __future__ import annotations

import segment_anything  # noqa: F401  (without it these nodes are disabled, not broken)
import torch
from comfy_api.latest import io

from refdiff.config import Preset, prompt_kwargs, sam_generator_kwargs
from refdiff.errors import InputError
from refdiff.image import image_key
from refdiff.pipeline import LRUCache
from refdiff.prompted import PROMPT_KINDS, image_prompted_proposals, make_predictor
from refdiff.proposals import make_mask_generator, sam_proposals
from refdiff.errors import ModelLoadError
from refdiff.sam import SAM_CHECKPOINT_URLS, canonical_model_type, infer_model_type
from refdiff.sam2_models import is_sam2_model, load_any_sam, sam_model_name

from . import model_files, runtime, sockets, tensors
from .proposal_filter import FilterSettings, filter_image, filter_prompted, sam_filter_settings
from .sockets import post_filter_inputs
from .wire_types import ProposalBatch, SamHandle

SAM_WHERE = ("Download one of " + ", ".join(f"{k}: {v}" for k, v in SAM_CHECKPOINT_URLS.items())
             + " (the method uses vit_h); or a SAM 2 / 2.1 checkpoint (sam2.1_hiera_*.safetensors or .pt) in "
               "models/sam2.")


# ------------------------------------------------------------------------------------------ stage functions
def load_sam_model(sam_name: str, model_type: str = "auto") -> SamHandle:
    """Load a SAM (models/sams) or SAM 2 / 2.1 (models/sam2) checkpoint onto the offload device (moved to the
    GPU only while it runs); the kind and architecture are read from the weights."""
    path = model_files.resolve_sam_file(sam_name, "SAM checkpoint", SAM_WHERE)
    wanted = None if model_type == "auto" else canonical_model_type(model_type)
    model = load_any_sam(path, device=runtime.offload_device())
    if is_sam2_model(model):
        if wanted is not None:
            raise ModelLoadError(f"sam_name {sam_name!r} is a SAM 2 checkpoint ({sam_model_name(model)}), not "
                                 f"{wanted}; set model_type to 'auto'")
        return SamHandle(model=model, model_type=sam_model_name(model), path=path)
    found = infer_model_type(model.state_dict()) or "custom"
    if wanted is not None and found != wanted:
        raise ModelLoadError(f"sam_name {sam_name!r} holds a {found} SAM, not the {wanted} of model_type; pick "
                             "the matching model_type or 'auto'")
    return SamHandle(model=model, model_type=found, path=path)


def sam_proposal_batch(sam: SamHandle, image: torch.Tensor, amg: dict, settings: FilterSettings,
                       lower_min_area: str = "set post_filter to 'custom' and lower min_area") -> ProposalBatch:
    """SAM automatic masks of every image at its own resolution, then the post-filter (a real filter: what
    it drops can never be selected). An image left without a mask gets a note saying why and how to keep its
    masks with the node's inputs (``lower_min_area``), also logged as a warning."""
    rgbs = tensors.images_to_rgb(image)
    out, notes = [], {}
    progress = runtime.Progress(len(rgbs))
    with runtime.on_compute_device(sam.model):
        generator = make_mask_generator(sam.model, **amg)
        for i, rgb in enumerate(rgbs):
            runtime.check_interrupt()
            masks, note = filter_image(sam_proposals(generator, rgb), settings, lower_min_area)
            out.append(masks.cpu())  # REFDIFF_PROPOSALS are CPU masks (wire_types.ProposalBatch)
            if note:
                notes[i] = note
            progress.step()
    batch = ProposalBatch(out, source="sam", notes=notes)
    runtime.warn(batch.warnings)
    return batch


# SAM image embeddings of the prompted mode, per (checkpoint, model, image): a new text on the same image reruns
# the node (its c changed) without rerunning SAM's image encoder.
EMBEDDINGS = LRUCache(8)


def prompted_proposal_batch(sam: SamHandle, image: torch.Tensor, c: torch.Tensor, prompts: dict,
                            settings: FilterSettings,
                            lower_min_area: str = "set post_filter to 'custom' and lower min_area") -> ProposalBatch:
    """SAM prompted at the peaks of each image's generative map c (refdiff.prompted; ``prompts``: the keyword
    arguments of ``config.prompt_kwargs``), then the post-filter; an image left without a mask gets a note
    saying why (no peak in c, no usable mask, the filter), also logged as a warning. ``prompts_info`` of the
    result lists each image's prompts."""
    rgbs = tensors.images_to_rgb(image)
    maps = tensors.mask_maps(c)
    if len(maps) != len(rgbs):
        raise InputError(f"c holds {len(maps)} map(s) but image holds {len(rgbs)}; connect the generative maps of "
                         "these images (RefDiff Generative Map)")
    out, notes, said = [], {}, []
    progress = runtime.Progress(len(rgbs))
    with runtime.on_compute_device(sam.model):
        predictor = make_predictor(sam.model)
        for i, (rgb, c_i) in enumerate(zip(rgbs, maps)):
            runtime.check_interrupt()
            if tuple(c_i.shape) != rgb.shape[:2]:
                raise InputError(f"c: image {i}'s map is {c_i.shape[1]} x {c_i.shape[0]} but the image is "
                                 f"{rgb.shape[1]} x {rgb.shape[0]}; connect c of the original images")
            raw, found = image_prompted_proposals(predictor, rgb, c_i, EMBEDDINGS,
                                                  (sam.path, id(sam.model), image_key(rgb)),
                                                  check=runtime.check_interrupt, **prompts)
            masks, note = filter_prompted(raw, found, settings, prompts["threshold"], prompts["min_score"],
                                          lower_min_area)
            out.append(masks.cpu())
            said.append(f"image {i}: {found.describe()}; {raw.shape[0]} mask(s) after NMS, {masks.shape[0]} kept")
            if note:
                notes[i] = note
            progress.step()
    batch = ProposalBatch(out, source="prompted", notes=notes, prompts_info=said)
    runtime.warn(batch.warnings)
    return batch


# ------------------------------------------------------------------------------------------ nodes
class RefDiffSAMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffSAMLoader",
            display_name="RefDiff SAM Loader",
            category=sockets.CATEGORY,
            description="Load a Segment Anything checkpoint (sam_vit_h/l/b .pth or .safetensors) from "
                        "ComfyUI/models/sams, or a SAM 2 / 2.1 one (sam2.1_hiera_tiny/small/base_plus/large) from "
                        "ComfyUI/models/sam2; the kind and size are read from the weights, which are read "
                        "without running pickled code.",
            inputs=[
                io.Combo.Input("sam_name", options=model_files.sam_files(),
                               tooltip="Checkpoint file in ComfyUI/models/sams (e.g. sam_vit_h_4b8939.pth) or "
                                       "ComfyUI/models/sam2 (e.g. sam2.1_hiera_large.safetensors)."),
                io.Combo.Input("model_type", options=["auto", "vit_h", "vit_l", "vit_b"], default="auto",
                               tooltip="SAM v1 architecture; 'auto' reads it from the weights (a given type must "
                                       "match; SAM 2 files need 'auto')."),
            ],
            outputs=[sockets.SamModel.Output(display_name="sam", tooltip="The loaded SAM (REFDIFF_SAM).")],
        )

    @classmethod
    def validate_inputs(cls, sam_name) -> bool | str:
        try:
            model_files.resolve_sam_file(sam_name, "SAM checkpoint", SAM_WHERE)
        except ModelLoadError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, sam_name, model_type) -> io.NodeOutput:
        return io.NodeOutput(load_sam_model(sam_name, model_type))


class RefDiffSAMProposals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = sam_generator_kwargs(Preset(name="defaults"))
        return io.Schema(
            node_id="RefDiffSAMProposals",
            display_name="RefDiff SAM Proposals",
            category=sockets.CATEGORY,
            description="SAM automatic mask generation on each image at its own resolution (defaults: SAM's AMG "
                        "settings), then the preset's post-filter (official: the 10 largest masks of area > "
                        "10000 px at a 640 x 480 image, scaled with the image area; paper: none). An image left "
                        "without a mask is named, with the reason, on the node and in the info output.",
            inputs=[
                sockets.SamModel.Input("sam", tooltip="SAM from RefDiffSAMLoader."),
                io.Image.Input("image", tooltip="The original images."),
                sockets.preset_input("Preset for 'post_filter: preset'."),
                io.Int.Input("points_per_side", default=d["points_per_side"], min=1, max=128,
                             tooltip="Grid of point prompts per image side (32: 1024 points)."),
                io.Int.Input("points_per_batch", default=d["points_per_batch"], min=1, max=1024,
                             tooltip="Point prompts run at once (memory vs speed)."),
                io.Float.Input("pred_iou_thresh", default=d["pred_iou_thresh"], min=0.0, max=1.0, step=0.01,
                               tooltip="Drop masks whose predicted IoU is below this."),
                io.Float.Input("stability_score_thresh", default=d["stability_score_thresh"], min=0.0, max=1.0,
                               step=0.01, tooltip="Drop masks whose stability score is below this."),
                io.Float.Input("box_nms_thresh", default=d["box_nms_thresh"], min=0.0, max=1.0, step=0.01,
                               tooltip="Box IoU above which duplicate masks are suppressed."),
                io.Int.Input("crop_n_layers", default=d["crop_n_layers"], min=0, max=4,
                             tooltip="Extra passes on image crops (0 = whole image only)."),
                io.Int.Input("min_mask_region_area", default=d["min_mask_region_area"], min=0, max=100000,
                             tooltip="Remove islands and holes smaller than this (needs OpenCV when > 0)."),
                *post_filter_inputs(),
            ],
            outputs=[
                sockets.Proposals.Output(display_name="proposals", tooltip="Candidate masks per image "
                                                                           "(REFDIFF_PROPOSALS)."),
                io.String.Output(display_name="info", tooltip="How many proposals each image got, the filter, "
                                                              "and why an image has none."),
            ],
        )

    @classmethod
    def execute(cls, sam, image, preset, points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
                box_nms_thresh, crop_n_layers, min_mask_region_area, post_filter, keep_largest,
                min_area, area_filter="preset") -> io.NodeOutput:
        amg = dict(points_per_side=points_per_side, points_per_batch=points_per_batch,
                   pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                   box_nms_thresh=box_nms_thresh, crop_n_layers=crop_n_layers,
                   min_mask_region_area=min_mask_region_area)
        settings = sam_filter_settings(post_filter, sockets.preset(preset), keep_largest, min_area, area_filter)
        proposals = sam_proposal_batch(sam, image, amg, settings)
        runtime.show_on_node(proposals.warnings)
        info = "\n".join([f"{proposals.describe()} ({settings.describe()})",
                          *(f"warning: {w}" for w in proposals.warnings)])
        return io.NodeOutput(proposals, info)


class RefDiffPromptedSAM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = prompt_kwargs(Preset(name="defaults"))
        return io.Schema(
            node_id="RefDiffPromptedSAM",
            display_name="RefDiff Prompted SAM Proposals",
            category=sockets.CATEGORY,
            description="Fast proposals beyond the paper: SAM is prompted only at the peaks of the generative map c "
                        "(each peak as a point and/or the box of its region of c >= threshold, three masks per "
                        "prompt), with the image embedding computed once per image, instead of decoding a 32 x 32 "
                        "point grid. Near-duplicate masks are suppressed, then the post-filter applies. Fewer, "
                        "object-level masks; an object c misses gets no mask. An image whose map points nowhere "
                        "is left without a mask, named with the reason.",
            inputs=[
                sockets.SamModel.Input("sam", tooltip="SAM from RefDiffSAMLoader."),
                io.Image.Input("image", tooltip="The original images."),
                io.Mask.Input("c", tooltip="Generative maps of the same images from RefDiffGenerativeMap (one per "
                                           "image, at the image's size)."),
                sockets.preset_input("Preset for 'post_filter: preset'."),
                io.Float.Input("threshold", default=d["threshold"], min=0.01, max=1.0, step=0.01,
                               tooltip="Peaks of c count from this value; a peak's box is its region of c >= this."),
                io.Int.Input("max_prompts", default=d["max_prompts"], min=1, max=64,
                             tooltip="At most this many peaks per image, the highest first."),
                io.Float.Input("min_distance", default=d["min_distance"], min=0.0, max=0.99, step=0.01,
                               tooltip="Two peaks at least this far apart, as a fraction of the image's longer "
                                       "side."),
                io.Combo.Input("prompt_kind", options=list(PROMPT_KINDS), default=d["kind"],
                               tooltip="Per peak: its point, its region's box (with the point), or both (two SAM "
                                       "calls)."),
                io.Boolean.Input("multimask", default=d["multimask"],
                                 tooltip="SAM's three masks per prompt (whole, part, subpart); off: one."),
                io.Float.Input("nms_iou", default=d["nms_iou"], min=0.0, max=1.0, step=0.01,
                               tooltip="Drop a mask whose IoU with a better-scored kept mask is above this."),
                io.Float.Input("min_score", default=d["min_score"], min=0.0, max=1.0, step=0.01,
                               tooltip="Drop masks whose SAM-predicted IoU is below this (0 keeps all)."),
                *post_filter_inputs(),
            ],
            outputs=[
                sockets.Proposals.Output(display_name="proposals", tooltip="Candidate masks per image "
                                                                           "(REFDIFF_PROPOSALS)."),
                io.String.Output(display_name="info", tooltip="The prompts of each image, how many masks they gave, "
                                                              "the filter, and why an image has none."),
            ],
        )

    @classmethod
    def execute(cls, sam, image, c, preset, threshold, max_prompts, min_distance, prompt_kind, multimask, nms_iou,
                min_score, post_filter, keep_largest, min_area, area_filter="preset") -> io.NodeOutput:
        p = sockets.preset(preset)
        prompts = {**prompt_kwargs(p), "threshold": float(threshold), "max_prompts": int(max_prompts),
                   "min_distance": float(min_distance), "kind": prompt_kind, "multimask": bool(multimask),
                   "nms_iou": float(nms_iou), "min_score": float(min_score)}
        settings = sam_filter_settings(post_filter, p, keep_largest, min_area, area_filter)
        proposals = prompted_proposal_batch(sam, image, c, prompts, settings)
        runtime.show_on_node(proposals.warnings)
        info = "\n".join([f"{proposals.describe()} ({settings.describe()})", *proposals.prompts_info,
                          *(f"warning: {w}" for w in proposals.warnings)])
        return io.NodeOutput(proposals, info)


NODES = [RefDiffSAMLoader, RefDiffSAMProposals, RefDiffPromptedSAM]
__all__ = ["load_sam_model", "sam_proposal_batch", "prompted_proposal_batch", "EMBEDDINGS", "NODES",
           "RefDiffSAMLoader", "RefDiffSAMProposals", "RefDiffPromptedSAM"]
