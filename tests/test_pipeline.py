"""End to end on tiny random models: every variant and both presets run and return masks of the image's size."""
from __future__ import annotations

import numpy as np
import pytest

from refdiff.config import get_variant
from refdiff.errors import InputError
from refdiff.pipeline import RefDiff

from tiny_runs import FAST


def make(models, preset="official", **overrides):
    sd, sam, clip = models
    return RefDiff(sd=sd, sam=sam, clip=clip, preset=preset, **{**FAST, **overrides})


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_all_variants_run_with_masks_of_the_image_size(models, image, preset):
    model = make(models, preset)
    results = model.segment_variants(image, "the red box on the left", ["full", "G", "GS", "DS", "sam-clip"])
    assert set(results) == {"full", "G", "GS", "DS", "sam-clip"}
    for name, r in results.items():
        assert r.mask.shape == (45, 67) and r.mask.dtype == bool, name
        assert r.proposals.ndim == 3 and r.proposals.shape[1:] == (45, 67), name
        n = len(r.proposals)
        assert r.scores["fused"].shape == (n,), name
        if n:
            assert 0 <= r.index < n and (r.mask == r.proposals[r.index]).all(), name
            assert r.index == int(np.argmax(r.scores["fused"])), name
        else:
            assert r.index == -1 and not r.mask.any(), name
        assert r.root_token == "box" and r.direction == ("left",) and r.preset == preset
        v = get_variant(name)
        assert (r.scores["generative"] is not None) == (v.generative and n > 0), name
        assert (r.scores["discriminative"] is not None) == (v.discriminative and n > 0), name
        if v.needs_diffusion:
            assert r.attention.shape == (45, 67)
            assert r.attention.min() >= 0 and r.attention.max() <= 1
        else:
            assert r.attention is None
    assert len(results["GS"].proposals) > 0, "random SAM with zero thresholds must propose masks"
    # The shared stages ran once: the same SAM proposals and the same generative map for every variant.
    assert (results["GS"].proposals == results["full"].proposals).all()
    np.testing.assert_array_equal(results["G"].attention, results["full"].attention)
    full = results["full"].scores
    np.testing.assert_allclose(full["generative"], results["GS"].scores["generative"])
    np.testing.assert_allclose(full["discriminative"], results["DS"].scores["discriminative"])
    p = model.preset
    np.testing.assert_allclose(full["fused"], p.gen_weight * full["generative"] + p.disc_weight * full["discriminative"],
                               rtol=1e-5, atol=1e-6)


def test_seeded_runs_repeat_and_cache_is_reused(models, image):
    model = make(models)
    calls = []
    hook = models[0].unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        a = model(image, "the blue box", variant="G", seed=3)
        first = len(calls)
        b = model(image, "the blue box", variant="G", seed=3)
    finally:
        hook.remove()
    np.testing.assert_array_equal(a.attention, b.attention)
    assert first == 2 and len(calls) == first  # second call: the captured attention came from the cache
    fresh = make(models)(image, "the blue box", variant="G", seed=3)
    np.testing.assert_array_equal(a.attention, fresh.attention)
    other = make(models)(image, "the blue box", variant="G", seed=4)
    assert not np.array_equal(a.attention, other.attention)


def test_strict_filter_gives_an_empty_mask_of_the_right_size(models, image):
    model = make(models, sam_min_area=10**9)  # every SAM mask is filtered out
    r = model(image, "the blue box", variant="full")
    assert r.proposals.shape == (0, 45, 67) and r.index == -1 and r.mask.shape == (45, 67) and not r.mask.any()


def test_bad_inputs_raise_clear_errors(models, image):
    model = make(models)
    with pytest.raises(InputError, match="empty"):
        model(image, "   ")
    with pytest.raises(InputError, match="variant"):
        model(image, "the box", variant="XL")
    with pytest.raises(InputError, match="NaN"):
        model(np.full((8, 8, 3), np.nan, np.float32), "the box")
    with pytest.raises(InputError, match="no Stable Diffusion"):
        RefDiff(sam=models[1], clip=models[2], **FAST)(image, "the box", variant="G")


def test_ds_variant_needs_no_diffusion_model(models, image):
    r = RefDiff(sam=models[1], clip=models[2], **FAST)(image, "the blue box on the right", variant="DS")
    assert r.attention is None and r.mask.shape == (45, 67)


@pytest.mark.parametrize("shape", [(8, 8, 3), (9, 120, 3), (2, 2)])
def test_tiny_and_elongated_images(models, shape):
    rgb = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
    r = make(models)(rgb, "the thing at the top", variant="full")
    assert r.mask.shape == shape[:2]


def test_refined_map_and_cluster_variants(models, image):
    """The DiffSegmenter-refined G and the feature-cluster proposals run through the same API."""
    model = make(models)
    results = model.segment_variants(image, "the red box on the left", ["G", "G-refine", "cluster"], seed=1)
    refined, plain, cluster = results["G-refine"], results["G"], results["cluster"]
    for r in results.values():
        assert r.mask.shape == (45, 67) and r.attention.shape == (45, 67)
    assert not np.allclose(refined.attention, plain.attention)  # a different map: self-attention refined
    assert refined.attention.min() >= 0 and refined.attention.max() <= 1
    assert len(cluster.proposals) > 0 and cluster.scores["discriminative"] is not None
    # cluster proposals partition (part of) the frame: no pixel belongs to two proposals
    assert cluster.proposals.sum(0).max() <= 1
    # the cluster variant scores with the plain map, like full
    np.testing.assert_array_equal(cluster.attention, plain.attention)
    assert model(image, "the red box on the left", variant="diffsegmenter", seed=1).variant == "G-refine"


def test_single_conditional_step_speed_option_changes_the_map(models, image):
    """use_cfg=False, max_steps=1: one UNet call on the conditional prompt only; a different (cheaper) map."""
    batches = []
    hook = models[0].unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        full = make(models)(image, "the blue box", variant="G")
        n_full = list(batches)
        fast = make(models, use_cfg=False, max_steps=1)(image, "the blue box", variant="G")
    finally:
        hook.remove()
    assert n_full == [2, 2] and batches[len(n_full):] == [1]  # UNet calls and their batch sizes
    assert fast.mask.shape == full.mask.shape
    assert not np.allclose(fast.attention, full.attention)
