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
in bf16 most selections are ties (checked only for their bounds); fp16 decides most of them.
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
from refdiff.config import Preset, Variant, get_variant
from refdiff.diffusion import encode_latent
from refdiff.pipeline import RefDiff, Result
from refdiff.proposals import make_mask_generator
from refdiff.testing.clip import TINY_CLIP_CONFIG, tiny_clip_model
from refdiff.testing.sam import tiny_sam, tiny_sam_state_dict
from refdiff.testing.sd import tiny_sd, tiny_sd_pipeline

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
ALL = {"fp32": torch.float32, **HALF}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
MAP_TOL_U = 32.0
REFINED_MAP_TOL_U = 64.0
S_D_TOL_U = 4.0
SAM_LOGIT_TOL_U = 16.0
SLACK = 1e-5  # float32 arithmetic of the scores themselves (and score_eps in Eq. 9's denominators)
VARIANTS = ("full", "G", "GS", "DS", "sam-clip", "G-refine", "cluster")
SAM_VARIANTS = ("full", "GS", "DS", "sam-clip")
MIN_DECIDED = {"bf16": 1, "fp16": 4}  # of the 7 variants (measured: bf16 1 per preset, fp16 4 and 6)
PLANTED_BOXES = ((5, 30, 4, 25), (10, 40, 40, 60), (0, 45, 0, 33), (0, 20, 0, 67), (15, 30, 25, 45), (30, 45, 10, 60))
TEXT = "the red box on the left"
SETTINGS = dict(image_size=128, sam_points_per_side=4, sam_points_per_batch=16, sam_pred_iou_thresh=0.0,
                sam_stability_score_thresh=0.0, sam_min_area=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    rgb = np.zeros((45, 67, 3), dtype=np.uint8)
    rgb[5:30, 4:25] = (200, 30, 30)
    rgb[10:40, 40:60] = (30, 30, 200)
    return rgb + rng.integers(0, 20, rgb.shape, dtype=np.uint8)


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
def _fused_weights(v: Variant, p: Preset) -> tuple[float, float]:
    both = v.generative and v.discriminative
    return (p.gen_weight if both else 1.0), (p.disc_weight if both else 1.0)


def _compare_same_proposals(ref: Result, half: Result, v: Variant, p: Preset, u: float, map_dev: float) -> bool:
    """SAM and cluster proposals: the same masks, scores within their bounds, the fp32 choice unless tied.
    Returns whether the fp32 choice was decided (not tied)."""
    np.testing.assert_array_equal(half.proposals, ref.proposals, err_msg=v.name)
    wg, wd = _fused_weights(v, p)
    bound = 0.0
    if v.generative:
        dev_g = np.abs(half.scores["generative"] - ref.scores["generative"]).max()
        assert dev_g <= 2 * map_dev + SLACK, (v.name, dev_g, map_dev)
        bound += wg * 2 * map_dev
    if v.discriminative:
        dev_d = np.abs(half.scores["discriminative"] - ref.scores["discriminative"]).max()
        assert dev_d <= S_D_TOL_U * u, (v.name, dev_d / u)
        bound += wd * S_D_TOL_U * u
    fused = ref.scores["fused"]
    assert np.abs(half.scores["fused"] - fused).max() <= bound + SLACK, v.name
    # the half run's choice is the fp32 best or tied with it
    assert fused[ref.index] - fused[half.index] <= 2 * bound + SLACK, v.name
    others = np.delete(fused, ref.index)
    decided = bool(len(others) == 0 or fused[ref.index] - others.max() > 2 * bound + SLACK)
    if decided:
        assert half.index == ref.index, v.name
        np.testing.assert_array_equal(half.mask, ref.mask, err_msg=v.name)
    return decided


def _threshold_bound(c: np.ndarray, mu: float, dev: float) -> float:
    """Bound on |s_G,half - s_G,fp32| of the threshold-mu proposal when the maps differ by at most ``dev``.

    Pixels within dev of mu ("band", d of them) may change side; the others ("core", n per side) stay. On each
    side a mean moves by at most dev (values) plus 2 d D / n (membership), D = the largest distance of a band
    value from the core's mean: adding x values to n changes a mean by x (mean_x - mean_core) / (n + x)."""
    inside, outside = c > mu + dev, c < mu - dev
    band = ~inside & ~outside
    d = int(band.sum())
    if not inside.any() or not outside.any():
        return float("inf")
    if d == 0:
        return 2 * dev
    spread = [float(np.abs(c[band] - c[core].mean()).max()) / int(core.sum()) for core in (inside, outside)]
    return 2 * dev + 2 * d * sum(spread)


def _thresholds_of(mask: np.ndarray, c: np.ndarray, thresholds: tuple[float, ...]) -> list[float]:
    """The thresholds mu whose proposal {c >= mu} is ``mask``."""
    return [mu for mu in thresholds if np.array_equal(c >= np.float32(mu), mask)]


def _compare_threshold_proposals(ref: Result, half: Result, v: Variant, p: Preset, map_dev: float) -> bool:
    """Threshold proposals (Eq. 8) of maps within map_dev: the half run picks the fp32 threshold unless tied,
    and its mask differs from the fp32 mask only in that threshold's band."""
    c = ref.attention
    score32 = {}  # threshold -> fp32 score and bound of its proposal
    for i, prop in enumerate(ref.proposals):
        for mu in _thresholds_of(prop, c, p.thresholds):
            score32[mu] = (float(ref.scores["fused"][i]), _threshold_bound(c, mu, map_dev))
    best = _thresholds_of(ref.mask, c, p.thresholds)
    chosen = _thresholds_of(half.mask, half.attention, p.thresholds)
    assert best and chosen, v.name  # both masks are threshold proposals of their own maps
    s_best, b_best = score32[best[0]]
    # some threshold the half run may have meant is the fp32 best or tied with it
    assert any(mu in score32 and s_best - score32[mu][0] <= b_best + score32[mu][1] + SLACK for mu in chosen) or \
        any(mu not in score32 and _threshold_bound(c, mu, map_dev) == float("inf") for mu in chosen), v.name
    decided = all(s_best - s > b_best + b + SLACK for mu, (s, b) in score32.items() if mu not in best)
    if decided:
        band = np.abs(c - np.float32(best[0])) <= map_dev
        assert not ((half.mask != ref.mask) & ~band).any(), v.name
    return decided


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
            ok = _compare_threshold_proposals(ref, half, v, p, map_dev)
        else:
            ok = _compare_same_proposals(ref, half, v, p, u, map_dev)
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
