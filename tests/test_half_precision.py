"""bf16 and fp16 end to end on tiny random models loaded the way a user's are (RefDiff.from_pretrained with
dtype=...), compared with the same models in fp32.

Tolerances are in units of the dtype's unit roundoff u (bf16 2**-8, fp16 2**-11):

- generative map c (min-max normalised, in [0, 1]): |c_half - c_fp32| <= 32 u, or 64 u for G-refine (its map
  also multiplies by a captured self-attention matrix). Measured on these models: at most 13 u (25 u
  refined) over 3 seeds x 2 sentences x 2 presets; the bound leaves a factor of 2.5. At image_size 64 the
  factor-4 grid of the tiny UNet is 2 x 2 and its GroupNorms normalise over 8 values, which magnifies rounding
  to 0.4 of the map's range; hence image_size 128 here (a 4 x 4 grid; SD 1.5 at 512 has 16 x 16).
- discriminative score (a cosine): |s_D,half - s_D,fp32| <= 4 u (measured at most 1.03 u).
- generative score (Eq. 9, a difference of two means of c over the same mask): |s_G,half - s_G,fp32| <=
  2 max|c_half - c_fp32|, exactly, when the proposals are the same.
- SAM's mask-decoder logits with half weights: within 16 u of the largest logit (measured at most 7 u).

A selection is "tied" when the fp32 scores of two proposals are closer than the sum of their score bounds;
otherwise the half run must select the fp32 run's proposal, and its mask must be the fp32 mask (for threshold
proposals: up to pixels where the fp32 map lies within max|c_half - c_fp32| of the chosen threshold). In the
comparison SAM runs (fp32, as loaded) but the pipeline scores six planted boxes of different places and sizes
instead of its masks (two tiny random-weight masks whose scores are all but equal), so that scores differ
enough for most selections to be decided. Random-weight scores still differ by only ~1-14 bf16 roundoffs, so
in bf16 most selections are ties (checked only for their bounds); fp16 decides most of them. The bounds and
comparisons live in refdiff.testing.precision (the ComfyUI tests use them too).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import refdiff.clip as clip_module
import refdiff.proposals as proposals_module
from refdiff.config import Variant, get_variant
from refdiff.diffusion import encode_latent
from refdiff.pipeline import RefDiff, Result
from refdiff.proposals import make_mask_generator
from refdiff.scoring import fusion_weights
from refdiff.testing.clip import TINY_CLIP_CONFIG, tiny_clip_model
from refdiff.testing.precision import (MAP_TOL_U, REFINED_MAP_TOL_U, S_D_TOL_U, SAM_LOGIT_TOL_U, UNIT_ROUNDOFF,
                                       compare_same_proposals, compare_threshold_choice)
from refdiff.testing.sam import tiny_sam, tiny_sam_state_dict
from refdiff.testing.sd import tiny_sd, tiny_sd_pipeline

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
ALL = {"fp32": torch.float32, **HALF}
VARIANTS = ("full", "G", "GS", "DS", "sam-clip", "G-refine", "cluster")
SAM_VARIANTS = ("full", "GS", "DS", "sam-clip")
MIN_DECIDED = {"bf16": 1, "fp16": 4}  # of the 7 variants (measured: bf16 1 per preset, fp16 4 and 6)
PLANTED_BOXES = ((5, 30, 4, 25), (10, 40, 40, 60), (0, 45, 0, 33), (0, 20, 0, 67), (15, 30, 25, 45), (30, 45, 10, 60))
TEXT = "the red box on the left"
SETTINGS = dict(image_size=128, sam_points_per_side=4, sam_points_per_batch=16, sam_pred_iou_thresh=0.0,
                sam_stability_score_thresh=0.0, sam_min_area=0)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    """The tiny models written as a user has them: a diffusers folder, a CLIP .safetensors, a SAM .pth."""
    root = tmp_path_factory.mktemp("weights")
    tiny_sd_pipeline(0).save_pretrained(root / "sd")
    state = {k: v.detach().clone().contiguous() for k, v in tiny_clip_model(0).state_dict().items()}
    save_file(state, str(root / "clip.safetensors"))
    torch.save(tiny_sam_state_dict(0), root / "sam.pth")
    return {"sd": root / "sd", "clip": root / "clip.safetensors", "sam": root / "sam.pth"}


def load_models(files: dict[str, Path], dtype: str, **kwargs: Any) -> RefDiff:
    """RefDiff.from_pretrained on the tiny files (load_clip told the tiny architecture), models loaded now."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clip_module, "load_clip", functools.partial(clip_module.load_clip, model_cfg=TINY_CLIP_CONFIG))
        model = RefDiff.from_pretrained(sd=str(files["sd"]), sam=str(files["sam"]), clip=str(files["clip"]),
                                        dtype=dtype, device="cpu", **kwargs)
        model.sd, model.sam, model.clip  # noqa: B018 - load while the patch is active
    return model


