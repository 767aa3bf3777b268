"""Write the reference workflows: workflows/api/NAME.json (API format, what POST /prompt takes),
workflows/NAME.json (UI format, what ComfyUI's template browser and the canvas load) and workflows/NAME.jpg
(the template's thumbnail: its title, what it changes, and a drawing of the graph).

The graphs are defined once, below, in API form; the UI form is derived with the node definitions of
tests/comfyui/object_info.json (input order, which inputs are widgets), and laid out from each node's slots,
widgets and the previews it shows after a run (no hand-placed positions). Each UI workflow opens with a note
saying what it shows and which wire of the full graph was cut. Run after changing a node's inputs (and after
refreshing object_info.json with the ComfyUI tests): python tests/comfyui/build_workflows.py
"""
from __future__ import annotations

import json
import textwrap
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
OBJECT_INFO = Path(__file__).resolve().parent / "object_info.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

CKPT = "v1-5-pruned-emaonly.safetensors"
CKPT_SDXL = "sd_xl_base_1.0.safetensors"
SAM = "sam_vit_h_4b8939.pth"
SAM3 = "sam3.pt"  # Meta's SAM 3 (huggingface.co/facebook/sam3)
CLIP = "ViT-B-16-openai.safetensors"
IMAGE = "refdiff-example.png"  # assets/refdiff-example.png, copied into ComfyUI's input folder by the pack
EXAMPLE = REPO / "assets" / IMAGE
TEXT = "the horse on the left"  # the brown horse of the example image
# Flux.1 dev as ComfyUI's own Flux templates load it: the diffusion model, its two text encoders, its VAE.
FLUX_UNET = "flux1-dev.safetensors"
FLUX_CLIP_L = "clip_l.safetensors"
FLUX_T5 = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
# The capture and segment nodes' Flux / SD 3 widgets at their defaults (unused on an SD MODEL).
DIT_WIDGETS = dict(map_kind="attention", dit_blocks="last4", flow_t=0.25, background="background, floor, wall, sky")
CAPTURE_DIT_WIDGETS = {**DIT_WIDGETS, "flow_steps": 1}


@dataclass(frozen=True)
class Template:
    """What a reference workflow is, for its note on the canvas and its thumbnail."""

    title: str
    caption: str  # one short line on the thumbnail
    description: str  # what the workflow shows, and which wire of the full graph was cut


