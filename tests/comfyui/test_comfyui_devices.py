"""Where the nodes put things, and what they check before the heavy work (tests/comfyui/device_checks.py, run in a
subprocess on ComfyUI's GPU when there is one, else on the CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from comfy_helpers import COMFYUI_PATH, HERE, REPO, TIMINGS, child_env


@pytest.fixture(scope="module")
def checks(comfy_env) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "device_checks.py"), str(comfy_env.models), str(REPO)],
                          cwd=COMFYUI_PATH, env=child_env(), capture_output=True, text=True, timeout=900)
    TIMINGS["in-process device and factor checks"] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_nodes_use_comfyuis_devices_and_give_cpu_float_outputs(checks):
    r = checks["devices"]
    compute, offload = r["compute_device"], r["offload_device"]
    assert r["asked_compute_device"] > 0  # the device came from ComfyUI's model management
    assert r["before"] == r["after"] == {"sam": offload, "clip": offload}  # every pack model is back
    # DS moves SAM and CLIP to the compute device and back once each; GS moves SAM once more
    assert r["moves"] == {"sam": [compute, offload, compute, offload], "clip": [compute, offload]}, r["moves"]
    for name, (device, dtype) in r["outputs"].items():
        assert (device, dtype) == ("cpu", "float32"), (name, device, dtype)
    assert r["shapes"] == {"DS mask": [1, 53, 77], "GS c": [1, 53, 77]}


def test_a_factor_the_model_lacks_is_refused_before_any_encoding(checks):
    r = checks["factor_first"]
    for where in ("segment", "capture"):
        assert r[where].startswith("InputError: factor: no cross-attention layer matches factor=2"), r[where]
        assert "this MODEL has cross-attention at factor(s) [4]" in r[where]