@pytest.fixture(scope="module")
def loaded(weight_files):
    """dtype name -> a RefDiff whose models were loaded by from_pretrained in that dtype (cached)."""
    return functools.lru_cache(maxsize=None)(lambda dtype: load_models(weight_files, dtype))


def planted_proposals(height: int, width: int) -> torch.Tensor:
    """bool [6, H, W]: the PLANTED_BOXES (y0, y1, x0, x1): the red box, the blue box, halves, a band, a centre box."""
    masks = torch.zeros(len(PLANTED_BOXES), height, width, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(PLANTED_BOXES):
        masks[i, y0:y1, x0:x1] = True
    return masks


@pytest.fixture(scope="module")
def runs(loaded, image):
    """(dtype name, preset) -> every variant's Result on the test image, SAM's masks replaced by the planted
    proposals (cached)."""
    original = proposals_module.sam_proposals
    planted = planted_proposals(*image.shape[:2])

    def sam_then_planted(generator: Any, rgb: np.ndarray) -> torch.Tensor:
        original(generator, rgb)
        return planted.clone()

    @functools.lru_cache(maxsize=None)
    def run(dtype: str, preset: str) -> dict[str, Result]:
        models = loaded(dtype)
        model = RefDiff(sd=models.sd, sam=models.sam, clip=models.clip, preset=preset, **SETTINGS)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(proposals_module, "sam_proposals", sam_then_planted)
            return model.segment_variants(image, TEXT, VARIANTS, seed=0)
    return run


# --------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", list(ALL))
def test_from_pretrained_loads_sd_and_clip_in_the_dtype_and_sam_in_float32(loaded, name):
    model = loaded(name)
    dtype = ALL[name]
    for part in (model.sd.unet, model.sd.vae, model.sd.text_encoder):
        assert {p.dtype for p in part.parameters()} == {dtype}
    assert model.sd.dtype == dtype and model.clip.dtype == dtype
    assert {p.dtype for p in model.clip.model.parameters()} == {dtype}
    assert {p.dtype for p in model.sam.parameters()} == {torch.float32}  # load_sam always loads float32


# ------------------------------------------------------------------------------------------ finite outputs
def _check_result(r: Result, v: Variant, shape: tuple[int, int], planted: bool = False) -> None:
    assert r.mask.shape == shape and r.mask.dtype == bool, v.name
    assert r.proposals.dtype == bool and r.proposals.shape[1:] == shape, v.name
    n = len(r.proposals)
    assert n > 0, f"{v.name}: the test needs proposals"
    if planted and v.proposals == "sam":
        np.testing.assert_array_equal(r.proposals, planted_proposals(*shape).numpy())
    for key, s in r.scores.items():
        if s is None:
            continue
        assert isinstance(s, np.ndarray) and s.dtype == np.float32 and s.shape == (n,), (v.name, key)
        assert np.isfinite(s).all(), (v.name, key)
    assert (r.scores["generative"] is not None) == v.generative and (r.scores["discriminative"] is not None) == \
        v.discriminative, v.name
    assert 0 <= r.index < n and (r.mask == r.proposals[r.index]).all(), v.name
    if v.needs_diffusion:
        a = r.attention
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == shape, v.name
        assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0, v.name
    else:
        assert r.attention is None


@pytest.mark.parametrize("preset", ["official", "paper"])
@pytest.mark.parametrize("name", list(HALF))
def test_every_variant_runs_with_finite_float32_outputs(runs, image, name, preset):
    results = runs(name, preset)
    assert set(results) == set(VARIANTS)
    for v in VARIANTS:
        _check_result(results[v], get_variant(v), image.shape[:2], planted=True)


@pytest.mark.parametrize("name", list(HALF))
def test_offloaded_half_models_give_the_same_result(weight_files, loaded, image, name):
    """from_pretrained(offload=True) loads on the CPU in the dtype asked for and computes the same result."""
    offloaded = load_models(weight_files, name, offload=True, **SETTINGS)
    assert offloaded.offload and offloaded.sd.dtype == HALF[name] and offloaded.clip.dtype == HALF[name]
    models = loaded(name)
    plain = RefDiff(sd=models.sd, sam=models.sam, clip=models.clip, **SETTINGS)
    a, b = offloaded(image, TEXT, variant="full"), plain(image, TEXT, variant="full")
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.attention, b.attention)
    np.testing.assert_array_equal(a.scores["fused"], b.scores["fused"])