TEMPLATES = {
    "ref-diff": Template(
        "Ref-Diff: the full method", "SAM proposals ranked by s_G and s_D",
        "SAM proposes masks, each is scored by the generative score s_G (Stable Diffusion's cross-attention "
        "map of the root word \"horse\") and the discriminative score s_D (CLIP), and the mask with the best "
        "fused score is the brown horse on the left. Nothing is cut: the ablations are this graph with wires "
        "removed."),
    "ref-diff-G": Template(
        "Ref-Diff/G: generative only", "threshold proposals + s_G, no SAM, no CLIP",
        "The generative-only ablation: the proposals are thresholds of the generative map c instead of SAM's "
        "masks, ranked by s_G alone. Cut from the full graph: the CLIP score wire into FuseSelect's "
        "discriminative input, with SAMProposals replaced by ThresholdProposals fed with c."),
    "ref-diff-GS": Template(
        "Ref-Diff/GS: SAM + generative score", "SAM proposals ranked by s_G alone",
        "SAM's proposals ranked by the generative score s_G alone. Cut from the full graph: the CLIP score wire "
        "into FuseSelect's discriminative input, so the CLIP branch is gone."),
    "ref-diff-DS": Template(
        "Ref-Diff/DS: SAM + discriminative score", "SAM proposals ranked by s_D alone, no Stable Diffusion",
        "SAM's proposals ranked by the discriminative CLIP score s_D alone, without Stable Diffusion. Cut from "
        "the full graph: the generative score wire into FuseSelect's generative input, and with it the "
        "checkpoint and the whole generative chain (ParseText uses the offline SD 1.x tokenizer)."),
    "sam-clip": Template(
        "SAM-CLIP baseline", "SAM proposals ranked by CLIP crops",
        "The SAM-CLIP baseline: SAM's proposals ranked by CLIP's similarity between each cropped proposal and "
        "the sentence. Cut from the full graph: the generative score wire, as in DS, with CLIPScore's mode set to "
        "sam-clip (crop branch only, no positional bias)."),
    "ref-diff-inpainting": Template(
        "Ref-Diff inpainting", "repaint the object the text refers to",
        "The all-in-one RefDiffSegment node finds the horse on the left and KSampler repaints it as the prompt "
        "says (a white horse). Not an ablation: nothing is cut; the referring mask goes straight into "
        "VAEEncodeForInpaint."),
    "ref-diff-G-refine": Template(
        "Ref-Diff/G with a self-attention refined map", "DiffSegmenter's refined c + threshold proposals + s_G",
        "The G ablation on DiffSegmenter's map: the cross-attention of every level refined by self-attention "
        "gives c, which is thresholded into proposals ranked by s_G. Cut from the full graph: as in G (no CLIP "
        "wire, no SAM), and the generative map node is replaced by SelfAttentionRefine, fed by a capture at "
        "every level with self-attention on."),
    "ref-diff-clusters": Template(
        "Ref-Diff with feature-cluster proposals", "UNet feature clusters instead of SAM, s_G + s_D",
        "The full method with FreeSeg-Diff's proposals: clusters of the UNet's features become the masks, "
        "scored by s_G and s_D and fused. Cut from the full graph: SAM's proposals wires into the two scores "
        "and FuseSelect, which FeatureClusterProposals feeds instead."),
    "ref-diff-prompted": Template(
        "Ref-Diff with attention-guided SAM prompts", "SAM prompted at the peaks of c: fast proposals",
        "A fast proposal mode beyond the paper: instead of decoding SAM's 32 x 32 point grid, PromptedSAM "
        "prompts SAM only at the peaks of the generative map c (points and boxes), with the image embedding "
        "computed once per image, so a new sentence on the same image costs almost nothing. Fewer, object-level "
        "masks; an object c misses gets no mask. Cut from the full graph: the SAMProposals node, replaced "
        "by PromptedSAM fed with the generative map; the scores and the fusion are unchanged. A SAM 2 / 2.1 "
        "checkpoint from models/sam2 works in the same loader."),
    "ref-diff-external-masks": Template(
        "Ref-Diff on masks from any segmenter", "a MASK batch as the proposals: SAM 2, SAM 3, GroundingDINO",
        "The full method on masks that arrive as a ComfyUI MASK batch, here SAM's own (Proposals to MASK), so it "
        "runs anywhere with the full graph's choice. For another segmenter, delete Load SAM, SAM proposals and "
        "Proposals to MASK and wire its MASK output (SAM 2 / SAM 3, GroundingDINO + SAM, a drawing) into Mask "
        "proposals' masks. Cut from the full graph: the SAM proposals wires into the two scores and FuseSelect, "
        "which Mask proposals feeds instead."),
    "ref-diff-spatial": Template(
        "Ref-Diff with spatial terms", "what the words say about place and size, added before selection",
        "Beyond the paper: RefDiffSpatial sits between the scores and FuseSelect and adds what the words say "
        "about the target's place (here \"on the left\": the leftmost of the best candidates), its size and its "
        "relations to other named objects (from the same captured attention, no extra UNet run) to the fused "
        "score; FuseSelect's table and gallery show each term. Cut from the full graph: the score wires into "
        "FuseSelect, which now go through RefDiffSpatial into its fused input; wiring them back is the "
        "ablation."),
    "ref-diff-sam3": Template(
        "Ref-Diff on SAM 3's instances of the noun", "SAM 3 finds every horse, Ref-Diff picks the one on the left",
        "Beyond the paper: SAM 3 segments every instance of the target noun of the text (here every \"horse\"), and "
        "Ref-Diff's scores and spatial terms pick the one the words describe, which SAM 3 alone cannot (its score "
        "ignores \"on the left\"). Cut from the full graph: Load SAM and SAM proposals, replaced by Load SAM 3 and "
        "Concept proposals (fed with the parse), and the score wires into FuseSelect, which go through "
        "RefDiffSpatial. To use ComfyUI core's SAM3_Detect instead (newer ComfyUI): encode \"horse:20\" with "
        "CLIPTextEncode into SAM3_Detect with individual_masks on, wire its masks and boxes outputs into RefDiff "
        "Mask Proposals' masks and boxes (counts left empty), and connect Mask proposals where Concept proposals' "
        "output went."),
    "ref-diff-flux": Template(
        "Ref-Diff on Flux.1: joint attention as the generative map", "Flux's text-image attention for s_G",
        "The full method with Flux.1 dev in place of Stable Diffusion: the generative map c is read from Flux's "
        "joint text-image attention (the image tokens' attention on the root word \"horse\" in the last 4 double "
        "blocks, after a flow noise injection at t = 0.25), then SAM, s_G, s_D and the fusion run unchanged. "
        "Loaded as ComfyUI's Flux templates load it: the diffusion model, CLIP-L + T5 and the VAE. Not an "
        "ablation: nothing is cut; set map_kind to concept for ConceptAttention's output-space map."),
    "ref-diff-sdxl": Template(
        "Ref-Diff on SDXL", "RefDiffSegment with an SDXL base checkpoint",
        "The all-in-one RefDiffSegment node on SDXL base instead of SD 1.5: the cross-attention of SDXL's "
        "factor-4 layers (down_blocks.2, mid_block, up_blocks.0: 60 layers per step, a 32 x 32 map at 1024 px, "
        "text from CLIP-L and OpenCLIP-G) gives c, which ranks SAM's proposals with CLIP's score. Not an "
        "ablation: nothing is cut; only the checkpoint differs from the full method. The SDXL refiner is "
        "refused."),
}
# The model files a graph's loaders ask for, named in its note.
CHECKPOINT_NOTES = {CKPT: f"an SD 1.5 checkpoint in models/checkpoints ({CKPT})",
                    CKPT_SDXL: f"an SDXL base 1.0 checkpoint in models/checkpoints ({CKPT_SDXL}; not the refiner)"}
MODEL_NOTES = {
    "CheckpointLoaderSimple": CHECKPOINT_NOTES[CKPT],
    "RefDiffSAMLoader": f"SAM ViT-H in models/sams ({SAM})",
    "RefDiffSAM3Loader": f"SAM 3 in models/sam3 ({SAM3})",
    "RefDiffCLIPLoader": f"CLIP ViT-B/16 (OpenAI weights, open_clip format) in models/open_clip ({CLIP})",
    "UNETLoader": f"Flux.1 dev in models/diffusion_models ({FLUX_UNET})",
    "DualCLIPLoader": f"Flux's text encoders in models/text_encoders ({FLUX_CLIP_L}, {FLUX_T5})",
    "VAELoader": f"the Flux VAE in models/vae ({FLUX_VAE})",
}


