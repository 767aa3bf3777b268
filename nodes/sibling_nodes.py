"""Nodes of the two training-free sibling methods (docs/SIBLING_METHODS.md) on the user's MODEL:
DiffSegmenter's self-attention refinement of the generative map, and FreeSeg-Diff's feature-cluster proposals.
"""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io, ui

from refdiff.capture import COND
from refdiff.clusters import FREESEG_CLUSTER_FACTOR, FREESEG_CLUSTERS, FREESEG_FEATURE_FACTOR, FREESEG_TIMESTEP
from refdiff.diffusion import injection_noise
from refdiff.errors import InputError
from refdiff.maps import RESIZE_MODES
from refdiff.refine import DIFFSEGMENTER_ITERATIONS

from . import comfy_backend, common
from .map_nodes import preview_maps
from .payloads import ProposalBatch
from .sibling_helpers import (FACTOR_WEIGHTS_EXAMPLE, cluster_image, format_factor_weights, parse_factor_weights,
                              refined_maps)

FEATURE_OPTIONS = ["queries", "output blocks"]


# ------------------------------------------------------------------------------------------ stage functions
def feature_sources(model: Any, features: str, feature_factor: int) -> tuple[list, list[str]]:
    """(query layers, block names) to record for ``features`` at ``feature_factor``; InputError listing what
    this UNet has when nothing matches."""
    dm = model.model.diffusion_model
    if features == "queries":
        layers = [la for la in comfy_backend.attn2_layers(dm) if la.factor == int(feature_factor)]
        if not layers:
            have = sorted({la.factor for la in comfy_backend.attn2_layers(dm)})
            raise InputError(f"feature_factor: this UNet has no cross-attention at factor {feature_factor} (it has "
                             f"{have}); choose one of those")
        return layers, []
    if features == "output blocks":
        levels = comfy_backend.output_block_levels(dm)
        names = set(comfy_backend.block_feature_names(dm))
        blocks = [f"output_blocks.{j}" for j, lvl in enumerate(levels)
                  if lvl == int(feature_factor) and f"output_blocks.{j}" in names]
        if not blocks:
            raise InputError(f"feature_factor: no recordable output block runs at factor {feature_factor}; this UNet's "
                             f"output blocks run at {sorted(set(levels[:-1]))}")
        return [], blocks
    raise InputError(f"features must be one of {FEATURE_OPTIONS}, got {features!r}")


def cluster_proposal_batch(model: Any, latent: dict, image: torch.Tensor, *, clip: Any = None,
                           conditioning: list | None = None, n_clusters: int = FREESEG_CLUSTERS,
                           features: str = "queries", feature_factor: int = FREESEG_FEATURE_FACTOR,
                           cluster_factor: int = FREESEG_CLUSTER_FACTOR, timestep: int = FREESEG_TIMESTEP,
                           normalize: bool = True, split_components: bool = True, min_area: int = 0,
                           seed: int = 0) -> tuple[ProposalBatch, str]:
    """FreeSeg-Diff proposals of every image: ONE UNet pass on the whole latent batch noised to ``timestep``
    (seeded noise, the same for every image), conditioned on the empty prompt (or ``conditioning``), features
    recorded on a clone of the MODEL, then k-means per image (refdiff.clusters)."""
    family = comfy_backend.model_family(model)
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise InputError("latent: expected a LATENT from VAEEncode (a dict with 'samples' [B, 4, h, w])")
    batch = int(samples.shape[0])
    if int(image.shape[0]) != batch:
        raise InputError(f"image holds {image.shape[0]} image(s) but the latent {batch}; connect the images the latent "
                         "was encoded from (through RefDiffPrepareImage)")
    if conditioning is None:
        if clip is None:
            raise InputError("clip: connect the checkpoint's CLIP (the pass is conditioned on the empty prompt), or "
                             "give conditioning")
        conditioning = comfy_backend.encode_text(clip, "")
    query_layers, blocks = feature_sources(model, features, feature_factor)
    noise = injection_noise((1, *samples.shape[1:]), seed).expand(*samples.shape).contiguous()
    progress = common.Progress(1 + batch)
    store = comfy_backend.run_features(model, samples, noise, int(timestep), conditioning, query_layers, blocks,
                                       seed=seed, on_step=progress.step)
    height, width = int(image.shape[1]), int(image.shape[2])
    masks = []
    for i in range(batch):
        common.check_interrupt()
        masks.append(cluster_image(store.tensors(COND, image=i), tuple(samples.shape[-2:]), height, width,
                                   n_clusters=n_clusters, cluster_factor=cluster_factor, normalize=normalize,
                                   split_components=split_components, min_area=min_area, seed=seed))
        progress.step()
    names = [la.name for la in query_layers] or list(blocks)
    info = (f"{family}: {features} of {names} at t={timestep}, {n_clusters} clusters on the latent / "
            f"{cluster_factor} grid; " + ", ".join(f"image {i}: {m.shape[0]} proposals" for i, m in enumerate(masks)))
    return ProposalBatch(masks, source="cluster"), info


