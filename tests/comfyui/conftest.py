"""Fixtures for the tests against a real ComfyUI (set COMFYUI_PATH to its folder; skipped otherwise).

A session writes random-weight models (tests/comfyui/make_models.py), an extra_model_paths YAML that names a
temporary custom_nodes folder (holding a link to this repository) and the model folders, and starts
``python main.py --cpu ...`` headless on a free port. Run:

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/comfyui
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from comfy_helpers import (COMFYUI_PATH, HERE, PACK_LINK, REPO, SCREENS, SKIP_REASON, TEST_IMAGE, TEST_IMAGE_SIZE,
                           TIMINGS, ComfyClient, ComfyEnv, Outputs, child_env, comfy_available, free_port)


def pytest_report_header(config):
    if not comfy_available():
        return f"tests/comfyui: skipped - {SKIP_REASON}"
    return f"tests/comfyui: ComfyUI at {COMFYUI_PATH}"


def pytest_collection_modifyitems(config, items):
    skip = None if comfy_available() else pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.comfyui)
            if skip is not None:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if not comfy_available():
        terminalreporter.write_line(f"tests/comfyui skipped: {SKIP_REASON}")
        return
    if TIMINGS:
        terminalreporter.write_sep("-", "ComfyUI timings (seconds, CPU)")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name:45s} {seconds:8.2f}")
    for folder in SCREENS:
        terminalreporter.write_line(f"screenshots: {folder}")


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory) -> ComfyEnv:
    if not comfy_available():
        pytest.skip(SKIP_REASON)
    root = tmp_path_factory.mktemp("comfyui")
    base, models, custom = root / "base", root / "models", root / "custom_nodes"
    for folder in (base / "input", base / "output", base / "temp", base / "user", base / "models",
                   base / "custom_nodes", models, custom):
        folder.mkdir(parents=True, exist_ok=True)
    (custom / PACK_LINK).symlink_to(REPO, target_is_directory=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "make_models.py"), str(models)], cwd=COMFYUI_PATH, check=True,
                   env=child_env(), capture_output=True, text=True, timeout=600)
    TIMINGS["write random-weight models"] = time.perf_counter() - start
    yaml = root / "extra_model_paths.yaml"
    yaml.write_text("refdiff_test:\n"
                    f"    base_path: {root}\n"
                    "    custom_nodes: custom_nodes\n"
                    "    checkpoints: models/checkpoints\n"
                    "    diffusion_models: models/diffusion_models\n"
                    "    sams: models/sams\n"
                    "    sam2: models/sam2\n"
                    "    sam3: models/sam3\n"
                    "    open_clip: models/open_clip\n", encoding="utf-8")
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = TEST_IMAGE_SIZE
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    pixels[10:40, 5:30] = (200, 40, 40)  # a red block on the left
    Image.fromarray(pixels).save(base / "input" / TEST_IMAGE)
    return ComfyEnv(root=root, base=base, models=models, custom_nodes=custom, yaml=yaml, logs=root / "logs")


@pytest.fixture(scope="session")
def comfy(comfy_env: ComfyEnv):
    """A running ComfyUI with this repository as a custom node pack."""
    comfy_env.logs.mkdir(exist_ok=True)
    port = free_port()
    log = comfy_env.logs / "server.log"
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen([sys.executable, *comfy_env.server_args(port)], cwd=COMFYUI_PATH,
                                   stdout=out, stderr=subprocess.STDOUT, env=child_env())
    client = ComfyClient(f"http://127.0.0.1:{port}", log, process)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({process.returncode}):\n{client.log_text()[-4000:]}")
            try:
                client.get("/system_stats", timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"ComfyUI did not answer in 180 s:\n{client.log_text()[-4000:]}")
                time.sleep(0.5)
        TIMINGS["start ComfyUI server"] = time.perf_counter() - start
        yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def run_graph(comfy, comfy_env):
    """Run an API graph; returns Outputs (status checked by the caller)."""

    def run(graph: dict, timeout: float = 900) -> Outputs:
        return Outputs(comfy.run(graph, timeout=timeout), comfy_env.base)

    return run


