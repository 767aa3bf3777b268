"""DiffSegmenter-style refinement of the generative map with the UNet's self-attention.

DiffSegmenter (Wang et al., "Diffusion Model is Secretly a Training-free Open Vocabulary Semantic Segmenter",
arXiv 2309.02773) observes that a token's cross-attention says WHAT is where (semantics) but covers objects
only partially, while self-attention says which pixels belong together (shape). It

1. fuses the token's cross-attention over the UNet levels: per level, the head- and layer-averaged map is
   resized (bilinear) to the finest grid and min-max normalised, then the levels are mixed with fixed weights
   (the released code: 0.3, 0.5, 0.1, 0.1 for the 8, 16, 32, 64 grids of a 512 px image, i.e. downsampling
   factors 8, 4, 2, 1 — weights here are keyed by factor so they mean the same UNet level at any size);
2. completes the fused map with the finest level's self-attention A (row-stochastic, rows = queries,
   averaged over heads, layers and steps): map <- A @ map (the released code multiplies once);
3. min-max normalises the result, which then goes through the usual resize/crop/threshold (maps.py).

Row-stochastic A is a random-walk operator: (A m)(i) is the A-weighted mean of m over the pixels i attends
to, so a partial blob spreads over the pixels that attend to it, and values stay inside [min m, max m].
See docs/SIBLING_METHODS.md for the memory costs and how this plugs into Ref-Diff.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .capture import (BLOCKS, COND, SELF_ATTENTION_CHUNK, SELF_ATTENTION_MAX_TOKENS, CrossAttentionMaps,
                      finest_self_attention_factor, token_map)
from .errors import InputError

# Released DiffSegmenter code: weight = [0.3, 0.5, 0.1, 0.1] for the 8/16/32/64 grids of SD 1.x at 512 px.
DIFFSEGMENTER_FACTOR_WEIGHTS: dict[int, float] = {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1}
DIFFSEGMENTER_ITERATIONS: int = 1  # the released code applies the self-attention once
ROW_SUM_TOLERANCE: float = 1e-3

Grid = tuple[int, int]


def _as_grid(grid: int | Sequence[int]) -> Grid:
    if isinstance(grid, int):
        return int(grid), int(grid)
    h, w = (int(v) for v in grid)
    return h, w


def _square_grid(num: int, name: str) -> Grid:
    side = math.isqrt(num)
    if side * side != num:
        raise InputError(f"{name}: {num} tokens is not a square grid; pass its grid (h, w) explicitly")
    return side, side


def _check_map(m: torch.Tensor, name: str) -> None:
    if not isinstance(m, torch.Tensor) or m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise InputError(f"{name}: expected a non-empty 2-D map [h, w], got {shape}")
    if not torch.isfinite(m).all():
        raise InputError(f"{name}: contains NaN or infinite values")


def check_affinity(affinity: torch.Tensor, name: str = "affinity", tolerance: float = ROW_SUM_TOLERANCE) -> None:
    """Raise InputError unless ``affinity`` is a finite, non-negative [Q, Q] matrix whose rows sum to 1."""
    if not isinstance(affinity, torch.Tensor) or affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1]:
        shape = tuple(affinity.shape) if isinstance(affinity, torch.Tensor) else type(affinity).__name__
        raise InputError(f"{name}: expected a square matrix [Q, Q], got {shape}")
    if not torch.isfinite(affinity).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    if float(affinity.min()) < -tolerance:
        raise InputError(f"{name}: has negative entries; give softmax probabilities, not logits")
    err = float((affinity.double().sum(dim=1) - 1.0).abs().max())
    if err > tolerance:
        raise InputError(f"{name}: rows must sum to 1 (row-stochastic attention probabilities); worst row is off "
                         f"by {err:.3g}")


def axis_resampling(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D resampling pair (W [n_out, n_in], D [n_in, n_out]) for one axis of an affinity.

    W resamples the QUERY axis: linear interpolation (align_corners=False) to upsample, box averaging (torch
    "area") to downsample; its rows sum to 1, so rows of W @ A are convex combinations of rows of A.
    D redistributes the KEY axis: D = W^T with rows normalised to 1, i.e. the probability of a source key
    cell is shared among the target cells that interpolation draws from it (equally among its s children
    for an integer upsampling by s; summed over the children for a downsampling). Rows of A @ D therefore
    still sum to 1, and W A D is row-stochastic whenever A is.
    """
    if n_in < 1 or n_out < 1:
        raise InputError(f"axis_resampling: sizes must be positive, got {n_in} -> {n_out}")
    if n_in == n_out:
        eye = torch.eye(n_in, dtype=torch.float64)
        return eye, eye.clone()
    mode = "linear" if n_out > n_in else "area"
    eye = torch.eye(n_in, dtype=torch.float64)[None]  # channel c = unit impulse at c
    kwargs: dict[str, Any] = {"align_corners": False} if mode == "linear" else {}
    w = F.interpolate(eye, size=n_out, mode=mode, **kwargs)[0].T.contiguous()  # [n_out, n_in]
    d = w.T / w.T.sum(dim=1, keepdim=True)
    return w, d.contiguous()


