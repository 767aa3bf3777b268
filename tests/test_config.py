"""The presets carry docs/METHOD.md's constants, and variants and overrides are validated."""
from __future__ import annotations

import pytest

from refdiff.config import OFFICIAL, PAPER, get_preset, get_variant, sam_generator_kwargs
from refdiff.errors import InputError


def test_official_preset_matches_the_released_code():
    p = OFFICIAL
    assert (p.image_size, p.ddim_steps, p.strength, p.guidance_scale, p.prompt_suffix) == (1024, 20, 0.1, 9.0, ", ")
    assert p.capture_kind == "logits" and p.capture_factor == 4 and p.use_cfg
    assert p.root_rule == "root_or_subj" and p.map_resize == "lanczos"
    assert (p.sam_keep_largest, p.sam_min_area) == (10, 10000)
    assert p.sam_min_area_reference == 640 * 480  # 10000 px is ~3 % of a COCO-sized image, at any image size
    assert p.clip_layer == "final" and p.bias_branch == "crop"
    assert (p.crop_weight, p.mask_weight, p.crop_root_weight, p.mask_root_weight) == (0.7, 0.3, 0.0, 0.5)
    assert p.normalize_text  # cos(., 0.5 r_sent + 0.5 r_root)
    assert (p.gen_weight, p.disc_weight) == (0.05, 1.0)


def test_paper_preset_matches_the_equations():
    p = PAPER
    assert p.capture_kind == "probs" and p.root_rule == "root" and p.map_resize == "bilinear"
    assert p.sam_keep_largest is None and p.sam_min_area == 0
    assert p.clip_layer == "penultimate" and p.bias_branch == "masked"
    # v = beta f_M + (1 - beta) f_crop, r = mean(r_sent, r_root), beta = 0.3
    assert (p.crop_weight, p.mask_weight, p.crop_root_weight, p.mask_root_weight) == (0.7, 0.3, 0.5, 0.5)
    assert not p.normalize_text  # v_i . r
    # s = alpha s_G + (1 - alpha) s_D, alpha = 0.1
    assert (p.gen_weight, p.disc_weight) == (0.1, 0.9)


def test_thresholds_and_sam_defaults():
    assert OFFICIAL.thresholds[0] == 0.05 and OFFICIAL.thresholds[-1] == 0.95 and len(OFFICIAL.thresholds) == 19
    kw = sam_generator_kwargs(OFFICIAL)
    assert kw == dict(points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88, stability_score_thresh=0.95,
                      box_nms_thresh=0.7, crop_n_layers=0, min_mask_region_area=0)


def test_lookup_and_overrides():
    assert get_preset("Paper") is PAPER and get_preset(OFFICIAL) is OFFICIAL
    assert get_preset("official").with_(image_size=512).image_size == 512
    with pytest.raises(InputError, match="unknown preset"):
        get_preset("fastest")
    with pytest.raises(InputError, match="image_sise"):
        OFFICIAL.with_(image_sise=512)
    assert get_variant("ds").name == "DS" and get_variant("SAM-CLIP").sam_clip
    assert get_variant("G").proposals == "threshold" and get_variant("G").needs_diffusion
    assert not get_variant("DS").needs_diffusion
    with pytest.raises(InputError, match="unknown variant"):
        get_variant("X")


def test_sibling_method_defaults_match_their_modules():
    from refdiff import capture, clusters, refine

    p = OFFICIAL
    assert dict(p.refine_factor_weights) == refine.DIFFSEGMENTER_FACTOR_WEIGHTS
    assert p.refine_iterations == refine.DIFFSEGMENTER_ITERATIONS
    assert p.refine_max_tokens == capture.SELF_ATTENTION_MAX_TOKENS
    assert (p.cluster_k, p.cluster_feature_factor, p.cluster_factor, p.cluster_timestep) == (
        clusters.FREESEG_CLUSTERS, clusters.FREESEG_FEATURE_FACTOR, clusters.FREESEG_CLUSTER_FACTOR,
        clusters.FREESEG_TIMESTEP)
    assert get_variant("G-refine").refine and get_variant("cluster").proposals == "cluster"
    assert get_variant("cluster").needs_diffusion and get_variant("diffsegmenter").name == "G-refine"