# ------------------------------------------------------------------------------------------ graph building
class Graph:
    """An API-format graph under construction; ``add`` returns the node id, ``out(id, slot)`` a link."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, title: str | None = None, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"inputs": inputs, "class_type": class_type, "_meta": {"title": title or class_type}}
        return node_id

    @staticmethod
    def out(node_id: str, slot: int = 0) -> list:
        return [node_id, slot]


def sd_front(g: Graph, ckpt_name: str = CKPT) -> tuple[str, str]:
    """Checkpoint + image nodes every generative workflow starts with."""
    title = "Load SDXL base checkpoint" if ckpt_name == CKPT_SDXL else "Load SD 1.5 checkpoint"
    ckpt = g.add("CheckpointLoaderSimple", title, ckpt_name=ckpt_name)
    image = g.add("LoadImage", "Image to segment", image=IMAGE)
    return ckpt, image


def parse_node(g: Graph, clip: list | None) -> str:
    inputs: dict[str, Any] = dict(text=TEXT, preset="official", root_rule="preset", root_word="", no_noun="warn")
    if clip is not None:
        inputs["clip"] = clip
    return g.add("RefDiffParseText", "Parse the referring expression", **inputs)


def generative_chain(g: Graph, ckpt: str, image: str, parse: str,
                     loaders: tuple[list, list, list] | None = None, title: str = "Capture cross-attention (Eq. 4)",
                     **capture_inputs: Any) -> str:
    """Prepare -> VAEEncode -> noise injection -> capture -> generative map; returns the map node. ``loaders``:
    the (MODEL, CLIP, VAE) links when they do not come from the checkpoint ``ckpt``."""
    model, clip, vae = loaders or (g.out(ckpt, 0), g.out(ckpt, 1), g.out(ckpt, 2))
    square = g.add("RefDiffPrepareImage", "Pad to a square", image=g.out(image), size=1024, resize_filter="lanczos")
    latent = g.add("VAEEncode", pixels=g.out(square), vae=vae)
    noised = g.add("RefDiffNoiseInjection", "Noise injection (Eq. 3)", latent=g.out(latent), seed=0,
                   schedule="preset", preset="official", strength=0.1, ddim_steps=20)
    capture = g.add("RefDiffCaptureAttention", title, model=model,
                    latent=g.out(noised), preset="official", kind="preset", guidance=9.0, use_cfg=True, factor=4,
                    blocks="down,mid,up", steps=0, text="", clip=clip, parse=g.out(parse),
                    self_attention=False, self_max_tokens=4096, **{**CAPTURE_DIT_WIDGETS, **capture_inputs})
    return g.add("RefDiffGenerativeMap", "Generative map c (Eq. 5)", attention=g.out(capture), parse=g.out(parse),
                 image=g.out(image), preset="official", resize="preset", token_override="")


def sam_chain(g: Graph, image: str) -> str:
    sam = g.add("RefDiffSAMLoader", "Load SAM", sam_name=SAM, model_type="auto")
    return g.add("RefDiffSAMProposals", "SAM proposals", sam=g.out(sam), image=g.out(image), preset="official",
                 points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88, stability_score_thresh=0.95,
                 box_nms_thresh=0.7, crop_n_layers=0, min_mask_region_area=0, post_filter="preset",
                 keep_largest=10, min_area=10000, area_filter="preset")


def clip_score(g: Graph, image: str, proposals: str, parse: str, mode: str) -> str:
    loader = g.add("RefDiffCLIPLoader", "Load CLIP ViT-B/16", clip_name=CLIP, model_name="ViT-B-16",
                   quick_gelu="auto", precision="fp32")
    return g.add("RefDiffCLIPScore", "Discriminative score s_D" if mode == "ref-diff" else "SAM-CLIP score",
                 clip_scorer=g.out(loader), image=g.out(image), proposals=g.out(proposals), parse=g.out(parse),
                 preset="official", mode=mode, positional_bias=mode == "ref-diff", crop_weight=-1.0,
                 mask_weight=-1.0)


def outputs(g: Graph, select: str, name: str) -> None:
    """Save the selected mask, preview the overlay, show the score table."""
    mask_image = g.add("MaskToImage", mask=g.out(select, 0))
    g.add("SaveImage", "Save the mask", images=g.out(mask_image), filename_prefix=f"refdiff/{name}")
    g.add("PreviewImage", "Selected mask over the image", images=g.out(select, 3))
    g.add("PreviewAny", "Ranked proposals", source=g.out(select, 2))


def select_node(g: Graph, proposals: str, image: str, generative: str | None, discriminative: str | None) -> str:
    inputs: dict[str, Any] = dict(proposals=g.out(proposals), preset="official", gen_weight=-1.0, disc_weight=-1.0,
                                  top_k=5, pin_index=-1, image=g.out(image))
    if generative:
        inputs["generative"] = g.out(generative)
    if discriminative:
        inputs["discriminative"] = g.out(discriminative)
    return g.add("RefDiffFuseSelect", "Fuse scores and select (Eq. 1, 2)", **inputs)


def score_and_select(g: Graph, image: str, parse: str, c: str, proposals: str, name: str) -> None:
    """The full method's back half on given proposals: s_G from c, s_D from CLIP, fusion, and the outputs."""
    s_g = g.add("RefDiffGenerativeScore", "Generative score s_G (Eq. 9)", c=g.out(c), proposals=g.out(proposals),
                preset="official")
    s_d = clip_score(g, image, proposals, parse, "ref-diff")
    outputs(g, select_node(g, proposals, image, s_g, s_d), name)


def full_graph(name: str, make_proposals: Callable[[Graph, str, str], str]) -> Graph:
    """The full method on the SD 1.5 checkpoint, its proposals from ``make_proposals(g, image, c)``."""
    g = Graph()
    ckpt, image = sd_front(g)
    parse = parse_node(g, g.out(ckpt, 1))
    c = generative_chain(g, ckpt, image, parse)
    score_and_select(g, image, parse, c, make_proposals(g, image, c), name)
    return g


def ref_diff() -> Graph:
    return full_graph("ref-diff", lambda g, image, c: sam_chain(g, image))


def prompted_sam(g: Graph, image: str, c: str) -> str:
    """SAM prompted at the peaks of c instead of its automatic point grid."""
    sam = g.add("RefDiffSAMLoader", "Load SAM", sam_name=SAM, model_type="auto")
    return g.add("RefDiffPromptedSAM", "Prompted SAM proposals (peaks of c)", sam=g.out(sam),
                 image=g.out(image), c=g.out(c), preset="official", threshold=0.5, max_prompts=4,
                 min_distance=0.1, prompt_kind="points+boxes", multimask=True, nms_iou=0.8, min_score=0.0,
                 post_filter="preset", keep_largest=10, min_area=10000, area_filter="preset")