# ----------------------------------------------------------------------------------------- against fp32
@pytest.mark.parametrize("preset", ["official", "paper"])
@pytest.mark.parametrize("name", list(HALF))
def test_half_precision_selects_the_fp32_proposal_unless_tied(runs, name, preset):
    ref_runs, half_runs = runs("fp32", preset), runs(name, preset)
    u = UNIT_ROUNDOFF[HALF[name]]
    decided = []
    for name_v in VARIANTS:
        v = get_variant(name_v)
        ref, half = ref_runs[name_v], half_runs[name_v]
        p = RefDiff(preset=preset, **SETTINGS).preset
        map_dev = 0.0
        if v.needs_diffusion:
            map_dev = float(np.abs(half.attention - ref.attention).max())
            tol = (REFINED_MAP_TOL_U if v.refine else MAP_TOL_U) * u
            assert map_dev <= tol, (name_v, map_dev / u)
        if v.proposals == "threshold":
            ok = compare_threshold_choice(ref, half, p.thresholds, map_dev, name=name_v)
        else:
            weights = fusion_weights(p, v.generative and v.discriminative)
            ok = compare_same_proposals(ref, half, weights, map_dev, S_D_TOL_U * u, name=name_v)
        if ok:
            decided.append(name_v)
    # the comparison is not vacuous: selections clear enough to be checked exactly
    assert len(decided) >= MIN_DECIDED[name], decided


# ------------------------------------------------------------------------------------------------- SAM
@pytest.mark.parametrize("name", list(HALF))
def test_half_sam_mask_decoder_logits_match_fp32(image, name):
    """A SAM cast to half (as a caller may pass one) runs its networks under autocast: logits within 16 u."""
    dtype, u = HALF[name], UNIT_ROUNDOFF[HALF[name]]
    points = np.array([[10.0, 10.0], [30.0, 20.0], [50.0, 40.0]])
    out = {}
    for dt in (torch.float32, dtype):
        generator = make_mask_generator(tiny_sam(0).to(dt), points_per_side=4)
        with generator._network_precision():
            generator.predictor.set_image(image)
            out[dt] = generator._decode(points, image.shape[:2])
    (low32, iou32), (low, iou) = out[torch.float32], out[dtype]
    assert low.dtype == torch.float32 and iou.dtype == torch.float32  # post-processing runs in float32
    assert float((low - low32).abs().max() / low32.abs().max()) <= SAM_LOGIT_TOL_U * u
    assert float((iou - iou32).abs().max() / iou32.abs().max()) <= SAM_LOGIT_TOL_U * u


@pytest.mark.parametrize("name", list(HALF))
def test_every_sam_variant_runs_with_a_half_sam(loaded, image, name):
    models = loaded(name)
    sam = tiny_sam(0).to(HALF[name])
    results = RefDiff(sd=models.sd, sam=sam, clip=models.clip, **SETTINGS).segment_variants(image, TEXT, SAM_VARIANTS)
    for v in SAM_VARIANTS:
        _check_result(results[v], get_variant(v), image.shape[:2])


# ------------------------------------------------------------------------------------------------- VAE
def test_fp16_vae_overflow_is_encoded_again_in_float32():
    """A planted overflow: conv_in's weights times 1e5 push the first activations past fp16's 65504, which
    float32 handles (the GroupNorms that follow rescale them). The fp16 VAE then gives the latent of the same
    weights in float32, and is left unchanged."""
    vae = tiny_sd(dtype=torch.float16).vae
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        plain = vae.encode(pixels.half()).latent_dist.mean
    assert not torch.isfinite(plain).all()  # the overflow is real
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    reference = encode_latent(_float_copy(before), pixels, "mean")
    latent = encode_latent(vae, pixels, "mean")
    assert latent.dtype == torch.float32 and torch.isfinite(latent).all()
    torch.testing.assert_close(latent, reference, rtol=0, atol=0)
    after = vae.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())


def _float_copy(state: dict[str, torch.Tensor]) -> Any:
    """The tiny VAE with ``state``'s (fp16) weights held in float32."""
    vae = tiny_sd().vae
    vae.load_state_dict({k: v.float() for k, v in state.items()})
    return vae
