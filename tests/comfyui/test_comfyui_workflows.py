"""Every reference workflow runs in a real ComfyUI on a small odd-sized image, with outputs of the right shapes;
batches give one result per image; bad inputs come back as errors that name them."""
from __future__ import annotations

import copy
import time

import pytest
from build_workflows import IMAGE
from comfy_helpers import (FULL_SIZE_ONLY, REPO, TEST_IMAGE, TEST_IMAGE_SIZE, TIMINGS, api_workflows, find,
                           for_tests, load_api, save_every_mask)
from PIL import Image

H, W = TEST_IMAGE_SIZE


def image_sizes(paths) -> list[tuple[int, int]]:
    """(H, W) of saved images."""
    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append((im.height, im.width))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in api_workflows() if n not in FULL_SIZE_ONLY])
def test_reference_workflow_runs(name, run_graph, comfy):
    graph = for_tests(load_api(name), TEST_IMAGE)
    saves = save_every_mask(graph, prefix=f"check-{name}")
    comfy.free()  # a cold run: models load and every node executes
    start = time.perf_counter()
    out = run_graph(graph)
    TIMINGS[f"workflow {name}"] = time.perf_counter() - start
    assert out.ok, out.error()
    assert saves, "the workflow has no RefDiff MASK output"
    for save_id, (node_id, slot) in saves.items():
        sizes = image_sizes(out.files[save_id])
        assert sizes and all(s == (H, W) for s in sizes), (node_id, slot, sizes)
        node = graph[node_id]
        if node["class_type"] == "RefDiffFuseSelect" and slot == 1:
            assert len(sizes) == node["inputs"]["top_k"]  # top-k masks of the one image
        elif node["class_type"] == "RefDiffProposalsToMasks":
            assert len(sizes) >= 1, (node_id, slot)  # every proposal of the one image
        else:
            assert len(sizes) == 1, (node_id, slot)
    if name != "ref-diff-inpainting":
        table = out.text(find(graph, "PreviewAny"))
        assert "image 0:" in table and "proposals" in table
    else:
        inpainted = out.files[next(k for k, v in graph.items() if v["class_type"] == "SaveImage"
                                   and v["inputs"]["filename_prefix"] == "refdiff/inpainted")]
        assert image_sizes(inpainted) == [(H // 8 * 8, W // 8 * 8)]  # VAEEncodeForInpaint crops to 8 px


def batch_graph(texts: str) -> dict:
    """The full workflow on a batch of two images (the test image twice, the second flipped)."""
    graph = for_tests(load_api("ref-diff"), TEST_IMAGE)
    load = find(graph, "LoadImage")
    graph["90"] = {"class_type": "ImageFlip", "inputs": {"image": [load, 0], "flip_method": "x-axis: vertically"}}
    graph["91"] = {"class_type": "ImageBatch", "inputs": {"image1": [load, 0], "image2": ["90", 0]}}
    for node in graph.values():
        for key, value in node["inputs"].items():
            if value == [load, 0] and node["class_type"] not in ("ImageFlip", "ImageBatch"):
                node["inputs"][key] = ["91", 0]
    graph[find(graph, "RefDiffParseText")]["inputs"]["text"] = texts
    return graph


@pytest.mark.slow
def test_batch_gives_one_result_per_image(run_graph, comfy):
    graph = batch_graph("the horse on the left\nthe red block")
    saves = save_every_mask(graph, prefix="check-batch")
    comfy.free()
    start = time.perf_counter()
    out = run_graph(graph)
    TIMINGS["ref-diff on a batch of 2"] = time.perf_counter() - start
    assert out.ok, out.error()
    for save_id, (node_id, slot) in saves.items():
        sizes = image_sizes(out.files[save_id])
        expected = 2 * graph[node_id]["inputs"]["top_k"] if slot == 1 and graph[node_id]["class_type"] == \
            "RefDiffFuseSelect" else 2
        assert sizes == [(H, W)] * expected, (node_id, slot, sizes)
    table = out.text(find(graph, "PreviewAny"))
    assert "image 0:" in table and "image 1:" in table


def test_nothing_qualifies_gives_an_empty_mask_of_the_image_size(run_graph):
    """The official post-filter in absolute pixels (the released code) drops masks of at most 10000 px: on a
    53 x 77 image nothing survives, and the table says why."""
    graph = for_tests(load_api("ref-diff-DS"), TEST_IMAGE)
    graph[find(graph, "RefDiffSAMProposals")]["inputs"].update(post_filter="preset",
                                                               area_filter="absolute pixels (released code)")
    saves = save_every_mask(graph, prefix="check-empty")
    out = run_graph(graph)
    assert out.ok, out.error()
    for save_id in saves:
        for path in out.files[save_id]:
            with Image.open(path) as im:
                assert (im.height, im.width) == (H, W) and im.getextrema() in ((0, 0), ((0, 0),) * 3)
    table = out.text(find(graph, "PreviewAny"))
    assert "no proposal: empty mask" in table
    assert "why: the SAM post-filter removed" in table or "why: SAM found no mask" in table


def test_text_lines_must_match_the_batch(run_graph):
    graph = batch_graph("the dog\nthe cat\nthe bird")
    out = run_graph(graph)
    assert not out.ok
    assert "3 entries for a batch of 2 images" in out.error(), out.error()


def test_empty_text_is_named(run_graph):
    """A text widget is checked when the prompt is queued (test_comfyui_first_run.py); a linked text, which
    validation does not see, when the node runs."""
    graph = for_tests(load_api("ref-diff-DS"), TEST_IMAGE)
    graph["90"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "   "}}
    graph[find(graph, "RefDiffParseText")]["inputs"]["text"] = ["90", 0]
    out = run_graph(graph)
    assert not out.ok
    assert "text is empty" in out.error(), out.error()


@pytest.mark.parametrize("loader, key, folder", [("RefDiffSAMLoader", "sam_name", "sams"),
                                                 ("RefDiffCLIPLoader", "clip_name", "open_clip")])
def test_missing_model_file_is_named_with_its_folder(comfy, loader, key, folder):
    graph = for_tests(load_api("ref-diff-DS"), TEST_IMAGE)
    graph[find(graph, loader)]["inputs"][key] = "not_there.safetensors"
    code, answer = comfy.queue(graph)
    assert code == 400, answer
    errors = [e for node in answer.get("node_errors", {}).values() for e in node["errors"]]
    text = " ".join(f"{e.get('message')} {e.get('details')}" for e in errors)
    assert "not_there.safetensors" in text and f"{folder}" in text, text


def test_unsupported_capture_settings_are_named(run_graph):
    graph = for_tests(load_api("ref-diff-G"), TEST_IMAGE)
    graph[find(graph, "RefDiffCaptureAttention")]["inputs"]["factor"] = 2  # the test UNet has attention at 4 only
    out = run_graph(graph)
    assert not out.ok
    assert "no cross-attention layer matches factor=2" in out.error(), out.error()


def test_model_is_not_changed_by_the_capture(run_graph, comfy_env):
    """KSampler on the MODEL before and after a capture ran on it gives the same latent (no patch leaks).

    ComfyUI caches node outputs, so the second sampling uses KSamplerAdvanced with the same settings (same
    computation, a node that has not run yet) on the same cached MODEL."""
    from safetensors.torch import load_file

    base = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "refdiff_test_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a horse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
    }
    before = copy.deepcopy(base)
    before["5"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 5, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    before["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "leak/before"}}
    first = run_graph(before)
    assert first.ok, first.error()

    capture = for_tests(load_api("ref-diff-G"), TEST_IMAGE)
    capture[find(capture, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = "refdiff_test_sd15.safetensors"
    ran = run_graph(capture)
    assert ran.ok, ran.error()

    after = copy.deepcopy(base)
    after["7"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["1", 0], "add_noise": "enable", "noise_seed": 5, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    after["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "leak/after"}}
    second = run_graph(after)
    assert second.ok, second.error()
    a = load_file(str(first.files["6"][0]))["latent_tensor"]
    b = load_file(str(second.files["8"][0]))["latent_tensor"]
    assert a.shape == b.shape == (1, 4, 16, 16)
    assert (a - b).abs().max().item() == 0.0


def test_refine_without_self_attention_is_named(run_graph):
    graph = for_tests(load_api("ref-diff-G-refine"), TEST_IMAGE)
    graph[find(graph, "RefDiffCaptureAttention")]["inputs"]["self_attention"] = False
    out = run_graph(graph)
    assert not out.ok
    assert "captured without self-attention; turn on self_attention" in out.error(), out.error()


def test_malformed_factor_weights_are_refused_before_the_run(comfy):
    graph = for_tests(load_api("ref-diff-G-refine"), TEST_IMAGE)
    graph[find(graph, "RefDiffSelfAttentionRefine")]["inputs"]["factor_weights"] = "4:0.5,3:0.2"
    code, answer = comfy.queue(graph)
    assert code == 400, answer
    errors = [e for node in answer.get("node_errors", {}).values() for e in node["errors"]]
    text = " ".join(f"{e.get('message')} {e.get('details')}" for e in errors)
    assert "factor_weights" in text and "must be a power of two" in text, text


def test_templates_find_their_example_image(run_graph, comfy, comfy_env):
    """The pack copied its example image into the input folder when it loaded, saying so in one log line; a
    workflow as shipped, with only the test models and fast settings, runs on it."""
    copied = comfy_env.base / "input" / IMAGE
    assert copied.read_bytes() == (REPO / "assets" / IMAGE).read_bytes()
    assert comfy.log_text().count("[RefDiff] copied the reference workflows' example image to") == 1
    assert {n["inputs"]["image"] for n in load_api("ref-diff-DS").values() if n["class_type"] == "LoadImage"} == {IMAGE}
    graph = for_tests(load_api("ref-diff-DS"), IMAGE)
    saves = save_every_mask(graph, prefix="check-example")
    out = run_graph(graph)
    assert out.ok, out.error()
    with Image.open(copied) as im:
        size = (im.height, im.width)
    assert all(s == size for save_id in saves for s in image_sizes(out.files[save_id]))