def ref_diff_prompted() -> Graph:
    """The full method with SAM prompted at the peaks of c."""
    return full_graph("ref-diff-prompted", prompted_sam)


def mask_batch_proposals(g: Graph, image: str, c: str) -> str:
    """Proposals that arrive as a ComfyUI MASK batch (here SAM's own masks, re-entered)."""
    masks = g.add("RefDiffProposalsToMasks", "Stand-in segmenter: SAM to MASK", proposals=g.out(sam_chain(g, image)))
    return g.add("RefDiffMaskProposals", "Mask proposals from a MASK batch", masks=g.out(masks),
                 image=g.out(image), counts="", resize="error", preset="official", post_filter="none",
                 keep_largest=10, min_area=10000, area_filter="preset")


def ref_diff_external_masks() -> Graph:
    """The full method on proposals that arrive as a ComfyUI MASK batch."""
    return full_graph("ref-diff-external-masks", mask_batch_proposals)


def ref_diff_flux() -> Graph:
    """The full method on Flux.1 dev: its loaders in place of the checkpoint, c from its joint attention."""
    g = Graph()
    unet = g.add("UNETLoader", "Load Flux.1 dev", unet_name=FLUX_UNET, weight_dtype="default")
    clip = g.add("DualCLIPLoader", "Load Flux text encoders (CLIP-L + T5)", clip_name1=FLUX_CLIP_L,
                 clip_name2=FLUX_T5, type="flux", device="default")
    vae = g.add("VAELoader", "Load the Flux VAE", vae_name=FLUX_VAE)
    image = g.add("LoadImage", "Image to segment", image=IMAGE)
    parse = parse_node(g, g.out(clip))
    c = generative_chain(g, unet, image, parse, loaders=(g.out(unet), g.out(clip), g.out(vae)),
                         title="Capture Flux joint attention", **CAPTURE_DIT_WIDGETS)
    score_and_select(g, image, parse, c, sam_chain(g, image), "ref-diff-flux")
    return g


def threshold_graph(make_c, name: str) -> Graph:
    """Threshold proposals of c scored by s_G alone (Ref-Diff/G); ``make_c`` builds the chain giving c."""
    g = Graph()
    ckpt, image = sd_front(g)
    parse = parse_node(g, g.out(ckpt, 1))
    c = make_c(g, ckpt, image, parse)
    proposals = g.add("RefDiffThresholdProposals", "Threshold proposals (Eq. 8)", c=g.out(c), thresholds="preset",
                      preset="official")
    s_g = g.add("RefDiffGenerativeScore", "Generative score s_G (Eq. 9)", c=g.out(c), proposals=g.out(proposals),
                preset="official")
    outputs(g, select_node(g, proposals, image, s_g, None), name)
    return g


def ref_diff_g() -> Graph:
    return threshold_graph(generative_chain, "ref-diff-G")


def ref_diff_gs() -> Graph:
    g = Graph()
    ckpt, image = sd_front(g)
    parse = parse_node(g, g.out(ckpt, 1))
    c = generative_chain(g, ckpt, image, parse)
    proposals = sam_chain(g, image)
    s_g = g.add("RefDiffGenerativeScore", "Generative score s_G (Eq. 9)", c=g.out(c), proposals=g.out(proposals),
                preset="official")
    outputs(g, select_node(g, proposals, image, s_g, None), "ref-diff-GS")
    return g


def ref_diff_ds() -> Graph:
    g = Graph()
    image = g.add("LoadImage", "Image to segment", image=IMAGE)
    parse = parse_node(g, None)
    proposals = sam_chain(g, image)
    s_d = clip_score(g, image, proposals, parse, "ref-diff")
    outputs(g, select_node(g, proposals, image, None, s_d), "ref-diff-DS")
    return g


def sam_clip() -> Graph:
    g = Graph()
    image = g.add("LoadImage", "Image to segment", image=IMAGE)
    parse = parse_node(g, None)
    proposals = sam_chain(g, image)
    s_d = clip_score(g, image, proposals, parse, "sam-clip")
    outputs(g, select_node(g, proposals, image, None, s_d), "sam-clip")
    return g


def segment_node(g: Graph, ckpt: str, image: str) -> str:
    """SAM and CLIP loaders and the all-in-one RefDiffSegment node on a checkpoint's MODEL, CLIP and VAE."""
    sam = g.add("RefDiffSAMLoader", "Load SAM", sam_name=SAM, model_type="auto")
    clip_loader = g.add("RefDiffCLIPLoader", "Load CLIP ViT-B/16", clip_name=CLIP, model_name="ViT-B-16",
                        quick_gelu="auto", precision="fp32")
    return g.add("RefDiffSegment", "Ref-Diff: the referred object", model=g.out(ckpt, 0), clip=g.out(ckpt, 1),
                 vae=g.out(ckpt, 2), image=g.out(image), text=TEXT, variant="full", preset="official", seed=0,
                 image_size=0, top_k=0, points_per_side=32, pred_iou_thresh=0.88, stability_score_thresh=0.95,
                 keep_largest=-1, min_area=-1, area_filter="preset", factor=-1, no_noun="warn", proposal_mode="preset",
                 sam=g.out(sam), clip_scorer=g.out(clip_loader), proposal_counts="", proposals_resize="error",
                 **DIT_WIDGETS)


def ref_diff_sdxl() -> Graph:
    """RefDiffSegment on an SDXL base checkpoint: the mask saved, the overlay and the score table shown."""
    g = Graph()
    ckpt, image = sd_front(g, CKPT_SDXL)
    outputs(g, segment_node(g, ckpt, image), "ref-diff-sdxl")  # RefDiffSegment's slots match FuseSelect's
    return g