# ------------------------------------------------------------------------------------------ nodes
class RefDiffSelfAttentionRefine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffSelfAttentionRefine",
            display_name="RefDiff Self-Attention Refine",
            category=common.CATEGORY,
            description="DiffSegmenter's generative map: the root token's cross-attention fused over the UNet levels "
                        "with per-level weights, completed with the UNet's self-attention (map <- A map), then "
                        "resized and cropped like RefDiff Generative Map. A drop-in for its c output. Needs the "
                        "capture with self_attention on and factor 0 (every level).",
            inputs=[
                common.Attention.Input("attention", tooltip="From RefDiffCaptureAttention with self_attention on and "
                                                            "factor 0 (all levels)."),
                common.Parse.Input("parse", tooltip="The parse of the same text (gives the root token)."),
                io.Image.Input("image", tooltip="The ORIGINAL images (before RefDiffPrepareImage): c is cropped to "
                                                "their frame and size."),
                common.preset_input("Preset for 'resize: preset', 'factor_weights: preset' and the map epsilon."),
                io.Int.Input("iterations", default=DIFFSEGMENTER_ITERATIONS, min=0, max=100,
                             tooltip="How many times the map is multiplied by the self-attention (1 = DiffSegmenter's "
                                     "released code; more spreads further; 0 = fused cross-attention only)."),
                io.String.Input("factor_weights", default=FACTOR_WEIGHTS_EXAMPLE,
                                tooltip="Weight of each UNet level's cross-attention, as factor:weight pairs (factor = "
                                        "latent side / grid side); DiffSegmenter's 0.3/0.5/0.1/0.1 for the "
                                        "8/16/32/64 grids of a 512 image. 'preset' = the same."),
                io.Float.Input("eps", default=1e-8, min=0.0, max=0.01, step=1e-9, round=1e-12,
                               tooltip="Epsilon of the per-layer and per-level min-max normalisations."),
                io.Int.Input("self_factor", default=0, min=0, max=64,
                             tooltip="Which captured self-attention level to refine with (0 = the finest captured, "
                                     "DiffSegmenter's choice)."),
                io.Combo.Input("resize", options=["preset", *RESIZE_MODES], default="preset",
                               tooltip="Resize filter of the map: 'bilinear' (paper) or 'lanczos' (official)."),
            ],
            outputs=[
                io.Mask.Output(display_name="c", tooltip="Refined generative map per image, MASK [B, H, W] in [0, 1] "
                                                         "(feeds threshold proposals and generative scores)."),
                io.Image.Output(display_name="preview", tooltip="Heatmap of the refined c over the images."),
            ],
        )

    @classmethod
    def validate_inputs(cls, factor_weights) -> bool | str:
        if not isinstance(factor_weights, str):
            return True  # linked: checked when the node runs
        try:
            parse_factor_weights(factor_weights, default=common.preset("official").refine_factor_weights)
        except InputError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, attention, parse, image, preset, iterations, factor_weights, eps, self_factor,
                resize) -> io.NodeOutput:
        p = common.preset(preset)
        weights = parse_factor_weights(factor_weights, default=p.refine_factor_weights)
        common.check_interrupt()
        c = refined_maps(attention, parse, image, weights, iterations=iterations, eps=eps, self_factor=self_factor,
                         mode=p.map_resize if resize == "preset" else resize, map_eps=p.map_eps)
        common.LOG.info("[RefDiff] self-attention refine: weights %s, %d iteration(s)", format_factor_weights(weights),
                        iterations)
        preview = preview_maps(image, c)
        return io.NodeOutput(c, preview, ui=ui.PreviewImage(preview, cls=cls))


