"""Checks on ComfyUI's Python objects (tests/comfyui/inprocess_checks.py, run in a subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from comfy_helpers import COMFYUI_PATH, HERE, REPO, TIMINGS, child_env


def run_check(comfy_env, name: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "inprocess_checks.py"), str(comfy_env.models), str(REPO), name],
                          cwd=COMFYUI_PATH, env=child_env(), capture_output=True, text=True, timeout=900)
    TIMINGS[f"in-process check {name}"] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_capture_leaves_the_model_untouched(comfy_env):
    """Cross- and self-attention capture, then a feature-cluster pass, on the same MODEL: nothing sticks to it."""
    r = run_check(comfy_env, "no_leak")
    assert r["captured_layers"] == 4
    assert r["self_levels"] == [[4, [4, 4], 4]]  # the 4x4 level: 4 attn1 layers averaged
    assert r["cluster_proposals"][1:] == [53, 77] and r["cluster_proposals"][0] >= 1
    assert r["options_equal"] and r["patches_before"] == r["patches_after"] == r["other_patches_after"] == "None"
    assert r["max_diff"] == 0.0


def test_capture_patches_do_not_change_the_unet_output(comfy_env):
    r = run_check(comfy_env, "transparent")
    assert r["factors"] == [4, 4, 4, 4]  # the small test UNet: attention only at the deepest level
    assert r["maps_shape"] == r["uncond_shape"] == [4, 4, 4, 77]
    assert r["max_diff"] <= 1e-5 * r["scale"]


def test_internals_patches_do_not_change_the_unet_output(comfy_env):
    """Self-attention, query-feature and block patches on every layer: the clone's output is the model's, bit for
    bit (the patched layers call ComfyUI's own attention)."""
    r = run_check(comfy_env, "transparent_internals")
    assert r["max_diff"] == 0.0
    assert len(r["self_layers"]) == 4 and all(name.endswith(".attn1") for name in r["self_layers"])
    assert max(r["row_sums"]) < 1e-5  # softmax rows, both CFG branches kept here
    assert r["features"]["output_blocks.1"] == [320, 8, 8]  # after its Upsample
    assert r["features"]["input_blocks.5.transformer_blocks.0.attn2.to_q"] == [320, 4, 4]
    assert len(r["features"]) == r["feature_uncond"] == 16  # 12 blocks + 4 query projections


@pytest.mark.slow
def test_comfyui_internals_equal_the_library(comfy_env):
    """Same weights, latent, prompt and seed: ComfyUI's self-attention and feature captures equal
    refdiff.diffusion's, and the refined map and the cluster proposals equal the library's."""
    r = run_check(comfy_env, "internals_same_as_library")
    assert r["comfy_levels"] == r["lib_levels"] == [[4, [4, 4], 4]]
    assert r["self_diff"] < 1e-5, r
    assert r["refined_shape"] == r["lib_refined_shape"] == [4, 4]
    assert r["refined_diff"] < 1e-4 and r["refined_range"][0] == 0.0 and r["refined_range"][1] > 0.99, r
    assert r["feature_pairs"] == 7 and max(r["feature_diffs"].values()) < 1e-4, r
    assert r["same_masks"] and r["cluster_shapes"][0] == r["cluster_shapes"][1], r


@pytest.mark.slow
def test_comfyui_backend_gives_the_library_maps(comfy_env):
    """Same weights, latent, prompt and seed: ComfyUI's capture equals refdiff.diffusion.run_capture."""
    r = run_check(comfy_env, "same_as_library")
    assert not (r["unet_missing"] or r["unet_unexpected"] or r["text_missing"] or r["text_unexpected"]), r
    assert r["comfy_shape"] == r["lib_shape"] == [8, 4, 4, 77]  # 2 steps x 4 layers, 4x4 grid, 77 tokens
    assert r["cond_diff"] < 1e-4 and r["uncond_diff"] < 1e-4, r


@pytest.mark.slow
def test_comfyui_backend_gives_the_library_maps_for_v_prediction(comfy_env):
    """The same with the UNet read as a v-prediction model (ComfyUI's ModelSamplingDiscrete patch): the
    second step's maps depend on how the first step's output is turned into the next latent."""
    r = run_check(comfy_env, "same_as_library_v")
    assert r["comfy_shape"] == r["lib_shape"] == [8, 4, 4, 77]
    assert r["cond_diff"] < 1e-4 and r["uncond_diff"] < 1e-4, r


def test_sd2_unet_is_captured(comfy_env):
    r = run_check(comfy_env, "sd2")
    assert r["family"] == "SD2.x" and r["batch"] == 2 and r["uncond"]
    assert r["shape"] == [8, 4, 4, 77]
    assert abs(r["probs_sum"] - 1.0) < 1e-4  # probabilities over the 77 tokens


def test_other_families_are_refused_by_name(comfy_env):
    r = run_check(comfy_env, "families")
    for family, message in r.items():
        assert message.startswith("InputError") and f"this MODEL is {family}" in message, message