def inpainting() -> Graph:
    g = Graph()
    ckpt, image = sd_front(g)
    segment = segment_node(g, ckpt, image)
    positive = g.add("CLIPTextEncode", "What to paint there", text="a white horse, photo", clip=g.out(ckpt, 1))
    negative = g.add("CLIPTextEncode", "Negative prompt", text="blurry, low quality", clip=g.out(ckpt, 1))
    latent = g.add("VAEEncodeForInpaint", pixels=g.out(image), vae=g.out(ckpt, 2), mask=g.out(segment, 0),
                   grow_mask_by=6)
    sampled = g.add("KSampler", model=g.out(ckpt, 0), seed=0, steps=20, cfg=7.0, sampler_name="euler",
                    scheduler="normal", positive=g.out(positive), negative=g.out(negative), latent_image=g.out(latent),
                    denoise=1.0)
    decoded = g.add("VAEDecode", samples=g.out(sampled), vae=g.out(ckpt, 2))
    g.add("SaveImage", "Inpainted image", images=g.out(decoded), filename_prefix="refdiff/inpainted")
    g.add("PreviewImage", "Referring mask over the image", images=g.out(segment, 3))
    return g


def refine_chain(g: Graph, ckpt: str, image: str, parse: str) -> str:
    """Prepare -> VAEEncode -> noise injection -> capture (every level, with self-attention) -> DiffSegmenter's
    refined map; returns the refine node."""
    square = g.add("RefDiffPrepareImage", "Pad to a square", image=g.out(image), size=1024, resize_filter="lanczos")
    latent = g.add("VAEEncode", pixels=g.out(square), vae=g.out(ckpt, 2))
    noised = g.add("RefDiffNoiseInjection", "Noise injection (Eq. 3)", latent=g.out(latent), seed=0,
                   schedule="preset", preset="official", strength=0.1, ddim_steps=20)
    capture = g.add("RefDiffCaptureAttention", "Capture cross- and self-attention, every level", model=g.out(ckpt, 0),
                    latent=g.out(noised), preset="official", kind="preset", guidance=9.0, use_cfg=True, factor=0,
                    blocks="down,mid,up", steps=0, text="", clip=g.out(ckpt, 1), parse=g.out(parse),
                    self_attention=True, self_max_tokens=4096, **CAPTURE_DIT_WIDGETS)
    return g.add("RefDiffSelfAttentionRefine", "Refined map c (DiffSegmenter)", attention=g.out(capture),
                 parse=g.out(parse), image=g.out(image), preset="official", iterations=1,
                 factor_weights="8:0.3,4:0.5,2:0.1,1:0.1", eps=1e-8, self_factor=0, resize="preset")


def ref_diff_g_refine() -> Graph:
    return threshold_graph(refine_chain, "ref-diff-G-refine")


def ref_diff_clusters() -> Graph:
    g = Graph()
    ckpt, image = sd_front(g)
    parse = parse_node(g, g.out(ckpt, 1))
    c = generative_chain(g, ckpt, image, parse)
    latent = next(k for k, v in g.nodes.items() if v["class_type"] == "VAEEncode")
    proposals = g.add("RefDiffFeatureClusterProposals", "Feature-cluster proposals (FreeSeg-Diff)",
                      model=g.out(ckpt, 0), latent=g.out(latent), image=g.out(image), clusters=4, features="queries",
                      feature_factor=4, cluster_factor=2, timestep=0, normalize=True, split_components=True,
                      min_area=0, seed=0, clip=g.out(ckpt, 1))
    s_g = g.add("RefDiffGenerativeScore", "Generative score s_G (Eq. 9)", c=g.out(c), proposals=g.out(proposals),
                preset="official")
    s_d = clip_score(g, image, proposals, parse, "ref-diff")
    outputs(g, select_node(g, proposals, image, s_g, s_d), "ref-diff-clusters")
    return g


def ref_diff_spatial() -> Graph:
    """The full method with RefDiffSpatial between the scores and the selection."""
    return spatial_graph("ref-diff-spatial", lambda g, image, parse: sam_chain(g, image))


def concept_chain(g: Graph, image: str, parse: str) -> str:
    """SAM 3's instances of the parse's target noun as the proposals."""
    sam3 = g.add("RefDiffSAM3Loader", "Load SAM 3", sam3_name=SAM3)
    return g.add("RefDiffConceptProposals", "SAM 3 concept proposals", sam3=g.out(sam3),
                 image=g.out(image), parse=g.out(parse), text="", preset="official", concept_prompt="preset",
                 threshold=-1.0, max_instances=0)


def ref_diff_sam3() -> Graph:
    """SAM 3's instances of the noun, Ref-Diff's scores and spatial terms choose."""
    return spatial_graph("ref-diff-sam3", concept_chain)


def spatial_graph(name: str, make_proposals: Callable[[Graph, str, str], str]) -> Graph:
    """The full method with RefDiffSpatial between the scores and the selection, its proposals from
    ``make_proposals(g, image, parse)``."""
    g = Graph()
    ckpt, image = sd_front(g)
    parse = parse_node(g, g.out(ckpt, 1))
    c = generative_chain(g, ckpt, image, parse)
    capture = next(k for k, n in g.nodes.items() if n["class_type"] == "RefDiffCaptureAttention")
    proposals = make_proposals(g, image, parse)
    s_g = g.add("RefDiffGenerativeScore", "Generative score s_G (Eq. 9)", c=g.out(c), proposals=g.out(proposals),
                preset="official")
    s_d = clip_score(g, image, proposals, parse, "ref-diff")
    loader = next(k for k, n in g.nodes.items() if n["class_type"] == "RefDiffCLIPLoader")
    from refdiff.config import PLUS

    terms = {"position": PLUS.spatial_position_weight, "middle": PLUS.spatial_middle_weight,
             "ordinals": PLUS.spatial_ordinal_weight, "size": PLUS.spatial_size_weight,
             "relations": PLUS.spatial_relation_weight, "negatives": PLUS.spatial_negative_weight}
    spatial = g.add("RefDiffSpatial", "Spatial terms (beyond the paper)", proposals=g.out(proposals),
                    parse=g.out(parse), generative=g.out(s_g), discriminative=g.out(s_d), attention=g.out(capture),
                    clip=g.out(loader), image=g.out(image), preset="plus", gen_weight=-1.0, disc_weight=-1.0,
                    pool=PLUS.spatial_pool, **{k: v for t, w in terms.items() for k, v in ((t, True), (f"{t}_weight", w))})
    select = g.add("RefDiffFuseSelect", "Select by fused score + spatial terms", proposals=g.out(proposals),
                   preset="official", gen_weight=-1.0, disc_weight=-1.0, top_k=5, pin_index=-1, image=g.out(image),
                   fused=g.out(spatial))
    outputs(g, select, name)
    return g