class RefDiffFeatureClusterProposals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffFeatureClusterProposals",
            display_name="RefDiff Feature-Cluster Proposals",
            category=common.CATEGORY,
            description="FreeSeg-Diff proposals: one UNet pass on the barely noised latent (empty prompt), k-means on "
                        "the UNet's features, one mask per cluster (or per connected piece of one). Use them where "
                        "SAM or threshold proposals go. The MODEL is cloned; the one you connect is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x or 2.x MODEL."),
                io.Latent.Input("latent", tooltip="VAEEncode of RefDiffPrepareImage's square (the plain latent, or "
                                                  "the noised latent of RefDiffNoiseInjection: only its samples are "
                                                  "used)."),
                io.Image.Input("image", tooltip="The ORIGINAL images: the proposals come out at their frame and size."),
                io.Int.Input("clusters", default=FREESEG_CLUSTERS, min=1, max=64,
                             tooltip="k of k-means (4 in FreeSeg-Diff's released code)."),
                io.Combo.Input("features", options=FEATURE_OPTIONS, default="queries",
                               tooltip="'queries': the query projections of the cross-attention layers at "
                                       "feature_factor (FreeSeg-Diff's released code); 'output blocks': the outputs "
                                       "of the decoder blocks that run at feature_factor."),
                io.Int.Input("feature_factor", default=FREESEG_FEATURE_FACTOR, min=1, max=64,
                             tooltip="UNet level of the features: latent side / feature grid side (4: 16x16 at 512 "
                                     "px, 32x32 at 1024 px)."),
                io.Int.Input("cluster_factor", default=FREESEG_CLUSTER_FACTOR, min=1, max=64,
                             tooltip="Features are resized to the latent downsampled by this and clustered there (2: "
                                     "32x32 at 512 px)."),
                io.Int.Input("timestep", default=FREESEG_TIMESTEP, min=0, max=999,
                             tooltip="DDPM timestep the latent is noised to for the single pass (0 = almost clean, "
                                     "as the released code)."),
                io.Boolean.Input("normalize", default=True,
                                 tooltip="L2-normalise each layer's features per pixel before concatenating them."),
                io.Boolean.Input("split_components", default=True,
                                 tooltip="Split every cluster into its 4-connected pieces, one proposal each (needs "
                                         "scipy; skipped with a warning without it)."),
                io.Int.Input("min_area", default=0, min=0, max=100000000,
                             tooltip="Drop proposals smaller than this many pixels of the image (0 = keep all)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise and of the k-means initialisation."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The checkpoint's CLIP: encodes the empty prompt the pass is conditioned on."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Instead of clip: the CONDITIONING of the pass (e.g. the referring "
                                              "sentence)."),
            ],
            outputs=[
                common.Proposals.Output(display_name="proposals", tooltip="Candidate masks per image "
                                                                          "(REFDIFF_PROPOSALS), at the images' size."),
                io.String.Output(display_name="info", tooltip="Features used and how many proposals each image got."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, image, clusters, features, feature_factor, cluster_factor, timestep, normalize,
                split_components, min_area, seed, clip=None, conditioning=None) -> io.NodeOutput:
        proposals, info = cluster_proposal_batch(
            model, latent, image, clip=clip, conditioning=conditioning, n_clusters=clusters, features=features,
            feature_factor=feature_factor, cluster_factor=cluster_factor, timestep=timestep, normalize=normalize,
            split_components=split_components, min_area=min_area, seed=seed)
        common.LOG.info("[RefDiff] %s", info)
        return io.NodeOutput(proposals, info)


NODES = [RefDiffSelfAttentionRefine, RefDiffFeatureClusterProposals]
__all__ = ["FEATURE_OPTIONS", "feature_sources", "cluster_proposal_batch", "NODES", *[n.__name__ for n in NODES]]
