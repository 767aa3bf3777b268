"""Proposal sources beyond SAM v1's automatic grid in a real ComfyUI: a SAM 2.1 checkpoint in models/sam2
(listed by the loader, run by the automatic and the prompted nodes) and the prompted mode of RefDiffSegment."""
from __future__ import annotations

import importlib.util

import pytest
from comfy_helpers import TEST_IMAGE, TEST_IMAGE_SIZE, find, for_tests, load_api, save_every_mask
from PIL import Image

SAM2_FILE = "refdiff_test_sam2.safetensors"
needs_sam2 = pytest.mark.skipif(importlib.util.find_spec("sam2") is None, reason="the sam2 package is not installed")


def mask_sizes(out, save_id: str) -> list[tuple[int, int]]:
    sizes = []
    for path in out.files[save_id]:
        with Image.open(path) as im:
            sizes.append((im.height, im.width))
    return sizes


@needs_sam2
def test_sam2_checkpoint_is_listed_by_the_loader(comfy):
    info = comfy.get("/object_info/RefDiffSAMLoader")["RefDiffSAMLoader"]
    spec = info["input"]["required"]["sam_name"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert SAM2_FILE in options and "refdiff_test_sam.pth" in options


@needs_sam2
@pytest.mark.slow
@pytest.mark.parametrize("workflow", ["ref-diff", "ref-diff-prompted"])
def test_sam2_checkpoint_runs_the_proposal_nodes(workflow, run_graph):
    """The full graph (automatic grid) and the prompted graph run with the SAM 2.1 file in the SAM loader."""
    graph = for_tests(load_api(workflow), TEST_IMAGE)
    graph[find(graph, "RefDiffSAMLoader")]["inputs"]["sam_name"] = SAM2_FILE
    proposal_node = find(graph, "RefDiffPromptedSAM" if workflow == "ref-diff-prompted" else "RefDiffSAMProposals")
    graph["900"] = {"class_type": "PreviewAny", "inputs": {"source": [proposal_node, 1]}}
    saves = save_every_mask(graph, prefix=f"check-sam2-{workflow}")
    out = run_graph(graph)
    assert out.ok, out.error()
    info = out.text("900")
    assert "image 0" in info or "proposal" in info, info
    select = find(graph, "RefDiffFuseSelect")
    selected = next(k for k, (node, slot) in saves.items() if node == select and slot == 0)
    assert mask_sizes(out, selected) == [TEST_IMAGE_SIZE]


@pytest.mark.slow
def test_prompted_sam_info_names_the_prompts(run_graph):
    """PromptedSAM's info output lists the prompts it placed on the image (a peak of c always exists: c is
    normalised to [0, 1])."""
    graph = for_tests(load_api("ref-diff-prompted"), TEST_IMAGE)
    prompted = find(graph, "RefDiffPromptedSAM")
    graph["900"] = {"class_type": "PreviewAny", "inputs": {"source": [prompted, 1]}}
    out = run_graph(graph)
    assert out.ok, out.error()
    info = out.text("900")
    assert "prompt" in info.lower(), info


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "DS"])
def test_segment_in_prompted_mode_gives_a_mask(variant, run_graph):
    """RefDiffSegment with proposal_mode 'prompted' runs the SAM variants (DS then also runs the diffusion
    pass for c) and gives one mask of the image's size."""
    graph = for_tests(load_api("ref-diff-inpainting"), TEST_IMAGE)
    segment = find(graph, "RefDiffSegment")
    graph[segment]["inputs"].update(proposal_mode="prompted", variant=variant)
    saves = save_every_mask(graph, prefix=f"check-prompted-{variant}")
    out = run_graph(graph)
    assert out.ok, out.error()
    save = next(k for k, (node, slot) in saves.items() if node == segment and slot == 0)
    assert mask_sizes(out, save) == [TEST_IMAGE_SIZE]