WORKFLOWS_DEFS = {"ref-diff": ref_diff, "ref-diff-G": ref_diff_g, "ref-diff-GS": ref_diff_gs,
                  "ref-diff-DS": ref_diff_ds, "sam-clip": sam_clip, "ref-diff-inpainting": inpainting,
                  "ref-diff-G-refine": ref_diff_g_refine, "ref-diff-clusters": ref_diff_clusters,
                  "ref-diff-prompted": ref_diff_prompted, "ref-diff-external-masks": ref_diff_external_masks,
                  "ref-diff-spatial": ref_diff_spatial, "ref-diff-sam3": ref_diff_sam3, "ref-diff-flux": ref_diff_flux, "ref-diff-sdxl": ref_diff_sdxl}


# ------------------------------------------------------------------------------------------ UI conversion
def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def input_spec(info: dict, name: str) -> tuple[str, dict]:
    """(type, options) of a node input; type "COMBO" for both combo spellings."""
    for group in ("required", "optional"):
        if name in info["input"].get(group, {}):
            spec = info["input"][group][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            return kind, (spec[1] if len(spec) > 1 else {})
    raise KeyError(f"{info['name']} has no input {name!r}")


def ordered_inputs(info: dict) -> list[str]:
    order = info.get("input_order", {})
    return list(order.get("required", [])) + list(order.get("optional", []))


def widget_values(info: dict, inputs: dict) -> list:
    """widgets_values of a UI node: widget inputs in order, with the extra values the frontend stores."""
    values: list = []
    for name in ordered_inputs(info):
        kind, options = input_spec(info, name)
        if kind not in WIDGET_TYPES or options.get("forceInput") or is_link(inputs.get(name)):
            continue
        values.append(inputs.get(name, options.get("default")))
        if options.get("control_after_generate"):
            values.append("fixed")
        if options.get("image_upload"):
            values.append("image")
    return values


def multiline_inputs(info: dict, inputs: dict) -> int:
    """How many of a node's widgets are multi-line text boxes (they grow with the node)."""
    count = 0
    for name in ordered_inputs(info):
        kind, options = input_spec(info, name)
        if kind == "STRING" and options.get("multiline") and not options.get("forceInput") \
                and not is_link(inputs.get(name)):
            count += 1
    return count


# ------------------------------------------------------------------------------------------ layout
# The frontend's node geometry (ComfyUI frontend 1.27, LiteGraph): a node's pos is the top-left corner of its
# body; the title bar is drawn above it. The body holds the slot rows, then one row per widget, then the
# widgets that grow (multi-line text boxes, image previews, DOM views), which share the space that is left;
# a node whose content needs more is enlarged by the frontend, over whatever lies below it.
TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT
SLOT_H = 20  # LiteGraph.NODE_SLOT_HEIGHT: one input / output row
SLOTS_PAD = 6  # between the slot rows and the first widget
WIDGET_H = 24  # a one-line widget (LiteGraph.NODE_WIDGET_HEIGHT) and the gap below it
BOTTOM_PAD = 12
NODE_W = 320
COL_GAP = 70
ROW_GAP = 40
MARGIN = 40
CAPTION_H = 40  # the "W x H" line and padding under an image preview
# Heights given to the growing widgets: a multi-line text box (about five lines), the score table (about
# twelve), and the largest views of the pack's web extension for one image (web/js/refdiff_views.js:
# stripHeight = 8 + 96 per image; galleryHeight = 8 + 20 + 3 rows of 121 + 4 per image; both plus the DOM
# widget's margins, 2 x 10; tests/comfyui/test_web.py checks these against the extension).
GROW_H = {"text": 84, "table": 220, "tokens": 8 + 96 + 20, "gallery": 8 + 20 + 3 * 121 + 4 + 20}
# What a node shows after a run (or, for LoadImage, once loaded), besides its widgets.
PREVIEWS: dict[str, tuple[str, ...]] = {
    "LoadImage": ("image",), "PreviewImage": ("image",), "SaveImage": ("image",), "PreviewAny": ("table",),
    "RefDiffGenerativeMap": ("tokens", "image"), "RefDiffFuseSelect": ("gallery", "image"),
    "RefDiffSegment": ("image",), "RefDiffSelfAttentionRefine": ("image",),
}
# Wider nodes: the score table's lines, and the previews that show the result.
WIDTHS = {"PreviewAny": 560, "PreviewImage": 420, "SaveImage": 420}
NOTE_H = 150


def image_aspect() -> float:
    """Height / width of the example image the workflows load (the previews show it or its masks)."""
    from PIL import Image

    with Image.open(EXAMPLE) as im:
        return im.height / im.width


def grow_height(kind: str, width: int) -> int:
    """Height given to one growing widget of a node ``width`` wide."""
    if kind == "image":
        return round(width * image_aspect()) + CAPTION_H
    return GROW_H[kind]


def node_size(class_type: str, rows: int, widgets: int, text_boxes: int) -> tuple[int, int]:
    """(width, body height) a node needs with everything it shows after a run."""
    width = WIDTHS.get(class_type, NODE_W)
    grow = ["text"] * text_boxes + list(PREVIEWS.get(class_type, ()))
    height = rows * SLOT_H + SLOTS_PAD + (widgets - text_boxes) * WIDGET_H + BOTTOM_PAD
    return width, height + sum(grow_height(kind, width) for kind in grow)


def columns(graph: dict) -> dict[str, int]:
    """Column of each node: the longest chain of links leading to it; a node without inputs (a loader) sits
    just before the first node that uses it."""
    memo: dict[str, int] = {}

    def sources(node_id: str) -> list[str]:
        return [v[0] for v in graph[node_id]["inputs"].values() if is_link(v)]

    def d(node_id: str) -> int:
        if node_id not in memo:
            memo[node_id] = 1 + max((d(s) for s in sources(node_id)), default=-1)
        return memo[node_id]

    for node_id in graph:
        d(node_id)
    cols = dict(memo)
    for node_id in graph:
        if not sources(node_id):
            consumers = [memo[k] for k in graph if node_id in sources(k)]
            cols[node_id] = max(0, min(consumers, default=1) - 1)
    return cols


def layout(graph: dict, sizes: dict[str, tuple[int, int]], top: int) -> dict[str, tuple[int, int]]:
    """Body position of each node: columns left to right with gaps, each column's nodes stacked with gaps in
    the order of the mean height of the nodes they read from (a loader: of the nodes that read from it, as
    placed by a first pass), so that few links cross."""
    cols = columns(graph)
    by_col: dict[int, list[str]] = {}
    for node_id in sorted(graph, key=int):
        by_col.setdefault(cols[node_id], []).append(node_id)
    readers = {k: [r for r, n in graph.items() for v in n["inputs"].values() if is_link(v) and v[0] == k]
               for k in graph}
    previous: dict[str, tuple[int, int]] = {}
    for _ in range(2):
        pos: dict[str, tuple[int, int]] = {}
        x = MARGIN

        def centre(node_id: str, where: dict) -> float:
            return where[node_id][1] + sizes[node_id][1] / 2

        def key(node_id: str) -> tuple[float, int]:
            near = [centre(v[0], pos) for v in graph[node_id]["inputs"].values() if is_link(v) and v[0] in pos]
            if not near and previous:
                near = [centre(r, previous) for r in readers[node_id]]
            return (sum(near) / len(near) if near else -1.0, int(node_id))

        for col in sorted(by_col):
            y = top
            for node_id in sorted(by_col[col], key=key):
                pos[node_id] = (x, y + TITLE_H)
                y += TITLE_H + sizes[node_id][1] + ROW_GAP
            x += max(sizes[k][0] for k in by_col[col]) + COL_GAP
        previous = pos
    return pos


def note_text(template: Template, graph: dict) -> str:
    """The note a workflow opens with: what it shows, what was cut, the image and the models it needs."""
    loaders = sorted({n["class_type"] for n in graph.values()} & set(MODEL_NOTES))
    checkpoints = {n["inputs"].get("ckpt_name") for n in graph.values() if n["class_type"] == "CheckpointLoaderSimple"}
    models = "; ".join(CHECKPOINT_NOTES[next(iter(checkpoints))] if c == "CheckpointLoaderSimple" else MODEL_NOTES[c]
                       for c in loaders)
    return (f"## {template.title}\n\n{template.description}\n\n"
            f"Image: `{IMAGE}` (two horses, copied into ComfyUI's input folder by the pack), text: \"{TEXT}\". "
            f"Models: {models}. Node reference: the pack's docs/NODES.md.")


def to_ui(graph: dict, object_info: dict, template: Template | None = None) -> dict:
    """The UI-format (LiteGraph) workflow of an API graph, laid out; with a template, a note on top says
    what the workflow is."""
    links: list[list] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    ui_inputs: dict[str, list[dict]] = {}
    for node_id, node in graph.items():
        info = object_info[node["class_type"]]
        entries: list[dict] = []
        for name in ordered_inputs(info):
            kind, options = input_spec(info, name)
            value = node["inputs"].get(name)
            if kind in WIDGET_TYPES and not is_link(value):
                continue
            entry: dict[str, Any] = {"name": name, "type": kind, "link": None}
            if kind in WIDGET_TYPES:
                entry["widget"] = {"name": name}
            if name in info["input"].get("optional", {}):
                entry["shape"] = 7
            if is_link(value):
                link_type = object_info[graph[value[0]]["class_type"]]["output"][value[1]]
                entry["link"] = len(links) + 1
                links.append([entry["link"], int(value[0]), value[1], int(node_id), len(entries), link_type])
                out_links.setdefault((value[0], value[1]), []).append(entry["link"])
            entries.append(entry)
        ui_inputs[node_id] = entries
    widgets = {k: widget_values(object_info[n["class_type"]], n["inputs"]) for k, n in graph.items()}
    sizes = {}
    for node_id, node in graph.items():
        info = object_info[node["class_type"]]
        rows = max(len([e for e in ui_inputs[node_id] if "widget" not in e]), len(info["output"]), 1)
        sizes[node_id] = node_size(node["class_type"], rows, len(widgets[node_id]),
                                   multiline_inputs(info, node["inputs"]))
    top = MARGIN + (TITLE_H + NOTE_H + ROW_GAP if template else 0)
    pos = layout(graph, sizes, top)
    nodes = []
    for order, node_id in enumerate(sorted(graph, key=lambda k: (pos[k][0], pos[k][1]))):
        node = graph[node_id]
        info = object_info[node["class_type"]]
        outputs_ui = [{"name": out_name, "type": out_type, "links": out_links.get((node_id, slot), []),
                       "slot_index": slot}
                      for slot, (out_name, out_type) in enumerate(zip(info["output_name"], info["output"]))]
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": list(pos[node_id]),
                      "size": list(sizes[node_id]), "flags": {}, "order": order, "mode": 0,
                      "inputs": ui_inputs[node_id], "outputs": outputs_ui, "title": node["_meta"]["title"],
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets[node_id]})
    if template:
        right = max(pos[k][0] + sizes[k][0] for k in graph)
        nodes.insert(0, {"id": max(int(k) for k in graph) + 1, "type": "MarkdownNote",
                         "pos": [MARGIN, MARGIN + TITLE_H], "size": [min(right - MARGIN, 1100), NOTE_H],
                         "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                         "title": "About this workflow", "properties": {},
                         "widgets_values": [note_text(template, graph)], "color": "#432", "bgcolor": "#653"})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(graph, sort_keys=True))), "revision": 0,
            "last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