def resample_affinity(affinity: torch.Tensor, grid: int | Sequence[int], target_grid: int | Sequence[int]
                      ) -> torch.Tensor:
    """Resample a [Q, Q] self-attention affinity on ``grid`` to ``target_grid``: W_q A D_k per axis (2-D kron).

    Separable: with row-major flattening the 2-D operators are kron(W_h, W_w) and kron(D_h, D_w), applied
    here axis by axis without forming them. Row-stochastic in, row-stochastic out (see axis_resampling).
    """
    (h, w), (th, tw) = _as_grid(grid), _as_grid(target_grid)
    if affinity.ndim != 2 or affinity.shape[0] != h * w or affinity.shape[1] != h * w:
        raise InputError(f"affinity of shape {tuple(affinity.shape)} does not match its grid {h}x{w}")
    if (h, w) == (th, tw):
        return affinity.float()
    wh, dh = axis_resampling(h, th)
    ww, dw = axis_resampling(w, tw)
    a = affinity.double().reshape(h, w, h, w)
    a = torch.tensordot(wh, a, dims=([1], [0]))  # [th, w, h, w]
    a = torch.tensordot(ww, a, dims=([1], [1])).transpose(0, 1)  # [th, tw, h, w]
    a = torch.tensordot(a, dh, dims=([2], [0]))  # [th, tw, w, th]
    a = torch.tensordot(a, dw, dims=([2], [0]))  # [th, tw, th, tw]
    return a.reshape(th * tw, th * tw).float()


def fuse_self_attention(affinities: Sequence[torch.Tensor], target_grid: int | Sequence[int] | None = None,
                        grids: Sequence[int | Sequence[int]] | None = None,
                        weights: Sequence[float] | None = None) -> torch.Tensor:
    """One row-stochastic affinity [Q, Q] on ``target_grid`` from several captured ones (weighted mean).

    Each input [Q_i, Q_i] lives on grids[i] (default: the square grid of Q_i); it is resampled with
    ``resample_affinity`` (rows interpolated, key mass redistributed), then the inputs are averaged with
    ``weights`` (default equal: DiffSegmenter averages every layer of its level). target_grid defaults to
    the finest input grid. Memory: Q_target^2 floats (64 MiB at 64 x 64).
    """
    if not affinities:
        raise InputError("fuse_self_attention: no affinity given; capture some self-attention layers first")
    if grids is None:
        grids = [_square_grid(int(a.shape[0]), f"affinity {i}") for i, a in enumerate(affinities)]
    if len(grids) != len(affinities):
        raise InputError(f"fuse_self_attention: {len(affinities)} affinities but {len(grids)} grids")
    grids = [_as_grid(g) for g in grids]
    target = max(grids, key=lambda g: g[0] * g[1]) if target_grid is None else _as_grid(target_grid)
    weights = [1.0] * len(affinities) if weights is None else [float(x) for x in weights]
    if len(weights) != len(affinities) or any(x < 0 for x in weights) or sum(weights) <= 0:
        raise InputError(f"fuse_self_attention: weights {weights} must be {len(affinities)} non-negative numbers "
                         f"with a positive sum")
    total = None
    for i, (a, g, wgt) in enumerate(zip(affinities, grids, weights)):
        check_affinity(a, f"affinity {i}")
        part = resample_affinity(a, g, target) * (wgt / sum(weights))
        total = part if total is None else total + part
    return total


