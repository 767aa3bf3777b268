"""SAM 3 in a real ComfyUI: RefDiff SAM 3 Loader lists the tiny random SAM 3 of models/sam3 (make_models.py) and
refuses a SAM file by name when the prompt is queued; SAM 3 Loader -> Concept Proposals -> CLIP score -> Fuse &
Select runs through /prompt, on one image and on a batch; an image with no instance gets zero proposals and says
so; RefDiffSegment takes the SAM 3 under proposal_mode concept (no SAM connected)."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
from comfy_helpers import TEST_IMAGE, TEST_IMAGE_SIZE, TEST_MODELS, find

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sam3") is None, reason="the sam3 package is not installed")

SAM3_FILE = TEST_MODELS["sam3_name"]


def concept_graph(text: str = "the red block on the left", threshold: float = 0.0, batch: bool = False,
                  via_parse: bool = True) -> dict:
    """LoadImage (optionally a batch of two) -> SAM 3 concept proposals -> CLIP score -> Fuse & Select."""
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": TEST_IMAGE}},
        "2": {"class_type": "RefDiffSAM3Loader", "inputs": {"sam3_name": SAM3_FILE}},
        "3": {"class_type": "RefDiffParseText", "inputs": {"text": text, "preset": "official", "root_rule": "preset",
                                                           "root_word": "", "no_noun": "warn"}},
        "4": {"class_type": "RefDiffConceptProposals",
              "inputs": {"sam3": ["2", 0], "image": ["1", 0], "preset": "official", "concept_prompt": "preset",
                         "threshold": threshold, "max_instances": 4}},
        "5": {"class_type": "RefDiffCLIPLoader", "inputs": {"clip_name": TEST_MODELS["clip_name"],
                                                            "model_name": "ViT-B-16", "quick_gelu": "auto",
                                                            "precision": "fp32"}},
        "6": {"class_type": "RefDiffCLIPScore", "inputs": {"clip_scorer": ["5", 0], "image": ["1", 0],
                                                           "proposals": ["4", 0], "parse": ["3", 0],
                                                           "preset": "official", "mode": "ref-diff",
                                                           "positional_bias": True, "crop_weight": -1.0,
                                                           "mask_weight": -1.0}},
        "7": {"class_type": "RefDiffFuseSelect", "inputs": {"proposals": ["4", 0], "discriminative": ["6", 0],
                                                            "preset": "official", "gen_weight": -1.0,
                                                            "disc_weight": -1.0, "top_k": 2, "pin_index": -1,
                                                            "image": ["1", 0]}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["7", 2]}},
        "10": {"class_type": "MaskToImage", "inputs": {"mask": ["7", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "check-sam3/mask"}},
    }
    if via_parse:
        g["4"]["inputs"]["parse"] = ["3", 0]
    else:
        g["4"]["inputs"]["text"] = text
    if batch:
        g["20"] = {"class_type": "ImageFlip", "inputs": {"image": ["1", 0], "flip_method": "x-axis: vertically"}}
        g["21"] = {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["20", 0]}}
        for node in ("4", "6", "7"):
            g[node]["inputs"]["image"] = ["21", 0]
    return g


def test_the_loader_lists_models_sam3(comfy):
    info = comfy.get("/object_info/RefDiffSAM3Loader")["RefDiffSAM3Loader"]
    assert info["input"]["required"]["sam3_name"][1]["options"] == [SAM3_FILE]
    assert info["output"] == ["REFDIFF_SAM3"]


@pytest.mark.slow
def test_concept_proposals_are_scored_and_selected_through_prompt(run_graph):
    out = run_graph(concept_graph())
    assert out.ok, out.error()
    info, table = out.text("8"), out.text("9")
    assert "SAM 3 concept proposals (sam3 (custom size))" in info
    assert "image 0: 4 instance(s) of 'block'" in info and "SAM 3 scores [" in info  # the noun, not the sentence
    assert "image 0: 4 proposals (concept)" in table
    from PIL import Image

    with Image.open(out.files["11"][0]) as im:
        assert (im.height, im.width) == TEST_IMAGE_SIZE and im.convert("L").getextrema()[1] == 255


@pytest.mark.slow
def test_a_batch_with_a_text_per_image_and_one_without_instances(run_graph):
    out = run_graph(concept_graph(text="the red block\nthe horse", batch=True, via_parse=False))
    assert out.ok, out.error()
    info = out.text("8")
    assert "image 0: 4 instance(s) of 'block'" in info and "image 1: 4 instance(s) of 'horse'" in info
    out = run_graph(concept_graph(threshold=0.99))  # nothing above: zero proposals, said in info, an empty mask
    assert out.ok, out.error()
    info = out.text("8")
    assert "image 0: 0 proposals (SAM 3 found no instance of 'block' above concept_threshold 0.99)" in info
    assert "warning: image 0: SAM 3 found no instance" in info and "lower concept_threshold" in info
    from PIL import Image

    with Image.open(out.files["11"][0]) as im:
        assert im.convert("L").getextrema() == (0, 0)


def test_a_sam_file_in_models_sam3_is_refused_by_name_when_queued(comfy, comfy_env):
    wrong = comfy_env.models / "sam3" / "sam_vit_b_by_mistake.pth"
    shutil.copy(comfy_env.models / "sams" / TEST_MODELS["sam_name"], wrong)
    try:
        graph = concept_graph()
        graph["2"]["inputs"]["sam3_name"] = wrong.name
        code, answer = comfy.queue(graph)
        assert code == 400, answer
        details = " | ".join(f"{e.get('message')}: {e.get('details')}" for e in answer["node_errors"]["2"]["errors"])
        assert f"sam3_name: {wrong.name!r} is a SAM (v1, segment-anything) checkpoint, not SAM 3" in details
        assert "RefDiff SAM Loader" in details
        graph = concept_graph()
        del graph["4"]["inputs"]["parse"]  # neither parse nor text: refused at run time, naming both inputs
        out = comfy.run(graph)
        assert "parse / text: connect RefDiff Parse Text's parse" in str(out), out
    finally:
        wrong.unlink()


@pytest.mark.slow
def test_segment_takes_the_sam3_under_proposal_mode_concept(comfy, run_graph):
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": TEST_IMAGE}},
        "2": {"class_type": "RefDiffSAM3Loader", "inputs": {"sam3_name": SAM3_FILE}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_MODELS["ckpt_name"]}},
        "5": {"class_type": "RefDiffCLIPLoader", "inputs": {"clip_name": TEST_MODELS["clip_name"],
                                                            "model_name": "ViT-B-16", "quick_gelu": "auto",
                                                            "precision": "fp32"}},
        "6": {"class_type": "RefDiffSegment", "inputs": {
            "model": ["3", 0], "clip": ["3", 1], "vae": ["3", 2], "image": ["1", 0], "text": "the red block",
            "variant": "DS", "preset": "official", "seed": 0, "image_size": 128, "top_k": 0, "points_per_side": 8,
            "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "proposal_mode": "concept", "sam3": ["2", 0],
            "clip_scorer": ["5", 0]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}},
    }
    code, answer = comfy.queue({**graph, "6": {**graph["6"], "inputs": {k: v for k, v in graph["6"]["inputs"].items()
                                                                        if k != "sam3"}}})
    assert code == 400 and "needs a SAM 3 model: connect a RefDiff SAM 3 Loader to 'sam3'" in str(answer), answer
    out = run_graph(graph)
    assert out.ok, out.error()
    report = out.text("7")
    assert "SAM 3 concept proposals: image 0:" in report and "instance(s) of 'block'" in report
    assert "proposals (concept)" in report


@pytest.mark.slow
def test_segment_under_plus_with_a_sam3_falls_back_to_sam_for_a_text_naming_no_object(run_graph):
    """preset plus + a SAM 3 connected: concept proposals; a text SAM 3 cannot look for ("the one on the left")
    gets SAM's automatic proposals instead, as refdiff.RefDiff falls back, and the report says so."""
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": TEST_IMAGE}},
        "2": {"class_type": "RefDiffSAM3Loader", "inputs": {"sam3_name": SAM3_FILE}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_MODELS["ckpt_name"]}},
        "4": {"class_type": "RefDiffSAMLoader", "inputs": {"sam_name": TEST_MODELS["sam_name"], "model_type": "auto"}},
        "5": {"class_type": "RefDiffCLIPLoader", "inputs": {"clip_name": TEST_MODELS["clip_name"],
                                                            "model_name": "ViT-B-16", "quick_gelu": "auto",
                                                            "precision": "fp32"}},
        "6": {"class_type": "RefDiffSegment", "inputs": {
            "model": ["3", 0], "clip": ["3", 1], "vae": ["3", 2], "image": ["1", 0], "text": "the one on the left",
            "variant": "DS", "preset": "plus", "seed": 0, "image_size": 128, "top_k": 0, "points_per_side": 8,
            "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "proposal_mode": "preset", "sam3": ["2", 0],
            "sam": ["4", 0], "clip_scorer": ["5", 0], "keep_largest": 0, "min_area": 0}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}},
    }
    out = run_graph(graph)
    assert out.ok, out.error()
    report = out.text("7")
    assert "names no object for SAM 3 to look for (an open target), so the preset's automatic SAM proposals are " \
           "used instead" in report, report
    graph["6"]["inputs"]["text"] = "the red block"
    out = run_graph(graph)
    assert out.ok, out.error()
    assert "SAM 3 concept proposals: image 0:" in out.text("7")
