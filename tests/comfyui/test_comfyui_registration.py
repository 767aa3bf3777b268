"""The pack loads in a real ComfyUI: every node registered with its inputs, templates served, no import
failure, and a missing optional package disables only its own nodes with one log line."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from build_workflows import WORKFLOWS_DEFS, snapshot
from comfy_helpers import COMFYUI_PATH, HERE, PACK_LINK, TIMINGS, child_env

SNAPSHOT_FILE = HERE / "object_info.json"
EXPECTED_NODES = {"RefDiffPrepareImage", "RefDiffNoiseInjection", "RefDiffCaptureAttention", "RefDiffParseText",
                  "RefDiffGenerativeMap", "RefDiffThresholdProposals", "RefDiffGenerativeScore", "RefDiffSAMLoader",
                  "RefDiffSAMProposals", "RefDiffPromptedSAM", "RefDiffCLIPLoader", "RefDiffCLIPScore", "RefDiffFuseSelect",
                  "RefDiffSegment", "RefDiffSelfAttentionRefine", "RefDiffFeatureClusterProposals",
                  "RefDiffMaskProposals", "RefDiffProposalsToMasks", "RefDiffSpatial", "RefDiffSEGSProposals",
                  "RefDiffToSEGS"} | ({"RefDiffSAM3Loader", "RefDiffConceptProposals"}
                                     if importlib.util.find_spec("sam3") else set())


@pytest.fixture(scope="module")
def object_info(comfy) -> dict:
    return comfy.get("/object_info", timeout=60)


def test_every_node_registered_with_its_inputs(object_info):
    ours = {name: info for name, info in object_info.items() if name.startswith("RefDiff")}
    assert set(ours) == EXPECTED_NODES
    recorded = json.loads(SNAPSHOT_FILE.read_text(encoding="utf-8"))
    for name, info in ours.items():
        assert info["category"] == "RefDiff", name
        assert info["display_name"].startswith("RefDiff"), name
        assert info["input_order"] == recorded[name]["input_order"], name
        for group in ("required", "optional"):
            for input_name, spec in info["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert all(info["output_tooltips"]), f"{name} has an output without tooltip"


def test_model_folders_list_the_test_models(object_info):
    sam = object_info["RefDiffSAMLoader"]["input"]["required"]["sam_name"][1]["options"]
    clip = object_info["RefDiffCLIPLoader"]["input"]["required"]["clip_name"][1]["options"]
    sam2 = ["refdiff_test_sam2.safetensors"] if importlib.util.find_spec("sam2") else []
    assert sam == ["refdiff_test_sam.pth", *sam2]  # models/sams first, then models/sam2
    assert clip == ["refdiff_test_clip.safetensors"]  # the .json beside it is not a weight file
    if importlib.util.find_spec("sam3"):
        sam3 = object_info["RefDiffSAM3Loader"]["input"]["required"]["sam3_name"][1]["options"]
        assert sam3 == ["refdiff_test_sam3.safetensors"]  # models/sam3


def test_checked_in_node_definitions_are_current(object_info):
    """tests/comfyui/object_info.json (read by the offline workflow tests) matches the running nodes.
    Set REFDIFF_UPDATE_OBJECT_INFO=1 to rewrite it, then run tests/comfyui/build_workflows.py."""
    live = snapshot(object_info)
    if os.environ.get("REFDIFF_UPDATE_OBJECT_INFO"):
        SNAPSHOT_FILE.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    recorded = json.loads(SNAPSHOT_FILE.read_text(encoding="utf-8"))
    assert live == recorded, "node definitions changed: REFDIFF_UPDATE_OBJECT_INFO=1 and rebuild the workflows"


def test_workflow_templates_are_served(comfy):
    templates = comfy.get("/workflow_templates")
    assert sorted(templates.get(PACK_LINK, [])) == sorted(WORKFLOWS_DEFS)


def _quick_test(comfy_env, extra_env: dict | None = None) -> tuple[int, str]:
    env = child_env()
    env.update(extra_env or {})
    args = [a for a in comfy_env.server_args(0) if a not in ("--listen", "127.0.0.1", "--port", "0")]
    proc = subprocess.run([sys.executable, *args, "--quick-test-for-ci"], cwd=COMFYUI_PATH, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_quick_test_for_ci_loads_the_pack(comfy_env):
    start = time.perf_counter()
    code, log = _quick_test(comfy_env)
    TIMINGS["main.py --quick-test-for-ci"] = time.perf_counter() - start
    assert code == 0, log[-3000:]
    pack_lines = [line for line in log.splitlines() if PACK_LINK in line]
    assert pack_lines, log[-3000:]
    assert not any("IMPORT FAILED" in line for line in pack_lines), pack_lines
    assert "[RefDiff]" not in log, log[-3000:]


def test_missing_optional_package_disables_only_its_nodes(comfy_env, tmp_path):
    """With segment_anything unimportable, one log line names it; the other nodes still load."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "segment_anything.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'segment_anything'\", name='segment_anything')\n")
    path = os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)
    code, log = _quick_test(comfy_env, {"PYTHONPATH": path})
    assert code == 0, log[-3000:]
    lines = [line for line in log.splitlines() if "[RefDiff]" in line]
    assert len(lines) == 1, lines
    assert "segment_anything" in lines[0] and "sam_nodes" in lines[0] and "pip install" in lines[0]
    assert not any("IMPORT FAILED" in line for line in log.splitlines() if PACK_LINK in line)
