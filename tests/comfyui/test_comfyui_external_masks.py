"""Masks from any node in a real ComfyUI: the SAM node's masks, passed on as a ComfyUI MASK batch through
RefDiffMaskProposals (or RefDiffSegment's proposals input), are ranked and selected exactly as the pack's own SAM
path ranks and selects them (tests/comfyui/external_masks_checks.py, run in a subprocess; it reports, the test
asserts); and the reference workflow ref-diff-external-masks runs on the server."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from comfy_helpers import (COMFYUI_PATH, HERE, REPO, TEST_IMAGE, TEST_IMAGE_SIZE, TIMINGS, child_env, find, for_tests,
                           load_api, save_every_mask)
from PIL import Image

PRESETS = ("official", "paper")
VARIANTS = ("full", "GS", "DS", "sam-clip")
SAM_PROPOSALS = {"official": 10, "paper": 15}  # equivalence_checks.PLANTED_BOXES after each preset's post-filter


@pytest.fixture(scope="module")
def report(comfy_env) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "external_masks_checks.py"), str(comfy_env.models), str(REPO),
                           "mask_batch_equals_sam"], cwd=COMFYUI_PATH, env=child_env(), capture_output=True,
                          text=True, timeout=900)
    TIMINGS["external masks check"] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    devs = [d for row in out["chain"].values() for d in row["score_dev"].values() if d is not None]
    print(f"\nexternal masks vs SAM path: {len(out['chain'])} chain runs, largest score deviation {max(devs):.3g}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_sam_masks_as_a_mask_batch_rank_and_select_as_the_sam_path(report, preset, variant):
    row = report["chain"][f"{preset}/{variant}"]
    assert row["n"] == SAM_PROPOSALS[preset]  # several proposals to rank, so the comparison means something
    assert row["same_proposals"], row
    for kind, dev in row["score_dev"].items():
        assert dev is None or dev <= 1e-6, (kind, row)
    assert row["ranking_external"] == row["ranking"] and row["index_external"] == row["index"] >= 0, row
    assert row["same_mask"] and row["mask_area"] > 0, row


@pytest.mark.slow
def test_the_mask_batch_is_a_comfyui_mask_and_becomes_external_proposals(report):
    assert report["mask_dtype"][0] == "torch.float32" and report["mask_dtype"][1][1:] == [480, 640]
    assert report["source_official"] == report["source_paper"] == "external"
    assert "image 0: 10 proposals of 10 mask(s)" in report["info"]["official"]
    assert "(no post-filter)" in report["info"]["official"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_the_preset_post_filter_on_the_raw_masks_gives_the_sam_nodes_proposals(report, preset):
    row = report["post_filter"][preset]
    assert row["same"] and row["external"] == row["sam_node"] == SAM_PROPOSALS[preset], row
    assert row["raw"] >= row["sam_node"], row


@pytest.mark.slow
@pytest.mark.parametrize("key", [f"{p}/{v}" for p in PRESETS for v in ("full", "DS")])
def test_segment_with_masks_wired_to_proposals_selects_as_with_sam(report, key):
    row = report["segment"][key]
    assert row["n"] == SAM_PROPOSALS[key.split("/")[0]] and row["same_proposals"], row
    assert row["ranking_external"] == row["ranking"] and row["index_external"] == row["index"] >= 0, row
    assert row["same_mask"] and row["report_names_external"], row


def selected(out, graph: dict, saves: dict) -> tuple[bytes, str]:
    """The pixels of FuseSelect's selected mask and its score table (without the proposals' source)."""
    fuse = find(graph, "RefDiffFuseSelect")
    save = next(k for k, (node, slot) in saves.items() if node == fuse and slot == 0)
    with Image.open(out.files[save][0]) as im:
        pixels = im.convert("L").tobytes()
        assert (im.height, im.width) == TEST_IMAGE_SIZE
    table = out.text(find(graph, "PreviewAny"))
    return pixels, table.replace("(external)", "(sam)")


@pytest.mark.slow
def test_the_external_masks_workflow_chooses_as_the_full_workflow(run_graph):
    """The reference workflow ref-diff-external-masks (SAM's masks re-entered as a MASK batch) on the server:
    the same score table and the same selected mask as ref-diff, whose proposals come straight from SAM."""
    results = {}
    for name in ("ref-diff", "ref-diff-external-masks"):
        graph = for_tests(load_api(name), TEST_IMAGE)
        saves = save_every_mask(graph, prefix=f"check-external-{name}")
        out = run_graph(graph)
        assert out.ok, out.error()
        results[name] = selected(out, graph, saves)
    (own_mask, own_table), (ext_mask, ext_table) = results["ref-diff"], results["ref-diff-external-masks"]
    assert "image 0:" in own_table and "proposals (sam)" in own_table
    assert ext_table == own_table and ext_mask == own_mask


def queue_errors(comfy, graph: dict) -> dict[str, str]:
    """Queue a graph that must be refused (HTTP 400); node id -> the details of its errors."""
    code, answer = comfy.queue(graph)
    assert code == 400, answer
    return {node: " | ".join(f"{e.get('message')}: {e.get('details')}" for e in info["errors"])
            for node, info in answer.get("node_errors", {}).items()}


def test_bad_counts_and_unused_proposals_are_refused_when_queued(comfy):
    """Before anything runs: counts that are not numbers (Mask Proposals, Segment's proposal_counts), and masks
    wired to Segment's proposals under a variant that makes its own proposals."""
    graph = for_tests(load_api("ref-diff-external-masks"), TEST_IMAGE)
    node = find(graph, "RefDiffMaskProposals")
    graph[node]["inputs"]["counts"] = "three"
    errors = queue_errors(comfy, graph)
    assert "counts: 'three' is not a list of whole numbers" in errors[node], errors
    graph = for_tests(load_api("ref-diff-inpainting"), TEST_IMAGE)
    seg = find(graph, "RefDiffSegment")
    graph[seg]["inputs"]["proposals"] = [find(graph, "LoadImage"), 1]  # a MASK output
    for variant, counts, words in (("G", "", "proposals: variant 'G' makes its own proposals"),
                                   ("full", "x", "proposal_counts: 'x' is not a list")):
        graph[seg]["inputs"].update(variant=variant, proposal_counts=counts)
        errors = queue_errors(comfy, graph)
        assert words in errors[seg], errors