# ------------------------------------------------------------------------------------------ node snapshot
CORE_NODES = ("CheckpointLoaderSimple", "LoadImage", "VAEEncode", "VAEDecode", "VAEEncodeForInpaint",
              "SetLatentNoiseMask", "KSampler", "KSamplerAdvanced", "CLIPTextEncode", "MaskToImage", "SaveImage",
              "PreviewImage", "PreviewAny", "ImageBatch", "SaveLatent", "EmptyLatentImage", "GrowMask",
              "UNETLoader", "DualCLIPLoader", "VAELoader")
MODEL_LISTS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"), ("RefDiffSAMLoader", "sam_name"), ("RefDiffSAM3Loader", "sam3_name"),
               ("RefDiffCLIPLoader", "clip_name"), ("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"),
               ("DualCLIPLoader", "clip_name2"), ("VAELoader", "vae_name")}


def snapshot(object_info: dict) -> dict:
    """The definitions of the pack's nodes and the core nodes the workflows use, without the lists of files
    (models, input images) that differ between installations."""
    names = sorted(n for n in object_info if n.startswith("RefDiff")) + sorted(CORE_NODES)
    out = {}
    for name in names:
        info = json.loads(json.dumps(object_info[name]))
        for group in ("required", "optional"):
            for input_name, spec in info["input"].get(group, {}).items():
                if (name, input_name) in MODEL_LISTS:
                    if isinstance(spec[0], list):
                        spec[0] = []
                    elif len(spec) > 1 and "options" in spec[1]:
                        spec[1]["options"] = []
        out[name] = info
    return out


