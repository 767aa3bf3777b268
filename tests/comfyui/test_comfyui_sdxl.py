"""SDXL on ComfyUI's own classes (tests/comfyui/sdxl_checks.py, run in a subprocess; it reports, the tests assert)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from comfy_helpers import COMFYUI_PATH, HERE, REPO, TIMINGS, child_env


@pytest.fixture(scope="module")
def sdxl(comfy_env) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "sdxl_checks.py"), str(REPO)], cwd=COMFYUI_PATH,
                          env=child_env(), capture_output=True, text=True, timeout=900)
    TIMINGS["in-process SDXL checks"] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sdxl_is_detected_and_accepted(sdxl):
    r = sdxl["family"]
    assert (r["detected"], r["base"], r["family"]) == ("SDXL", "SDXL", "SDXL")
    factors = {(block, number): factor for block, number, _, factor in r["layers"]}
    # SDXL's layout: factor 2 in input 4-5 / output 3-5, factor 4 (10 deep) in input 7-8, middle, output 0-2
    assert factors == {("input", 4): 2, ("input", 5): 2, ("input", 7): 4, ("input", 8): 4, ("middle", 0): 4,
                       ("output", 0): 4, ("output", 1): 4, ("output", 2): 4, ("output", 3): 2, ("output", 4): 2,
                       ("output", 5): 2}
    assert sum(1 for b, n, _, _ in r["layers"] if (b, n) == ("input", 7)) == 10


def test_refiner_and_other_families_are_refused_by_name(sdxl):
    refused = sdxl["family"]["refused"]
    for family, message in refused.items():
        assert message.startswith("InputError") and f"this MODEL is {family}" in message, message
    assert "SDXL base checkpoint" in refused["SDXLRefiner"]


def test_conditioning_of_another_family_is_refused(sdxl):
    assert "768 wide" in sdxl["family"]["sd1_conditioning"] and "2048" in sdxl["family"]["sd1_conditioning"]
    assert "pooled_output" in sdxl["family"]["no_pooled"]


def test_sdxl_capture_patches_do_not_change_the_unet_output(sdxl):
    r = sdxl["transparent"]
    assert r["n_layers"] == 43 and r["maps_shape"] == r["uncond_shape"] == [43, 8, 8, 77]
    assert r["max_diff"] <= 1e-5 * r["scale"]


def test_planted_attention_on_sdxl_layers_gives_its_mask(sdxl):
    r = sdxl["planted"]
    assert r["layers"] == 36  # factor 4: 10 + 10 + 10 + 3 x 2 transformers
    assert r["mask"] == r["planted"]


def test_sdxl_comfyui_backend_gives_the_library_maps(sdxl):
    """Same weights, latent, prompt and seed: ComfyUI's SDXL capture (its CLIP-L + CLIP-G, added conditioning)
    equals refdiff.diffusion.run_capture with diffusers' UNet and transformers' text encoders."""
    r = sdxl["same_as_library"]
    assert not (r["unet_missing"] or r["text_missing"] or r["text_unexpected"]), r
    assert all(k.startswith("class_embedding.") for k in r["unet_unexpected"]), r
    assert r["comfy_shape"] == r["lib_shape"] == [72, 4, 4, 77] and r["finite"]
    assert r["cond_diff"] < 1e-4 and r["uncond_diff"] < 1e-4, r


def test_refdiff_segment_runs_on_sdxl(sdxl):
    """The all-in-one node on an SDXL MODEL / CLIP (the ref-diff-sdxl workflow's wiring): a mask and a map."""
    r = sdxl["segment"]
    assert r["mask_shape"] == [1, 96, 128] and r["mask_dtype"] == "torch.float32" and r["mask_device"] == "cpu"
    assert set(r["mask_values"]) <= {0.0, 1.0} and r["mask_pixels"] > 0, r
    assert r["c_shape"] == [1, 96, 128] and r["c_finite"] and r["c_range"] > 0, r
    assert "box" in r["report"], r["report"][:2000]


def test_sibling_methods_run_on_sdxl(sdxl):
    """DiffSegmenter's refined map (capture at every level with self-attention, then SelfAttentionRefine) and
    FreeSeg-Diff's feature clusters run on an SDXL MODEL: a finite map of the image's size, and masks that cover
    the image."""
    r = sdxl["siblings"]
    assert "error" not in r["refine"], r["refine"]
    assert r["refine"]["shape"] == [1, 96, 128] and r["refine"]["finite"] and r["refine"]["range"] > 0
    assert r["refine"]["layers"] == 43  # the factor-4 level (36) and the factor-2 level (7)
    assert "error" not in r["clusters"], r["clusters"]
    assert r["clusters"]["n"] >= 1 and r["clusters"]["hw"] == [96, 128] and r["clusters"]["cover"] > 0.5
