"""FreeSeg-Diff-style class-agnostic proposals: k-means on multi-scale UNet features.

FreeSeg-Diff (Corradini et al., "FreeSeg-Diff: Training-Free Open-Vocabulary Segmentation with Diffusion
Models", arXiv 2403.20105) runs the UNet once on the (barely) noised latent, takes intermediate features,
upsamples them to one grid, concatenates them, clusters the pixels with k-means and uses each cluster as a
binary mask; CLIP then names the masks and a dense CRF sharpens them. Its released code uses the query
projections (attn2.to_q) of the cross-attention layers on the 16 x 16 grid of a 512 px image (factor 4),
resized bilinearly to 32 x 32 (factor 2), timestep 0, the empty prompt, and K = 4.

Here the clusters become proposals bool [N, H, W] at the image's own frame, usable wherever SAM or threshold
proposals are (scoring, CLIP). Differences and choices (see docs/SIBLING_METHODS.md): each block's features are
L2-normalised per pixel before concatenation (blocks of different widths and scales then weigh the same;
the released code concatenated raw features of equal-width layers); clusters can be split into connected
components (scipy.ndimage.label when scipy is installed, otherwise skipped with a warning); the dense CRF
is not implemented (pydensecrf, its usual implementation, is unmaintained and needs compiling).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .capture import COND, downsampled_grid
from .diffusion import capture_block_features, cross_attention_layers, encode_text, unet_output
from .errors import InputError
from .schedule import injection_noise, noise_latent
from .image import frame_placement

if TYPE_CHECKING:
    from .image import PreparedImage

FREESEG_CLUSTERS: int = 4  # released code: K in range(4, 5)
FREESEG_FEATURE_FACTOR: int = 4  # attn2 queries on the 16 x 16 grid at 512 px
FREESEG_CLUSTER_FACTOR: int = 2  # clustered on 32 x 32 at 512 px
FREESEG_TIMESTEP: int = 0  # released code: add_noise(latent, noise, 0), UNet at t = 0


def kmeans(x: torch.Tensor, n_clusters: int, seed: int = 0, max_iter: int = 300, tol: float = 1e-4
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-means (k-means++ init, Lloyd iterations) of points x [N, D]; returns (labels [N], centres [k, D]).

    Stops when the centres move by at most tol * mean feature variance (squared, summed), as scikit-learn
    does; an empty cluster is re-seeded with the point farthest from its centre.
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise InputError(f"kmeans: expected points [N, D], got {tuple(x.shape)}")
    if not 1 <= n_clusters <= x.shape[0]:
        raise InputError(f"n_clusters must be within 1..{x.shape[0]} (the number of points), got {n_clusters}")
    if not torch.isfinite(x).all():
        raise InputError("kmeans: features contain NaN or infinite values")
    x = x.double()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    centres = _kmeans_pp(x, n_clusters, gen)
    threshold = float(tol) * float(x.var(dim=0, unbiased=False).mean())
    labels = _assign(x, centres)[0]
    for _ in range(int(max_iter)):
        new = _update(x, labels, centres)
        shift = float(((new - centres) ** 2).sum())
        centres = new
        labels = _assign(x, centres)[0]
        if shift <= threshold:
            break
    return labels, centres.float()


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None]).clamp_min(0.0)


def _assign(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = _sq_dist(x, centres)
    best, labels = d.min(dim=1)
    return labels, best


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    closest = _sq_dist(x, x[first][None])[:, 0]
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # fewer distinct points than clusters: any point will do
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial((closest / total).float(), 1, generator=gen))
        centres.append(x[idx])
        closest = torch.minimum(closest, _sq_dist(x, x[idx][None])[:, 0])
    return torch.stack(centres)


def _update(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    k = centres.shape[0]
    sums = torch.zeros_like(centres).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    new = sums / counts.clamp_min(1.0)[:, None]
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        dist = _sq_dist(x, centres).gather(1, labels[:, None])[:, 0]
        far = dist.argsort(descending=True)
        for j, idx in zip(empty, far.tolist()):
            new[j] = x[idx]
    return new


def _relabel_by_first_appearance(labels: torch.Tensor) -> torch.Tensor:
    """Rename labels 0..K-1 in the order they first appear (row-major), so equal partitions give equal labels."""
    flat = labels.reshape(-1)
    uniq, inverse = torch.unique(flat, return_inverse=True)
    first = torch.full((uniq.numel(),), flat.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(flat.numel()), reduce="amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(uniq.numel())
    return rank[inverse].reshape(labels.shape)


def _resize_features(f: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    if tuple(f.shape[-2:]) == tuple(grid):
        return f.float()
    shrink = grid[0] < f.shape[-2] or grid[1] < f.shape[-1]
    return F.interpolate(f.float()[None], size=grid, mode="bilinear", align_corners=False, antialias=shrink)[0]


def cluster_features(features: Sequence[torch.Tensor], n_clusters: int = FREESEG_CLUSTERS,
                     grid: int | Sequence[int] | None = None, seed: int = 0, normalize: bool = True,
                     max_iter: int = 300, tol: float = 1e-4) -> torch.Tensor:
    """k-means labels [h, w] (long, 0..K-1 in order of first appearance) of per-pixel multi-block features.

    Each feature map [C_i, h_i, w_i] is resized (bilinear) to ``grid`` (default: the finest input grid),
    L2-normalised per pixel when ``normalize``, and the maps are concatenated along channels.
    """
    if not features:
        raise InputError("cluster_features: no feature map given; capture some UNet blocks first")
    for i, f in enumerate(features):
        if not isinstance(f, torch.Tensor) or f.ndim != 3 or min(f.shape) < 1:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise InputError(f"cluster_features: features[{i}] must be a tensor [C, h, w], got {shape}")
    if grid is None:
        target = max((tuple(int(v) for v in f.shape[-2:]) for f in features), key=lambda g: g[0] * g[1])
    else:
        target = (int(grid), int(grid)) if isinstance(grid, int) else tuple(int(v) for v in grid)
    parts = [_resize_features(f.detach().cpu(), target) for f in features]
    if normalize:
        parts = [F.normalize(p, dim=0, eps=1e-12) for p in parts]
    x = torch.cat(parts, dim=0).reshape(sum(p.shape[0] for p in parts), -1).T  # [h*w, sum C]
    labels, _ = kmeans(x, n_clusters, seed=seed, max_iter=max_iter, tol=tol)
    return _relabel_by_first_appearance(labels.reshape(target))


def _scipy_label() -> Any:
    try:
        from scipy import ndimage
    except ImportError:
        return None
    return ndimage.label


def split_connected_components(labels: torch.Tensor, min_cells: int = 1) -> torch.Tensor:
    """Give every 4-connected component of every label its own label (-1: dropped, fewer than min_cells cells).

    Needs scipy (scipy.ndimage.label); without it the labels come back unchanged, with a warning.
    """
    label_fn = _scipy_label()
    if label_fn is None:
        warnings.warn("scipy is not installed: cluster proposals are not split into connected components",
                      stacklevel=2)
        return labels.clone()
    import numpy as np

    arr = labels.cpu().numpy()
    out = np.full(arr.shape, -1, dtype=np.int64)
    next_id = 0
    for value in np.unique(arr[arr >= 0]):  # one pass per cluster, not per pixel
        comp, n = label_fn(arr == value)
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        big = sizes >= min_cells
        big[0] = False  # background of this cluster's mask
        new_ids = np.full(n + 1, -1, dtype=np.int64)
        new_ids[big] = next_id + np.arange(int(big.sum()))
        next_id += int(big.sum())
        inside = comp > 0
        out[inside] = new_ids[comp[inside]]
    return torch.from_numpy(out)


def labels_to_frame(labels: torch.Tensor, prep: "PreparedImage") -> torch.Tensor:
    """Labels on a grid over the padded square -> labels [H, W] of the original frame (nearest, pixel centres).

    Pixel (y, x) of the frame sits at (y + y0 + 0.5, x + x0 + 0.5) in the side x side square; it takes the
    label of the grid cell containing that point.
    """
    if labels.ndim != 2:
        raise InputError(f"labels must be a 2-D grid [h, w], got {tuple(labels.shape)}")
    h, w = int(labels.shape[0]), int(labels.shape[1])
    x0, y0, side, width, height = frame_placement(prep)
    ys = ((torch.arange(height, dtype=torch.float64) + y0 + 0.5) * h / side).floor().long().clamp(0, h - 1)
    xs = ((torch.arange(width, dtype=torch.float64) + x0 + 0.5) * w / side).floor().long().clamp(0, w - 1)
    return labels.cpu()[ys][:, xs]


def cluster_proposals(labels: torch.Tensor, prep: "PreparedImage", min_area: int = 0,
                      split_components: bool = True, min_cells: int = 1) -> torch.Tensor:
    """Proposals bool [N, H, W] at the original frame: one per cluster (or per connected component of one).

    Components smaller than ``min_cells`` grid cells, masks smaller than ``min_area`` pixels of the frame and
    masks that fall entirely on the padding are dropped; order: by label (cluster, then component).
    """
    if labels.ndim != 2 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(f"labels must be an integer grid [h, w], got {labels.dtype} {tuple(labels.shape)}")
    if min_area < 0 or min_cells < 1:
        raise InputError(f"min_area must be >= 0 and min_cells >= 1, got {min_area} and {min_cells}")
    grid = labels.long().cpu()
    grid = split_connected_components(grid, min_cells) if split_components else _drop_small(grid, min_cells)
    frame = labels_to_frame(grid, prep)
    ids = torch.unique(frame)
    ids = ids[ids >= 0]
    masks = frame[None] == ids[:, None, None]
    area = masks.flatten(1).sum(1)
    keep = (area > 0) & (area >= int(min_area))
    return masks[keep]


def _drop_small(grid: torch.Tensor, min_cells: int) -> torch.Tensor:
    if min_cells <= 1:
        return grid
    counts = torch.bincount(grid.clamp_min(0).reshape(-1))
    return torch.where(counts[grid.clamp_min(0)] >= min_cells, grid, torch.full_like(grid, -1))


def query_feature_modules(unet: Any, factor: int = FREESEG_FEATURE_FACTOR) -> tuple[str, ...]:
    """Dotted names of the attn2.to_q projections at a downsampling factor: the released FreeSeg-Diff features."""
    names = {id(module): name for name, module in unet.named_modules()}
    found = tuple(names[id(layer.module.to_q)] for layer in cross_attention_layers(unet)
                  if layer.factor == int(factor) and id(getattr(layer.module, "to_q", None)) in names)
    if not found:
        raise InputError(f"this UNet has no cross-attention layer at factor {factor}; choose another feature_factor")
    return found


def feature_cluster_proposals(sd: Any, latent: torch.Tensor, prompt: str, prep: "PreparedImage", *,
                              blocks: Sequence[str] | None = None,
                              feature_factor: int = FREESEG_FEATURE_FACTOR,
                              timestep: int = FREESEG_TIMESTEP, condition_on_prompt: bool = False,
                              n_clusters: int = FREESEG_CLUSTERS, cluster_factor: int = FREESEG_CLUSTER_FACTOR,
                              normalize: bool = True, split_components: bool = True, min_area: int = 0,
                              min_cells: int = 1, seed: int = 0) -> torch.Tensor:
    """FreeSeg-Diff proposals bool [N, H, W]: one UNet pass on the noised latent, features clustered.

    The latent [1, C, h, w] is noised to ``timestep`` (schedule.noise_latent, seeded) and the UNet runs
    once, conditioned on ``prompt`` if condition_on_prompt else on "" (as the released code). Features:
    ``blocks`` (dotted module names) or, when None, the attn2 query projections at ``feature_factor``;
    clustered on the grid at ``cluster_factor`` of the latent, then cluster_proposals.
    """
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise InputError(f"latent must have shape [1, C, h, w], got {tuple(latent.shape)}")
    ac = sd.alphas_cumprod
    if not 0 <= int(timestep) < len(ac):
        raise InputError(f"timestep must be within 0..{len(ac) - 1}, got {timestep}")
    names = query_feature_modules(sd.unet, feature_factor) if blocks is None else tuple(blocks)
    noise = injection_noise(latent.shape, seed)
    x = noise_latent(latent.float().cpu(), float(ac[int(timestep)]), noise).to(device=sd.device, dtype=sd.dtype)
    context, pooled = encode_text(sd, prompt if condition_on_prompt else "", use_cfg=False)
    t = torch.full((1,), int(timestep), device=sd.device, dtype=torch.long)
    with torch.no_grad(), capture_block_features(sd.unet, names) as store:
        unet_output(sd, x, t, context, pooled)
    grid = downsampled_grid((int(latent.shape[-2]), int(latent.shape[-1])), cluster_factor)
    labels = cluster_features(store.tensors(COND), n_clusters=n_clusters, grid=grid, seed=seed, normalize=normalize)
    return cluster_proposals(labels, prep, min_area=min_area, split_components=split_components,
                             min_cells=min_cells)


__all__ = ["FREESEG_CLUSTERS", "FREESEG_FEATURE_FACTOR", "FREESEG_CLUSTER_FACTOR", "FREESEG_TIMESTEP", "kmeans",
           "cluster_features", "split_connected_components", "labels_to_frame", "cluster_proposals",
           "query_feature_modules", "feature_cluster_proposals"]
