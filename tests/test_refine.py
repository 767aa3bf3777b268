"""DiffSegmenter-style refinement: cross-attention fusion, self-attention resampling, completion, end to end."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from refdiff.capture import COND
from refdiff.diffusion import capture_self_attention, encode_image, run_capture
from refdiff.errors import InputError
from refdiff.image import prepare_image
from refdiff.refine import (DIFFSEGMENTER_FACTOR_WEIGHTS, axis_resampling, check_affinity, diffsegmenter_map,
                            factor_token_maps, fuse_cross_attention, fuse_self_attention, refine_with_self_attention,
                            resample_affinity)
from refdiff.testing.sd import tiny_sd


def region_affinity(regions: torch.Tensor) -> torch.Tensor:
    """Row-stochastic [Q, Q]: each pixel attends uniformly to the pixels of its own region."""
    flat = regions.reshape(-1)
    same = (flat[:, None] == flat[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def random_affinity(q: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(q, q, generator=g) * 2).softmax(dim=1)


# --- completion with a planted affinity -------------------------------------------------------------------

def test_partial_blob_becomes_the_whole_object():
    regions = torch.zeros(8, 8, dtype=torch.long)  # 0: background
    regions[1:5, 1:4] = 1  # object 1 (12 pixels)
    regions[5:8, 4:8] = 2  # object 2
    blob = torch.zeros(8, 8)
    blob[2:4, 2] = 1.0  # covers 2 of object 1's 12 pixels
    blob[0, 7] = 0.2  # weak noise on the background
    refined = refine_with_self_attention(blob, region_affinity(regions))
    assert torch.equal(refined >= 0.5, regions == 1)
    assert not torch.equal(blob >= 0.5, regions == 1)  # the raw blob was not the object
    assert float(refined.max()) == pytest.approx(1.0, abs=1e-6) and float(refined.min()) == pytest.approx(0.0)
    # object 1 gets the blob's mean over object 1, background the noise's mean over the background
    bg = (regions == 0).sum()
    expected_bg = (0.2 / bg) / (2 / 12)
    assert float(refined[0, 0]) == pytest.approx(float(expected_bg), abs=1e-5)


def test_iterations_repeat_the_product():
    a = random_affinity(16, seed=3)
    m = torch.rand(4, 4, generator=torch.Generator().manual_seed(1))
    once = (a @ m.reshape(-1))
    thrice = a @ (a @ once)
    ref = (thrice - thrice.min()) / (thrice.max() - thrice.min() + 1e-8)
    assert torch.allclose(refine_with_self_attention(m, a, iterations=3), ref.reshape(4, 4), atol=1e-6)
    zero = refine_with_self_attention(m, a, iterations=0)
    assert torch.allclose(zero, (m - m.min()) / (m.max() - m.min() + 1e-8), atol=1e-7)


def test_coarse_affinity_completes_a_fine_map():
    regions = torch.zeros(4, 4, dtype=torch.long)
    regions[0:3, 0:2] = 1  # object on the coarse 4x4 affinity grid
    blob = torch.zeros(8, 8)
    blob[2:4, 0:2] = 1.0  # fine pixels of coarse cell (1, 0): inside the object, away from its border
    refined = refine_with_self_attention(blob, region_affinity(regions), affinity_grid=(4, 4))
    assert refined.shape == (8, 8)
    expected = regions.repeat_interleave(2, 0).repeat_interleave(2, 1) == 1  # nearest-upsampled object
    assert torch.equal(refined >= 0.5, expected)


def test_factored_refinement_equals_the_resampled_affinity():
    a = random_affinity(16, seed=5)  # 4x4 grid
    m = torch.rand(8, 8, generator=torch.Generator().manual_seed(2))
    factored = refine_with_self_attention(m, a, iterations=2, affinity_grid=(4, 4))
    big = resample_affinity(a, (4, 4), (8, 8))
    direct = refine_with_self_attention(m, big, iterations=2)
    assert torch.allclose(factored, direct, atol=1e-5)


# --- resampling the affinity stays row-stochastic ------------------------------------------------------------

def test_axis_resampling_hand_values():
    w, d = axis_resampling(2, 4)  # linear, align_corners=False
    assert torch.allclose(w, torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(d, torch.tensor([[0.5, 0.375, 0.125, 0.0], [0.0, 0.125, 0.375, 0.5]], dtype=torch.float64))
    w, d = axis_resampling(4, 2)  # box average down, children summed on the key axis
    assert torch.allclose(w, torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64))
    assert torch.allclose(d, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64))


def test_upsampled_identity_affinity_hand_values():
    # grid (1, 2) -> (1, 4): W I D with W, D of test_axis_resampling_hand_values
    out = resample_affinity(torch.eye(2), (1, 2), (1, 4))
    expected = torch.tensor([[0.5, 0.375, 0.125, 0.0],
                             [0.375, 0.3125, 0.1875, 0.125],
                             [0.125, 0.1875, 0.3125, 0.375],
                             [0.0, 0.125, 0.375, 0.5]])
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("grid,target", [((2, 3), (4, 5)), ((4, 4), (8, 8)), ((6, 6), (3, 3)), ((4, 4), (3, 5))])
def test_resample_affinity_is_the_kron_operator_and_row_stochastic(grid, target):
    a = random_affinity(grid[0] * grid[1], seed=7)
    wh, dh = axis_resampling(grid[0], target[0])
    ww, dw = axis_resampling(grid[1], target[1])
    ref = torch.kron(wh, ww) @ a.double() @ torch.kron(dh, dw)
    out = resample_affinity(a, grid, target)
    assert out.shape == (target[0] * target[1],) * 2
    assert torch.allclose(out, ref.float(), atol=1e-6)
    assert torch.allclose(out.sum(dim=1), torch.ones(out.shape[0]), atol=1e-5)
    assert float(out.min()) >= 0.0


def test_fuse_self_attention_weighted_mean_on_the_finest_grid():
    coarse, fine = random_affinity(16, seed=1), random_affinity(64, seed=2)
    fused = fuse_self_attention([coarse, fine], weights=[1.0, 3.0])
    assert fused.shape == (64, 64)
    expected = 0.25 * resample_affinity(coarse, (4, 4), (8, 8)) + 0.75 * fine
    assert torch.allclose(fused, expected, atol=1e-6)
    check_affinity(fused)
    assert torch.allclose(fuse_self_attention([fine, fine]), fine, atol=1e-6)
    down = fuse_self_attention([coarse, fine], target_grid=(4, 4))
    assert down.shape == (16, 16)
    check_affinity(down)


def test_check_affinity_rejects_logits_and_unnormalised_rows():
    with pytest.raises(InputError, match="negative"):
        check_affinity(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 5)
    with pytest.raises(InputError, match="rows must sum to 1"):
        check_affinity(torch.full((4, 4), 0.5))
    with pytest.raises(InputError, match="square"):
        check_affinity(torch.ones(2, 3) / 3)
    with pytest.raises(InputError, match="square grid"):
        refine_with_self_attention(torch.rand(2, 3), torch.eye(6))


# --- cross-attention fusion ---------------------------------------------------------------------------------

def test_fuse_cross_attention_hand_values():
    m1 = torch.zeros(4, 4)
    m1[0, 0] = 4.0  # factor 1: normalised -> 1 at (0, 0), 0 elsewhere
    m2 = torch.tensor([[0.0, 2.0], [0.0, 2.0]])  # factor 2: bilinear to 4x4 -> columns 0, .25, .75, 1
    m2_up = torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(4, 4)
    m1_n = (m1 == 4).float()
    fused = fuse_cross_attention({1: m1, 2: m2})  # default weights 0.1 and 0.1: plain mean
    assert torch.allclose(fused, (m1_n + m2_up) / 2, atol=1e-6)
    assert float(fused[0, 0]) == pytest.approx(0.5) and float(fused[1, 1]) == pytest.approx(0.125)
    weighted = fuse_cross_attention({1: m1, 2: m2}, weights={1: 3.0, 2: 1.0})
    assert torch.allclose(weighted, (3 * m1_n + m2_up) / 4, atol=1e-6)


def test_fuse_cross_attention_defaults_and_errors():
    assert DIFFSEGMENTER_FACTOR_WEIGHTS == {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1}
    g = torch.Generator().manual_seed(0)
    maps = {f: torch.rand(16 // f, 16 // f, generator=g) for f in (1, 2, 4, 8)}
    fused = fuse_cross_attention(maps)
    assert fused.shape == (16, 16) and 0.0 <= float(fused.min()) and float(fused.max()) <= 1.0
    with pytest.raises(InputError, match="no weight for factor"):
        fuse_cross_attention({16: torch.rand(2, 2)})
    with pytest.raises(InputError, match="no map"):
        fuse_cross_attention({})


# --- end to end on the tiny UNet ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    sd = tiny_sd(seed=0)
    rgb = (np.random.RandomState(0).rand(40, 56, 3) * 255).astype(np.uint8)
    prep = prepare_image(rgb, size=128)  # latent 16x16
    return sd, prep, encode_image(sd, prep.pixels, seed=0)


def test_self_attention_capture_does_not_change_run_capture(tiny):
    sd, _, latent = tiny
    plain = run_capture(sd, latent, "a cat, ", capture_kind="probs", capture_factor=None, max_steps=1)
    with capture_self_attention(sd.unet, cond_or_uncond=[1, 0], per_layer=False) as store:
        captured = run_capture(sd, latent, "a cat, ", capture_kind="probs", capture_factor=None, max_steps=1)
    assert plain.layers == captured.layers
    assert torch.allclose(plain.cond, captured.cond, atol=1e-6)
    assert {a.factor for a in store.affinities(COND)} == {1, 2, 4, 8}


def test_factor_token_maps_groups_layers_by_factor(tiny):
    sd, _, latent = tiny
    from refdiff.capture import token_map
    from refdiff.diffusion import cross_attention_layers

    maps = run_capture(sd, latent, "a cat, ", capture_kind="probs", capture_factor=None, max_steps=1)
    factors = {layer.name: layer.factor for layer in cross_attention_layers(sd.unet)}
    by_factor = factor_token_maps(maps, factors, 2)
    assert sorted(by_factor) == [1, 2, 4, 8]
    idx4 = [i for i, n in enumerate(maps.layers) if factors[n.split("/")[1]] == 4]
    assert torch.allclose(by_factor[4], token_map(maps.combined()[idx4], 2))
    with pytest.raises(InputError, match="no known downsampling factor"):
        factor_token_maps(maps, {}, 2)


def test_diffsegmenter_map_end_to_end(tiny):
    sd, prep, latent = tiny
    out = diffsegmenter_map(sd, latent, "a cat, ", 2, max_steps=1)
    assert out.shape == (16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert float(out.min()) == pytest.approx(0.0, abs=1e-6) and float(out.max()) == pytest.approx(1.0, abs=1e-4)
    again = diffsegmenter_map(sd, latent, "a cat, ", 2, max_steps=1)
    assert torch.equal(out, again)  # seeded
    coarse = diffsegmenter_map(sd, latent, "a cat, ", 2, max_steps=1, max_tokens=64)  # 8x8 self-attention
    assert coarse.shape == (16, 16) and not torch.allclose(coarse, out, atol=1e-4)
    from refdiff.maps import generative_map
    c = generative_map(out, prep, mode="bilinear")
    assert c.shape == (40, 56)


def test_diffsegmenter_default_level_is_the_finest_the_unet_has(tiny):
    """A UNet without attention at factor 1 (here: at factors 2 and 4, and 8 in the mid block): the default
    self-attention level is its finest one within max_tokens (2), not factor 1, which it lacks."""
    from refdiff.testing.sd import TINY_UNET_CONFIG, unet_from_config

    sd, _, latent = tiny
    config = {**TINY_UNET_CONFIG,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        coarse = dataclasses.replace(sd, unet=unet_from_config(config))
    out = diffsegmenter_map(coarse, latent, "a cat, ", 2, max_steps=1)
    assert torch.equal(out, diffsegmenter_map(coarse, latent, "a cat, ", 2, max_steps=1, self_factor=2))
    assert not torch.allclose(out, diffsegmenter_map(coarse, latent, "a cat, ", 2, max_steps=1, self_factor=4),
                              atol=1e-4)
    with pytest.raises(InputError, match="at factor 1"):
        diffsegmenter_map(coarse, latent, "a cat, ", 2, max_steps=1, self_factor=1)