def _resize(m: torch.Tensor, grid: Grid) -> torch.Tensor:
    if tuple(m.shape) == tuple(grid):
        return m.float()
    return F.interpolate(m.float()[None, None], size=grid, mode="bilinear", align_corners=False)[0, 0]


def _minmax(m: torch.Tensor, eps: float) -> torch.Tensor:
    return (m - m.min()) / (m.max() - m.min() + eps)


def fuse_cross_attention(maps_by_factor: Mapping[int, torch.Tensor],
                         weights: Mapping[int, float] | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Weighted mean of one token's per-level maps, keyed by downsampling factor, on the finest grid.

    Each map [h_f, w_f] is resized (bilinear) to the finest grid and min-max normalised (eps), then
    sum_f w_f m_f / sum_f w_f. Default weights: DIFFSEGMENTER_FACTOR_WEIGHTS ({8: .3, 4: .5, 2: .1, 1: .1}).
    """
    if not maps_by_factor:
        raise InputError("fuse_cross_attention: no map given; capture cross-attention at some factor first")
    weights = DIFFSEGMENTER_FACTOR_WEIGHTS if weights is None else weights
    missing = sorted(int(f) for f in maps_by_factor if int(f) not in {int(k) for k in weights})
    if missing:
        raise InputError(f"fuse_cross_attention: no weight for factor(s) {missing}; give weights for every captured "
                         f"factor (have {dict(weights)})")
    wmap = {int(k): float(v) for k, v in weights.items()}
    for f, m in maps_by_factor.items():
        _check_map(m, f"map of factor {f}")
    total_w = sum(wmap[int(f)] for f in maps_by_factor)
    if total_w <= 0 or any(wmap[int(f)] < 0 for f in maps_by_factor):
        raise InputError(f"fuse_cross_attention: weights {wmap} must be non-negative with a positive sum over the "
                         f"captured factors {sorted(maps_by_factor)}")
    finest = max((tuple(m.shape) for m in maps_by_factor.values()), key=lambda g: g[0] * g[1])
    fused = sum(_minmax(_resize(m, finest), eps) * wmap[int(f)] for f, m in maps_by_factor.items())
    return fused / total_w


def refine_with_self_attention(score_map: torch.Tensor, affinity: torch.Tensor,
                               iterations: int = DIFFSEGMENTER_ITERATIONS,
                               affinity_grid: int | Sequence[int] | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Complete a score map [h, w] with a row-stochastic self-attention affinity: m <- A m, ``iterations``
    times, then min-max normalised (eps); the result stays on the score map's grid.

    When the affinity's grid differs, the affinity resampled to the map's grid (W A D, see
    resample_affinity) is applied in factored form: pool the map with D, propagate with A, interpolate
    back with W, so the big resampled matrix is never built.
    """
    _check_map(score_map, "score_map")
    check_affinity(affinity)
    if iterations < 0:
        raise InputError(f"iterations must be >= 0, got {iterations}")
    grid = _square_grid(int(affinity.shape[0]), "affinity") if affinity_grid is None else _as_grid(affinity_grid)
    if grid[0] * grid[1] != affinity.shape[0]:
        raise InputError(f"affinity of {affinity.shape[0]} tokens does not match affinity_grid {grid}")
    h, w = int(score_map.shape[0]), int(score_map.shape[1])
    a = affinity.to(device=score_map.device, dtype=torch.float32)
    m = score_map.float()
    if (h, w) == grid:
        for _ in range(iterations):
            m = (a @ m.reshape(-1)).reshape(h, w)
    else:
        wh, dh = (x.to(m.device, torch.float32) for x in axis_resampling(grid[0], h))  # wh [h, gh], dh [gh, h]
        ww, dw = (x.to(m.device, torch.float32) for x in axis_resampling(grid[1], w))
        for _ in range(iterations):
            pooled = dh @ m @ dw.T  # [gh, gw]
            spread = (a @ pooled.reshape(-1)).reshape(grid)
            m = wh @ spread @ ww.T  # [h, w]
    return _minmax(m, eps)


def factor_token_maps(maps: CrossAttentionMaps, layer_factors: Mapping[str, int], tokens: int | Sequence[int],
                      guidance_scale: float = 9.0, eps: float = 1e-8) -> dict[int, torch.Tensor]:
    """Per downsampling factor, the token map of the captured layers at that factor (capture.token_map).

    ``layer_factors`` maps a layer name (as captured, without the "step{i}/" prefix) to its factor; maps hold
    every captured layer of every step already resized to one grid.
    """
    combined = maps.combined(guidance_scale)
    groups: dict[int, list[int]] = {}
    for i, entry in enumerate(maps.layers):
        name = entry.split("/", 1)[-1]
        if name not in layer_factors:
            raise InputError(f"layer {name!r} has no known downsampling factor; known: {sorted(layer_factors)}")
        groups.setdefault(int(layer_factors[name]), []).append(i)
    return {f: token_map(combined[idx], tokens, eps=eps) for f, idx in sorted(groups.items())}


def diffsegmenter_map(sd: Any, latent: torch.Tensor, prompt: str, token_positions: int | Sequence[int], *,
                      strength: float = 0.1, ddim_steps: int = 20, num_train_timesteps: int = 1000,
                      use_cfg: bool = True, guidance_scale: float = 9.0, capture_kind: str = "probs",
                      capture_blocks: tuple[str, ...] = BLOCKS, seed: int = 0, max_steps: int | None = None,
                      factor_weights: Mapping[int, float] | None = None,
                      max_tokens: int = SELF_ATTENTION_MAX_TOKENS, self_factor: int | None = None,
                      iterations: int = DIFFSEGMENTER_ITERATIONS, eps: float = 1e-8,
                      chunk: int = SELF_ATTENTION_CHUNK, progress: Callable[[int, int], None] | None = None,
                      should_stop: Callable[[], None] | None = None) -> torch.Tensor:
    """The token's DiffSegmenter map [h, w] in [0, 1] on the latent grid, from ONE run of the Ref-Diff schedule.

    Runs ``diffusion.run_capture`` (noising and DDIM steps as configured, cross-attention at every factor)
    while capturing the conditional branch's self-attention at ``self_factor`` (default: the finest level of
    the UNet's attention with at most ``max_tokens`` tokens) merged over layers and steps; then
    fuse_cross_attention -> refine_with_self_attention. Feed the result to maps.generative_map like a token map.
    """
    from .diffusion import capture_self_attention, cross_attention_layers, run_capture

    if latent.ndim != 4:
        raise InputError(f"latent must have shape [1, C, h, w], got {tuple(latent.shape)}")
    latent_hw = (int(latent.shape[-2]), int(latent.shape[-1]))
    layer_factors = {layer.name: layer.factor for layer in cross_attention_layers(sd.unet)}
    # attn1 and attn2 share their transformer blocks: the UNet's self-attention levels are its attn2 levels
    factor = (finest_self_attention_factor(latent_hw, max_tokens, levels=sorted(set(layer_factors.values())))
              if self_factor is None else int(self_factor))
    layout = [1, 0] if use_cfg else None
    with capture_self_attention(sd.unet, max_tokens=max_tokens, factor=factor, cond_or_uncond=layout, keep=(COND,),
                                chunk=chunk, per_layer=False) as store:
        maps = run_capture(sd, latent, prompt, strength=strength, ddim_steps=ddim_steps,
                           num_train_timesteps=num_train_timesteps, use_cfg=use_cfg, guidance_scale=guidance_scale,
                           capture_kind=capture_kind, capture_factor=None, capture_blocks=capture_blocks, seed=seed,
                           max_steps=max_steps, progress=progress, should_stop=should_stop)
    by_factor = factor_token_maps(maps, layer_factors, token_positions, guidance_scale, eps)
    score = fuse_cross_attention(by_factor, factor_weights, eps)
    captured = store.affinities(COND, factor=factor)
    affinity = fuse_self_attention([c.affinity for c in captured], grids=[c.grid for c in captured])
    grid = max((c.grid for c in captured), key=lambda g: g[0] * g[1])
    return refine_with_self_attention(score, affinity, iterations, affinity_grid=grid, eps=eps)


__all__ = ["DIFFSEGMENTER_FACTOR_WEIGHTS", "DIFFSEGMENTER_ITERATIONS", "check_affinity", "axis_resampling",
           "resample_affinity", "fuse_self_attention", "fuse_cross_attention", "refine_with_self_attention",
           "factor_token_maps", "diffsegmenter_map"]
