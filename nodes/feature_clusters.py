"""FreeSeg-Diff's feature-cluster proposals of every image from recorded UNet features (k-means on the latent
grid, clusters mapped to the image frame). No ComfyUI import (tested offline); cluster_nodes records the features.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from refdiff.capture import downsampled_grid
from refdiff.clusters import cluster_features, cluster_proposals
from refdiff.errors import InputError

from .tensors import check_square_latent, frame_geometry
from .wire_types import ProposalBatch


def cluster_image(features: Sequence[torch.Tensor], latent_hw: tuple[int, int], height: int, width: int, *,
                  n_clusters: int = 4, cluster_factor: int = 2, normalize: bool = True, split_components: bool = True,
                  min_area: int = 0, seed: int = 0) -> torch.Tensor:
    """FreeSeg-Diff proposals bool [N, H, W] of one image from its feature maps [C_i, h_i, w_i]: k-means on the
    grid of the square latent downsampled by ``cluster_factor``, clusters mapped to the H x W frame."""
    check_square_latent(latent_hw, "latent")
    lh, lw = int(latent_hw[0]), int(latent_hw[1])
    grid = downsampled_grid((lh, lw), int(cluster_factor))
    if n_clusters > grid[0] * grid[1]:
        raise InputError(f"clusters: {n_clusters} clusters for a {grid[0]}x{grid[1]} grid; lower clusters or "
                         "cluster_factor")
    labels = cluster_features(features, n_clusters=int(n_clusters), grid=grid, seed=int(seed), normalize=normalize)
    prep = frame_geometry(int(height), int(width), 8 * lh)
    return cluster_proposals(labels, prep, min_area=int(min_area), split_components=split_components).cpu()


def cluster_batch(features: Sequence[Sequence[torch.Tensor]], latent_hw: tuple[int, int], height: int, width: int,
                  on_image: Callable[[], None] = lambda: None, **kwargs: Any) -> ProposalBatch:
    """cluster_image for every image's features (``on_image`` called after each, e.g. a progress step that also
    honours Cancel); REFDIFF_PROPOSALS with source "cluster"."""
    masks = []
    for f in features:
        masks.append(cluster_image(f, latent_hw, height, width, **kwargs))
        on_image()
    return ProposalBatch(masks, source="cluster")


__all__ = ["cluster_image", "cluster_batch"]
