"""FreeSeg-Diff's node (docs/SIBLING_METHODS.md): class-agnostic proposals from k-means on the UNet's features,
recorded in one UNet pass on the user's MODEL."""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from refdiff.capture import COND
from refdiff.clusters import FREESEG_CLUSTER_FACTOR, FREESEG_CLUSTERS, FREESEG_FEATURE_FACTOR, FREESEG_TIMESTEP
from refdiff.schedule import injection_noise
from refdiff.errors import InputError

from . import comfy_backend, runtime, sockets, tensors
from .feature_clusters import cluster_batch
from .wire_types import ProposalBatch


# ------------------------------------------------------------------------------------------ stage functions
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
    samples = tensors.latent_samples(latent)
    batch = int(samples.shape[0])
    if int(image.shape[0]) != batch:
        raise InputError(f"image holds {image.shape[0]} image(s) but the latent {batch}; connect the images the latent "
                         "was encoded from (through RefDiffPrepareImage)")
    if conditioning is None:
        if clip is None:
            raise InputError("clip: connect the checkpoint's CLIP (the pass is conditioned on the empty prompt), or "
                             "give conditioning")
        conditioning = comfy_backend.encode_text(clip, "")
    comfy_backend.check_conditioning(model, conditioning, "conditioning")
    query_layers, blocks = comfy_backend.select_feature_sources(model, features, feature_factor)
    noise = injection_noise((1, *samples.shape[1:]), seed).expand(*samples.shape).contiguous()
    progress = runtime.Progress(1 + batch)
    store = comfy_backend.run_features(model, samples, noise, int(timestep), conditioning, query_layers, blocks,
                                       seed=seed, on_step=progress.step)
    proposals = cluster_batch([store.tensors(COND, image=i) for i in range(batch)], tuple(samples.shape[-2:]),
                              int(image.shape[1]), int(image.shape[2]), on_image=progress.step,
                              n_clusters=n_clusters, cluster_factor=cluster_factor, normalize=normalize,
                              split_components=split_components, min_area=min_area, seed=seed)
    names = [la.name for la in query_layers] or list(blocks)
    info = (f"{family}: {features} of {names} at t={timestep}, {n_clusters} clusters on the latent / "
            f"{cluster_factor} grid; {proposals.describe()}")
    return proposals, info


# ------------------------------------------------------------------------------------------ node
class RefDiffFeatureClusterProposals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffFeatureClusterProposals",
            display_name="RefDiff Feature-Cluster Proposals",
            category=sockets.CATEGORY,
            description="FreeSeg-Diff proposals: one UNet pass on the barely noised latent (empty prompt), k-means on "
                        "the UNet's features, one mask per cluster (or per connected piece of one). Use them where "
                        "SAM or threshold proposals go. The MODEL is cloned; the one you connect is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x, 2.x or SDXL MODEL."),
                io.Latent.Input("latent", tooltip="VAEEncode of RefDiffPrepareImage's square (the plain latent, or "
                                                  "the noised latent of RefDiffNoiseInjection: only its samples are "
                                                  "used)."),
                io.Image.Input("image", tooltip="The ORIGINAL images: the proposals come out at their frame and size."),
                io.Int.Input("clusters", default=FREESEG_CLUSTERS, min=1, max=64,
                             tooltip="k of k-means (4 in FreeSeg-Diff's released code)."),
                io.Combo.Input("features", options=comfy_backend.FEATURE_OPTIONS, default="queries",
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
                sockets.Proposals.Output(display_name="proposals", tooltip="Candidate masks per image "
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
        runtime.LOG.info("[RefDiff] %s", info)
        return io.NodeOutput(proposals, info)



NODES = [RefDiffFeatureClusterProposals]
__all__ = ["cluster_proposal_batch", "NODES", "RefDiffFeatureClusterProposals"]
