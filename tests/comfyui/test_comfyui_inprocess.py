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
    r = run_check(comfy_env, "no_leak")
    assert r["captured_layers"] == 4
    assert r["options_equal"] and r["patches_before"] == r["patches_after"] == "None"
    assert r["max_diff"] == 0.0


def test_capture_patches_do_not_change_the_unet_output(comfy_env):
    r = run_check(comfy_env, "transparent")
    assert r["factors"] == [4, 4, 4, 4]  # the small test UNet: attention only at the deepest level
    assert r["maps_shape"] == r["uncond_shape"] == [4, 4, 4, 77]
    assert r["max_diff"] <= 1e-5 * r["scale"]


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
