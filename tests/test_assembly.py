"""One assembly: ``RefDiff`` equals the plain chain of stage functions the node graph runs, for both presets and
every variant, and the per-preset discriminative score equals a hand computation of Eq. 6, 7 and 10.

The chain below is what the ComfyUI graph does stage by stage (prepare -> encode -> schedule loop with capture
-> token map -> generative map -> proposals -> s_G -> s_D -> fusion and selection), written with the library's
stage functions on the diffusers backend, without RefDiff's caches or its per-variant sharing.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refdiff.capture import LayerSelector, token_map
from refdiff.config import OFFICIAL, PAPER, get_preset, get_variant, sam_generator_kwargs
from refdiff.diffusion import capture_processors, encode_image, encode_prompts, unet_predictor
from refdiff.discriminative import positional_bias, proposal_scores
from refdiff.errors import InputError
from refdiff.image import prepare_image
from refdiff.maps import generative_map
from refdiff.pipeline import RefDiff
from refdiff.proposals import filter_proposals, make_mask_generator, sam_proposals, threshold_proposals
from refdiff.schedule import ddim_loop, injection_noise, injection_plan
from refdiff.scoring import fuse_and_select, generative_scores
from refdiff.stores import AttentionStore
from refdiff.text import parse_text, root_token_position

from tiny_runs import FAST
TEXT = "the red box on the left"
SEED = 2
# Both sides run the same float32 operations on the CPU; the tolerance only allows for summation order.
TOL = dict(rtol=1e-5, atol=1e-6)
VARIANTS = ["full", "G", "GS", "DS", "sam-clip", "G-refine", "cluster"]


@pytest.fixture(scope="module")
def pipelines(models):
    """One RefDiff per preset, shared by the variants (its caches are part of what is compared)."""
    sd, sam, clip = models
    return {name: RefDiff(sd=sd, sam=sam, clip=clip, preset=name, **FAST) for name in ("official", "paper")}


def generative_map_chain(sd, rgb, parsed, p, seed, refine):
    """Eq. 3-5 stage by stage: prepare, encode, schedule loop with capture, token map, map at the frame."""
    prompt = parsed.text + p.prompt_suffix
    position = root_token_position(parsed, sd.tokenizer, prompt_suffix=p.prompt_suffix)
    prep = prepare_image(rgb, p.image_size, p.resize_filter)
    latent = encode_image(sd, prep.pixels, latent_from=p.latent_from, seed=seed)
    if refine:
        from refdiff.refine import diffsegmenter_map

        small = diffsegmenter_map(sd, latent, prompt, position, strength=p.strength, ddim_steps=p.ddim_steps,
                                  num_train_timesteps=p.num_train_timesteps, use_cfg=p.use_cfg,
                                  guidance_scale=p.guidance_scale, capture_kind=p.capture_kind,
                                  capture_blocks=p.capture_blocks, seed=seed, max_steps=p.max_steps,
                                  factor_weights=dict(p.refine_factor_weights), max_tokens=p.refine_max_tokens,
                                  self_factor=p.refine_self_factor, iterations=p.refine_iterations,
                                  eps=p.layer_norm_eps)
    else:
        plan = injection_plan(p.strength, p.ddim_steps, p.num_train_timesteps, p.max_steps)
        store = AttentionStore(kind=p.capture_kind)
        predict = unet_predictor(sd, encode_prompts(sd, prompt, p.use_cfg), p.use_cfg, p.guidance_scale)
        selector = LayerSelector(p.capture_factor, tuple(p.capture_blocks))
        with torch.no_grad(), capture_processors(sd.unet, selector, store, p.capture_kind,
                                                 [1, 0] if p.use_cfg else [0]):
            ddim_loop(latent, injection_noise(latent.shape, seed), sd.alphas_cumprod, plan, predict,
                      sd.prediction_type, device=sd.device, before_step=lambda i: setattr(store, "step", i))
        small = token_map(store.maps().combined(p.guidance_scale), position, eps=p.layer_norm_eps)
    return generative_map(small, prep, mode=p.map_resize, eps=p.map_eps), prep, latent


def chain(models, rgb, text, p, variant, seed):
    """(masks, s_G, s_D, choice) of one variant, stage function by stage function."""
    sd, sam, clip = models
    v = get_variant(variant)
    parsed = parse_text(text, root_rule=p.root_rule)
    c = prep = latent = None
    if v.needs_diffusion:
        c, prep, latent = generative_map_chain(sd, rgb, parsed, p, seed, refine=v.refine)
    if v.proposals == "threshold":
        masks = threshold_proposals(c, p.thresholds)
    elif v.proposals == "sam":
        raw = sam_proposals(make_mask_generator(sam, **sam_generator_kwargs(p)), rgb)
        masks, _ = filter_proposals(raw, keep_largest=p.sam_keep_largest, min_area=p.sam_min_area)
    else:
        from refdiff.clusters import feature_cluster_proposals

        masks = feature_cluster_proposals(
            sd, latent, "", prep, feature_factor=p.cluster_feature_factor, timestep=p.cluster_timestep,
            n_clusters=p.cluster_k, cluster_factor=p.cluster_factor, normalize=p.cluster_normalize,
            split_components=p.cluster_split, min_area=p.cluster_min_area, seed=seed)
    n = masks.shape[0]
    s_g = generative_scores(c, masks, eps=p.score_eps) if v.generative and n else None
    s_d = (proposal_scores(clip, rgb, masks, parsed.text, parsed.root, parsed.directions, p,
                           mode="sam-clip" if v.sam_clip else "ref-diff") if v.discriminative and n else None)
    return masks, s_g, s_d, fuse_and_select(masks, s_g, s_d, p)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_refdiff_equals_the_chain_of_stage_functions(models, image, pipelines, preset, variant):
    p = pipelines[preset].preset
    result = pipelines[preset](image, TEXT, variant=variant, seed=SEED)
    masks, s_g, s_d, choice = chain(models, image, TEXT, p, variant, SEED)
    np.testing.assert_array_equal(result.proposals, masks.numpy())
    v = get_variant(variant)
    if v.proposals != "threshold":
        assert masks.shape[0] > 0, "the planted settings must give proposals"
    for name, expected in (("generative", s_g), ("discriminative", s_d), ("fused", choice.fused)):
        got = result.scores[name]
        assert (got is None) == (expected is None), name
        if expected is not None:
            np.testing.assert_allclose(got, expected.numpy(), **TOL, err_msg=name)
    assert result.index == choice.index and result.top_k == choice.top_k
    np.testing.assert_array_equal(result.mask, choice.mask.numpy())
    if s_g is not None and s_d is not None:  # Eq. 1/2 with the preset's weights
        np.testing.assert_allclose(choice.fused.numpy(), p.gen_weight * s_g.numpy() + p.disc_weight * s_d.numpy(),
                                   **TOL)


# ------------------------------------------------------------------------------ discriminative, by hand
def _boxes(height: int, width: int) -> torch.Tensor:
    masks = torch.zeros(3, height, width, dtype=torch.bool)
    masks[0, 4:30, 3:26] = True  # left object
    masks[1, 8:42, 38:62] = True  # right object
    masks[2, 20:45, 10:67] = True  # a wide strip
    return masks


def test_paper_scores_follow_eq_10_with_the_plain_mean_text(models, image):
    """paper: v_i = beta f_M(x . P) + (1 - beta) f(x . M_i) at the penultimate layer, s_D = v_i . r with r the
    plain mean of r_sent and r_root (no renormalisation), P on the masked-attention branch only."""
    clip = models[2]
    p = PAPER
    h, w = image.shape[:2]
    masks = _boxes(h, w)
    img = torch.from_numpy(image)
    r_sent, r_root = clip.encode_text(["the red box on the left", "box"]).unbind(0)
    bias = positional_bias(("left",), h, w, extent=p.bias_extent)
    crop = clip.crop_features(img, masks, None, layer="penultimate")
    masked = clip.masked_features(img, masks, bias, layer="penultimate")
    r = 0.5 * r_sent + 0.5 * r_root
    expected = (0.3 * masked + 0.7 * crop) @ r
    got = proposal_scores(clip, image, masks, "the red box on the left", "box", ("left",), p)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the drifts this guards against: a renormalised text mix, or the final layer, give other scores
    renormalised = (0.3 * masked + 0.7 * crop) @ (r / r.norm())
    final = (0.3 * clip.masked_features(img, masks, bias, layer="final")
             + 0.7 * clip.crop_features(img, masks, None, layer="final")) @ r
    assert not torch.allclose(got, renormalised, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(got, final, rtol=1e-3, atol=1e-4)


def test_official_scores_put_the_bias_on_the_crop_branch(models, image):
    """official: 0.7 cos(f(x . P . M_i), r_sent) + 0.3 cos(f_M(x), (r_sent + r_root) / |.|), final layer."""
    clip = models[2]
    p = OFFICIAL
    h, w = image.shape[:2]
    masks = _boxes(h, w)
    img = torch.from_numpy(image)
    r_sent, r_root = clip.encode_text(["the box on the right", "box"]).unbind(0)
    bias = positional_bias(("right",), h, w, extent=p.bias_extent)
    mix = 0.5 * r_sent + 0.5 * r_root
    expected = (0.7 * clip.crop_features(img, masks, bias, layer="final") @ r_sent
                + 0.3 * clip.masked_features(img, masks, None, layer="final") @ (mix / mix.norm()))
    got = proposal_scores(clip, image, masks, "the box on the right", "box", ("right",), p)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    unbiased = proposal_scores(clip, image, masks, "the box on the right", "box", ("right",), p, use_bias=False)
    assert not torch.allclose(got, unbiased, rtol=1e-3, atol=1e-4)
    weighted = proposal_scores(clip, image, masks, "the box on the right", "box", ("right",), p,
                               crop_weight=1.0, mask_weight=0.0)
    torch.testing.assert_close(weighted, clip.crop_features(img, masks, bias, layer="final") @ r_sent,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_sam_clip_is_the_final_layer_crop_against_the_sentence(models, image, preset):
    """SAM-CLIP under either preset: crop branch only, FINAL layer (paper's own layer is penultimate), no
    positional bias, sentence feature only."""
    clip = models[2]
    h, w = image.shape[:2]
    masks = _boxes(h, w)
    img = torch.from_numpy(image)
    r_sent = clip.encode_text(["the red box on the left"])[0]
    expected = clip.crop_features(img, masks, None, layer="final") @ r_sent
    got = proposal_scores(clip, image, masks, "the red box on the left", "box", ("left",), get_preset(preset),
                          mode="sam-clip")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    penultimate = clip.crop_features(img, masks, None, layer="penultimate") @ r_sent
    assert not torch.allclose(got, penultimate, rtol=1e-3, atol=1e-4)


def test_feature_hook_sees_each_branch_once_and_its_result_is_used(models, image):
    """The caching hook gets (branch, layer, clues) per branch; what it returns is what gets scored."""
    clip = models[2]
    h, w = image.shape[:2]
    masks = _boxes(h, w)
    calls = []

    def features(branch, layer, clues, compute):
        calls.append((branch, layer, clues))
        return torch.zeros(masks.shape[0], clip.embed_dim) if branch == "masked" else compute()

    got = proposal_scores(clip, image, masks, "the box on the left", "box", ("left",), PAPER, features=features,
                          text_features=lambda texts: clip.encode_text(list(texts)))
    assert calls == [("crop", "penultimate", ()), ("masked", "penultimate", ("left",))]
    r_sent, r_root = clip.encode_text(["the box on the left", "box"]).unbind(0)
    crop = clip.crop_features(torch.from_numpy(image), masks, None, layer="penultimate")
    torch.testing.assert_close(got, 0.7 * crop @ (0.5 * r_sent + 0.5 * r_root), rtol=1e-5, atol=1e-6)
    assert proposal_scores(clip, image, masks[:0], "t", "t", (), PAPER).shape == (0,)
    with pytest.raises(InputError, match="mode"):
        proposal_scores(clip, image, masks, "t", "t", (), PAPER, mode="clip")
    with pytest.raises(InputError, match="resolution"):
        proposal_scores(clip, image, masks[:, :10], "t", "t", (), PAPER)