# ------------------------------------------------------------------------------------------ thumbnails
def thumbnail(ui: dict, template: Template, path: Path, width: int = 1024) -> None:
    """The template's thumbnail (shown 256 px wide by the template browser): its title and caption in large
    type over a drawing of the graph (RefDiff nodes blue, core nodes grey, links as lines)."""
    from PIL import Image, ImageDraw, ImageFont

    title_font, caption_font = ImageFont.load_default(size=64), ImageFont.load_default(size=46)
    font = ImageFont.load_default(size=11)
    graph_nodes = [n for n in ui["nodes"] if n["type"] != "MarkdownNote"]
    left = min(n["pos"][0] for n in graph_nodes) - MARGIN
    top = min(n["pos"][1] - TITLE_H for n in graph_nodes) - MARGIN
    right = max(n["pos"][0] + n["size"][0] for n in graph_nodes) + MARGIN
    bottom = max(n["pos"][1] + n["size"][1] for n in graph_nodes) + MARGIN
    scale = width / (right - left)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = textwrap.wrap(template.title, 26)
    caption_lines = [line for line in textwrap.wrap(template.caption, 38)]
    while caption_lines and max(probe.textlength(t, font=caption_font) for t in caption_lines) > width - 48:
        caption_lines = textwrap.wrap(template.caption, len(max(caption_lines, key=len)) - 2)
    band = 24 + 76 * len(title_lines) + 56 * len(caption_lines) + 16
    image = Image.new("RGB", (width, band + max(200, int((bottom - top) * scale))), (32, 32, 36))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width, band], fill=(40, 70, 120))
    y = 24
    for line in title_lines:
        draw.text((24, y), line, fill=(255, 255, 255), font=title_font)
        y += 76
    for line in caption_lines:
        draw.text((24, y), line, fill=(214, 228, 250), font=caption_font)
        y += 56

    def at(x: float, y: float) -> tuple[float, float]:
        return (x - left) * scale, band + (y - top) * scale

    by_id = {n["id"]: n for n in graph_nodes}
    for _, src, src_slot, dst, dst_slot, _ in ui["links"]:
        a, b = by_id[src], by_id[dst]
        start = at(a["pos"][0] + a["size"][0], a["pos"][1] + 10 + SLOT_H * src_slot)
        end = at(b["pos"][0], b["pos"][1] + 10 + SLOT_H * (dst_slot or 0))
        draw.line([start, end], fill=(150, 150, 110), width=2)
    for n in graph_nodes:
        x0, y0 = at(n["pos"][0], n["pos"][1] - TITLE_H)
        x1, y1 = at(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        ours = n["type"].startswith("RefDiff")
        draw.rounded_rectangle([x0, y0, x1, y1], radius=6, fill=(40, 70, 120) if ours else (70, 70, 74),
                               outline=(120, 170, 240) if ours else (140, 140, 140), width=2)
        title = n["title"]
        while title and draw.textlength(title, font=font) > x1 - x0 - 10:
            title = title[:-1]
        draw.text((x0 + 5, y0 + 4), title, fill=(240, 240, 240), font=font)
    image.save(path, "JPEG", quality=88)


def graphs() -> dict[str, dict]:
    """Every reference workflow's API graph, by name."""
    return {name: make().nodes for name, make in WORKFLOWS_DEFS.items()}


def ui_workflows(object_info: dict) -> dict[str, dict]:
    """Every reference workflow in UI format, with its note, by name."""
    return {name: to_ui(graph, object_info, TEMPLATES[name]) for name, graph in graphs().items()}


def write_all(names: Iterable[str] | None = None) -> None:
    object_info = json.loads(OBJECT_INFO.read_text(encoding="utf-8"))
    (WORKFLOWS / "api").mkdir(parents=True, exist_ok=True)
    for name, ui in ui_workflows(object_info).items():
        if names and name not in names:
            continue
        graph = graphs()[name]
        (WORKFLOWS / "api" / f"{name}.json").write_text(json.dumps(graph, indent=2) + "\n", encoding="utf-8")
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n", encoding="utf-8")
        thumbnail(ui, TEMPLATES[name], WORKFLOWS / f"{name}.jpg")
        print("wrote", name)


if __name__ == "__main__":
    write_all()
