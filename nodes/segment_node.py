"""All-in-one node: every stage of Ref-Diff for an IMAGE batch, built from the stage nodes' own functions."""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io, ui

from refdiff.config import Preset, get_variant, sam_generator_kwargs
from refdiff.errors import InputError

from . import diffusion_nodes, map_nodes, runtime, select_nodes, sockets, text_nodes

VARIANT_CHOICES = ["full", "G", "GS", "DS", "sam-clip"]


def segment(model: Any, clip: Any, vae: Any, image: torch.Tensor, text: str, variant: str, preset: Preset,
            seed: int = 0, sam: Any = None, clip_scorer: Any = None, amg: dict | None = None,
            top_k: int | None = None) -> tuple[select_nodes.Selection, torch.Tensor, str]:
    """Run one variant (full, G, GS, DS, sam-clip) on every image; returns the selection, c ([B, H, W],
    zeros when the variant needs no diffusion) and a report."""
    v = get_variant(variant)
    p = preset
    batch, height, width = int(image.shape[0]), int(image.shape[1]), int(image.shape[2])
    if v.proposals == "sam" and sam is None:
        raise InputError(f"sam: variant {variant} uses SAM proposals; connect RefDiffSAMLoader")
    if v.discriminative and clip_scorer is None:
        raise InputError(f"clip_scorer: variant {variant} uses CLIP scores; connect RefDiffCLIPLoader")
    parse, parse_info = text_nodes.parse_texts(text, clip, p.root_rule, p.prompt_suffix)
    parse.for_batch(batch, "text")
    report = [parse_info]

    c = None
    if v.needs_diffusion:
        square = diffusion_nodes.prepare_images(image, p.image_size, p.resize_filter)
        latent = diffusion_nodes.inject_noise({"samples": vae.encode(square[:, :, :, :3])}, seed, p.strength,
                                              p.ddim_steps, p.num_train_timesteps)
        attention, info = diffusion_nodes.capture_attention(
            model, latent, clip=clip, parse=parse, prompt_suffix=p.prompt_suffix, guidance_scale=p.guidance_scale,
            use_cfg=p.use_cfg, kind=p.capture_kind, factor=p.capture_factor, blocks=p.capture_blocks)
        c = map_nodes.generative_maps(attention, parse, image, mode=p.map_resize, layer_eps=p.layer_norm_eps,
                                      map_eps=p.map_eps)
        report.append(info)
    runtime.check_interrupt()

    if v.proposals == "threshold":
        proposals = map_nodes.threshold_batch(c, p.thresholds)
    else:
        from . import sam_nodes

        proposals = sam_nodes.sam_proposal_batch(sam, image, amg or sam_generator_kwargs(p), p.sam_keep_largest,
                                                 p.sam_min_area)
    s_g = map_nodes.generative_score_batch(c, proposals, eps=p.score_eps) if v.generative else None
    s_d = None
    if v.discriminative:
        from . import clip_nodes

        s_d = clip_nodes.clip_score_batch(clip_scorer, image, proposals, parse, p,
                                          mode="sam-clip" if v.sam_clip else "ref-diff")
    gw, dw = select_nodes.fusion_weights(p, s_g is not None and s_d is not None)
    selection = select_nodes.fuse_select(proposals, s_g, s_d, gw, dw, top_k or p.top_k)
    report.append(f"variant {v.name}, preset {p.name}\n{selection.table}")
    if c is None:
        c = torch.zeros(batch, height, width)
    return selection, c, "\n".join(report)


class RefDiffSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = sam_generator_kwargs(Preset(name="defaults"))
        return io.Schema(
            node_id="RefDiffSegment",
            display_name="RefDiff Segment (all-in-one)",
            category=sockets.CATEGORY,
            description="Referring segmentation in one node: the mask of the object the text describes, for every "
                        "image. Runs the same stages as the separate RefDiff nodes.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x/2.x MODEL (used by the variants with the generative map)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (prompt encoding and token positions)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE."),
                io.Image.Input("image", tooltip="Images to segment."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="Referring expression: one line for all images, or one line per image."),
                io.Combo.Input("variant", options=VARIANT_CHOICES, default="full",
                               tooltip="full = SAM + s_G + s_D; G = threshold proposals + s_G; GS = SAM + s_G; "
                                       "DS = SAM + s_D; sam-clip = SAM + CLIP crop baseline."),
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
                sockets.SamModel.Input("sam", optional=True, tooltip="SAM (variants full, GS, DS, sam-clip)."),
                sockets.ClipModel.Input("clip_scorer", optional=True,
                                        tooltip="CLIP scorer (variants full, DS, sam-clip)."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="The selected mask per image, MASK [B, H, W]."),
                io.Mask.Output(display_name="c", tooltip="Generative map per image (zeros for DS / sam-clip)."),
                io.String.Output(display_name="report", tooltip="Parse, capture and ranked scores."),
                io.Image.Output(display_name="preview", tooltip="The selected mask over the image."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, text, variant, preset, seed, image_size, top_k, points_per_side,
                pred_iou_thresh, stability_score_thresh, sam=None, clip_scorer=None) -> io.NodeOutput:
        p = sockets.preset(preset)
        if image_size:
            p = p.with_(image_size=int(image_size))
        amg = {**sam_generator_kwargs(p), "points_per_side": points_per_side, "pred_iou_thresh": pred_iou_thresh,
               "stability_score_thresh": stability_score_thresh}
        selection, c, report = segment(model, clip, vae, image, text, variant, p, seed=seed, sam=sam,
                                       clip_scorer=clip_scorer, amg=amg, top_k=top_k or None)
        preview = select_nodes.preview_selection(image, selection.best)
        return io.NodeOutput(selection.best, c, report, preview, ui=ui.PreviewImage(preview, cls=cls))


NODES = [RefDiffSegment]
__all__ = ["segment", "NODES", "RefDiffSegment"]
