"""The SEGS nodes in ComfyUI's Python (tests/comfyui/segs_checks.py, run in a subprocess): SEGS sockets, tooltips,
queue-time checks, the selection as SEGS and SEGS as proposals. With Impact Pack available
(``REFDIFF_IMPACT_PACK`` = a ComfyUI-Impact-Pack checkout; its core needs OpenCV and scikit-image, which
``REFDIFF_IMPACT_PYTHONPATH`` may add to the path) the SEGS are Impact's own SEG objects and Impact's
functions read and write them; without it the same checks run on the SEG namedtuple."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from comfy_helpers import COMFYUI_PATH, HERE, REPO, TIMINGS, child_env

IMPACT = os.environ.get("REFDIFF_IMPACT_PACK", "")
IMPACT_PATH = os.environ.get("REFDIFF_IMPACT_PYTHONPATH", "")
needs_impact = pytest.mark.skipif(not (IMPACT and (Path(IMPACT) / "modules" / "impact" / "core.py").is_file()),
                                  reason="REFDIFF_IMPACT_PACK does not name a ComfyUI-Impact-Pack checkout")


def run_checks(impact: str = "") -> dict:
    env = child_env()
    paths = [str(REPO), *([IMPACT_PATH] if impact and IMPACT_PATH else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "segs_checks.py"), str(REPO), *([impact] if impact else [])],
                          cwd=COMFYUI_PATH, env=env, capture_output=True, text=True, timeout=600)
    TIMINGS["SEGS checks" + (" with Impact Pack" if impact else "")] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_common(r: dict) -> None:
    assert r["to_outputs"] == ["SEGS", "SEGS", "STRING"] and r["from_inputs"][:2] == ["SEGS", "IMAGE"]
    assert r["untooltipped"] == []
    assert r["validate_without_scores"].startswith("scores: connect") and r["validate_with_scores"] is True
    assert r["seg_fields"] == ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                               "control_net_wrapper"]
    # planted scores 0.2, 0.7, 0.5: proposal 1 (the bottom-right block) selected, then proposal 2
    assert r["selected"] == [[[40, 20, 64, 48], "the cup", 0.7]]
    assert r["top"] == [[[40, 20, 64, 48], 0.7], [[2, 30, 6, 34], 0.5]]
    assert r["segs_proposals_equal"] and r["round_trip_top"]
    assert "3 proposals of 3 SEG(s)" in r["segs_proposals_info"]
    assert "holds 2 images" in r["batch_refused"] and "ImageFromBatch" in r["batch_refused"]
    assert r["two_images_refused"].startswith("InputError: proposals: they are of 2 images")


def test_segs_nodes_in_comfyui_with_the_seg_namedtuple():
    r = run_checks()
    assert r["impact"] is False
    check_common(r)


@needs_impact
def test_segs_nodes_with_impact_pack():
    """Impact's SEG class is used, Impact's segs_to_combined_mask / segs_to_masklist read our SEGS back into the
    selected and top-k masks, and Impact's mask_to_segs SEGS become the planted masks as proposals."""
    r = run_checks(IMPACT)
    assert r["impact"] is True and r["seg_is_impacts"] is True
    check_common(r)
    assert r["impact_combined_is_selected"] and r["impact_masklist_is_top"]
