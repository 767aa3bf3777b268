"""What a new user meets first, in a real ComfyUI: bad inputs are refused when the prompt is queued (HTTP 400,
node_errors naming the node and the input: an empty or punctuation-only text), a text that names no object is run
and said so under the default no_noun 'warn' ("the one on the right", "leftmost": the target class is open) or
refused under 'error'; an image of any size gives a mask or says why it is empty, on the node (ComfyUI's node text
preview), in the node's text output and in the console."""
from __future__ import annotations

import asyncio
import json
import struct
import time

import numpy as np
import pytest
from comfy_helpers import TIMINGS, find, for_tests, load_api, save_every_mask
from PIL import Image

SIZES = {"small": (97, 131), "tiny": (8, 8), "huge": (3000, 4000)}  # (H, W)
SEEN: dict[str, str] = {}  # what the user sees, by case (printed at the end of the module)


@pytest.fixture(scope="module")
def images(comfy_env) -> dict[str, str]:
    """Test images of odd sizes in ComfyUI's input folder: a smooth background with two blocks (a picture a
    random SAM cuts into a few masks; smooth, so that the 4000 x 3000 PNG stays small)."""
    names = {}
    for key, (h, w) in SIZES.items():
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], -1)
        pixels[h // 5:h // 2 + 1, w // 8:w // 3 + 1] = (200, 40, 40)
        pixels[h // 2:h - h // 6, w // 2:w - w // 8] = (30, 200, 60)
        name = f"refdiff_{key}_{w}x{h}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(comfy_env.base / "input" / name)
        names[key] = name
    yield names
    if SEEN:
        print("\n" + "\n".join(f"--- {case}:\n{text}" for case, text in SEEN.items()))


def node_errors(answer: dict) -> dict[str, str]:
    """node id -> the details of its errors, joined."""
    return {node: " | ".join(f"{e.get('message')}: {e.get('details')}" for e in info["errors"])
            for node, info in answer.get("node_errors", {}).items()}


def refused(comfy, graph: dict, node: str, case: str) -> str:
    """Queue a graph that must be refused at queue time because of ``node``; returns what ComfyUI says of it."""
    code, answer = comfy.queue(graph)
    assert code == 400, answer
    errors = node_errors(answer)
    assert node in errors, errors
    SEEN[case] = errors[node]
    return errors[node]


def segment_graph(image: str, variant: str = "full", text: str = "the horse on the left", **settings) -> dict:
    """The inpainting workflow cut down to its RefDiffSegment node, with a PreviewAny on the report, a
    MaskToImage + SaveImage behind the mask, and the test models; returns the graph."""
    graph = for_tests(load_api("ref-diff-inpainting"), image)
    seg = find(graph, "RefDiffSegment")
    keep = {seg} | {v[0] for v in graph[seg]["inputs"].values() if isinstance(v, list)}
    keep |= {v[0] for k in list(keep) for v in graph[k]["inputs"].values() if isinstance(v, list)}
    graph = {k: v for k, v in graph.items() if k in keep}
    graph[seg]["inputs"].update(variant=variant, text=text, **settings)
    graph["90"] = {"class_type": "PreviewAny", "inputs": {"source": [seg, 2]}}
    return graph


def run_with_node_texts(comfy, graph: dict, timeout: float = 900) -> tuple[dict, dict[str, str]]:
    """Run a graph with a websocket open, as the browser has; returns its history entry and the text each node
    showed in ComfyUI's node text preview (the binary TEXT frames of server.send_progress_text)."""
    import aiohttp

    async def listen() -> tuple[str, dict[str, str]]:
        texts: dict[str, str] = {}
        url = comfy.url.replace("http://", "ws://") + "/ws?clientId=refdiff-tests"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            code, answer = comfy.queue(graph)
            assert code == 200, answer
            prompt_id = answer["prompt_id"]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=timeout)
                if msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", msg.data[:4])[0] == 3:
                    n = struct.unpack(">I", msg.data[4:8])[0]
                    texts[msg.data[8:8 + n].decode()] = msg.data[8 + n:].decode()
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(msg.data)
                    data = event.get("data", {})
                    if data.get("prompt_id") == prompt_id and event["type"] in ("execution_success",
                                                                              "execution_error",
                                                                              "execution_interrupted"):
                        return prompt_id, texts
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
            raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")

    prompt_id, texts = asyncio.run(listen())
    for _ in range(100):
        history = comfy.get(f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id], texts
        time.sleep(0.2)
    raise AssertionError(f"no history entry for {prompt_id}")


def preview_text(history: dict, node: str) -> str:
    return "".join(history.get("outputs", {}).get(node, {}).get("text", []))


def saved_mask_pixels(comfy_env, history: dict, node: str) -> list[int]:
    """The number of set pixels of each mask a SaveImage node wrote."""
    out = []
    for item in history["outputs"][node]["images"]:
        with Image.open(comfy_env.base / item["type"] / item["subfolder"] / item["filename"]) as im:
            out.append(int((np.asarray(im.convert("L")) > 127).sum()))
    return out


def status_error(history: dict) -> str:
    for kind, data in history.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data.get("exception_message", "")
    return ""


# ------------------------------------------------------------------------------------- refused at queue time
def test_empty_text_is_refused_when_queued(comfy, images):
    graph = for_tests(load_api("ref-diff-DS"), images["small"])
    parse = find(graph, "RefDiffParseText")
    graph[parse]["inputs"]["text"] = "   "
    assert "text is empty: type a referring expression" in refused(comfy, graph, parse, "empty text (ParseText)")
    graph = segment_graph(images["small"], text="")
    assert "text is empty" in refused(comfy, graph, find(graph, "RefDiffSegment"), "empty text (Segment)")


def test_punctuation_only_text_is_refused_when_queued(comfy, images):
    graph = for_tests(load_api("ref-diff-DS"), images["small"])
    parse = find(graph, "RefDiffParseText")
    graph[parse]["inputs"]["text"] = "..."
    message = refused(comfy, graph, parse, "punctuation-only text (ParseText)")
    assert "text '...' holds only punctuation: give a referring expression" in message
    graph = segment_graph(images["small"], text=" ?! ")
    assert "holds only punctuation" in refused(comfy, graph, find(graph, "RefDiffSegment"),
                                               "punctuation-only text (Segment)")


def test_text_naming_no_object_is_refused_when_queued_under_no_noun_error(comfy, images):
    graph = for_tests(load_api("ref-diff-DS"), images["small"])
    parse = find(graph, "RefDiffParseText")
    graph[parse]["inputs"].update(text="on the left", no_noun="error")
    message = refused(comfy, graph, parse, "text 'on the left' (ParseText, no_noun error)")
    assert "text 'on the left' names no object" in message and "set no_noun to 'warn'" in message
    graph = segment_graph(images["small"], text="on the left", no_noun="error")
    message = refused(comfy, graph, find(graph, "RefDiffSegment"), "text 'on the left' (Segment, no_noun error)")
    assert "names no object" in message


@pytest.mark.parametrize("cut, message", [
    ("sam", "variant 'full' needs a SAM model: connect a RefDiff SAM Loader to 'sam', or choose variant 'G'"),
    ("clip_scorer", "variant 'full' needs a CLIP scorer: connect a RefDiff CLIP Loader to 'clip_scorer', or choose "
                    "variant 'G' or 'GS'")])
def test_segment_without_a_model_its_variant_needs_is_refused_when_queued(comfy, images, cut, message):
    graph = segment_graph(images["small"])
    seg = find(graph, "RefDiffSegment")
    loader = graph[seg]["inputs"].pop(cut)[0]
    del graph[loader]
    assert message in refused(comfy, graph, seg, f"RefDiffSegment variant full without {cut}")


def test_segment_still_checks_the_types_of_its_links(comfy, images):
    """Asking ComfyUI for input_types turns its own type check of the node's links off: the node does it."""
    graph = segment_graph(images["small"])
    seg = find(graph, "RefDiffSegment")
    graph[seg]["inputs"]["sam"] = graph[seg]["inputs"]["clip_scorer"]
    assert "sam: a REFDIFF_CLIP output is linked, but sam takes REFDIFF_SAM" in refused(
        comfy, graph, seg, "RefDiffSegment with the CLIP loader linked to sam")


# ------------------------------------------------------------------------------------- run, and said so
def test_no_noun_warn_is_the_default_and_runs_and_says_so_everywhere(comfy, images):
    graph = for_tests(load_api("ref-diff-DS"), images["small"])
    parse = find(graph, "RefDiffParseText")
    graph[parse]["inputs"]["text"] = "on the left"
    graph[parse]["inputs"].pop("no_noun")  # optional: a graph without it gets the default
    graph["90"] = {"class_type": "PreviewAny", "inputs": {"source": [parse, 1]}}
    history, texts = run_with_node_texts(comfy, graph)
    assert history["status"]["status_str"] == "success", status_error(history)
    note = "text 'on the left' names no object, so the target class is open"
    assert note in texts.get(parse, ""), texts
    assert f"warning: {note}" in preview_text(history, "90")
    assert f"[RefDiff] {note}" in comfy.log_text()
    SEEN["text 'on the left', no_noun warn (ParseText's node view)"] = texts[parse]


@pytest.mark.parametrize("text", ["the second from the left", "leftmost", "the biggest one", "the one on the right",
                                  "the white thing on the left"])
def test_placeholder_text_runs_in_segment_under_plus_with_a_warning(comfy, images, text):
    """RefDiffSegment, variant G under preset plus (every spatial term), with the default no_noun: a mask, and the
    warning that the target class is open on the node and in its report."""
    graph = segment_graph(images["small"], variant="G", text=text, preset="plus")
    graph[find(graph, "RefDiffSegment")]["inputs"].pop("no_noun")
    history, texts = run_with_node_texts(comfy, graph)
    assert history["status"]["status_str"] == "success", status_error(history)
    note = f"text {text!r} names no object, so the target class is open"
    seg = find(graph, "RefDiffSegment")
    report = preview_text(history, "90")
    assert note in texts.get(seg, ""), texts
    assert f"warning: {note}" in report and "the spatial terms rank all whole-object candidates" in report
    assert "spatial terms (beyond the paper)" in report
    SEEN[f"text {text!r}, RefDiffSegment G / plus (report)"] = report


@pytest.mark.parametrize("area_filter", ["preset", "absolute pixels (released code)"])
def test_a_131x97_image_gives_a_mask_or_says_why(comfy, comfy_env, images, area_filter):
    """The default preset's SAM filter on a small image: relative to the image area it keeps masks a random SAM
    makes; in absolute pixels (10000 px of a 12707 px image) it may remove them all, and then says so."""
    graph = for_tests(load_api("ref-diff-DS"), images["small"])
    sam = find(graph, "RefDiffSAMProposals")
    graph[sam]["inputs"].update(post_filter="preset", area_filter=area_filter)
    graph["90"] = {"class_type": "PreviewAny", "inputs": {"source": [sam, 1]}}
    saves = save_every_mask(graph, prefix=f"check-small-{area_filter[:8]}")
    history, texts = run_with_node_texts(comfy, graph)
    assert history["status"]["status_str"] == "success", status_error(history)
    fuse = find(graph, "RefDiffFuseSelect")
    mask_save = next(k for k, (node, slot) in saves.items() if node == fuse and slot == 0)
    pixels = saved_mask_pixels(comfy_env, history, mask_save)
    info, table = preview_text(history, "90"), preview_text(history, find(graph, "PreviewAny"))
    SEEN[f"131x97 image, SAM node, area_filter {area_filter} (info / node view)"] = \
        f"{info}\n[node view] {texts.get(sam, '(nothing)')}"
    if pixels[0] == 0:
        assert "warning: image 0: " in info and "why: " in table
        assert texts.get(sam, "").startswith("warning: image 0: ")
        assert "[RefDiff] image 0: " in comfy.log_text()
    else:
        assert "warning" not in info and sam not in texts
    if area_filter == "preset":
        assert "scaled with the image area" in info


def test_nothing_left_after_the_released_filter_is_explained(run_graph, images):
    """In absolute pixels the official filter drops every mask of at most 10000 px: nothing of a 131 x 97 image
    survives a custom threshold above its area, and the table says why."""
    graph = for_tests(load_api("ref-diff-DS"), images["small"])
    graph[find(graph, "RefDiffSAMProposals")]["inputs"].update(post_filter="custom", keep_largest=10,
                                                               min_area=20000,
                                                               area_filter="absolute pixels (released code)")
    out = run_graph(graph)
    assert out.ok, out.error()
    table = out.text(find(graph, "PreviewAny"))
    assert "no proposal: empty mask" in table and "why: " in table
    assert ("the SAM post-filter removed" in table and "threshold of 20000 px" in table) or "SAM found no mask" in table


@pytest.mark.slow
@pytest.mark.parametrize("key", ["small", "tiny", "huge"])
def test_segment_on_images_of_any_size(comfy, comfy_env, images, key):
    """The all-in-one node with the default preset's filter (DS: SAM + CLIP, no diffusion, so the 4000 x 3000
    image stays cheap): a mask of the image's size, non-empty or with the reason on the node and in the report."""
    h, w = SIZES[key]
    graph = segment_graph(images[key], variant="DS", preset="official", points_per_side=4)
    seg = find(graph, "RefDiffSegment")
    saves = save_every_mask(graph, prefix=f"check-segment-{key}")
    start = time.perf_counter()
    history, texts = run_with_node_texts(comfy, graph)
    TIMINGS[f"RefDiffSegment DS on {w}x{h}"] = time.perf_counter() - start
    assert history["status"]["status_str"] == "success", status_error(history)
    mask_save = next(k for k, (node, slot) in saves.items() if node == seg and slot == 0)
    item = history["outputs"][mask_save]["images"][0]
    with Image.open(comfy_env.base / item["type"] / item["subfolder"] / item["filename"]) as im:
        assert (im.height, im.width) == (h, w)
    pixels = saved_mask_pixels(comfy_env, history, mask_save)[0]
    report = preview_text(history, "90")
    SEEN[f"{w}x{h} image, RefDiffSegment DS (report / node view)"] = \
        f"{report}\n[node view] {texts.get(seg, '(nothing)')}"
    assert "post-filter: the 10 largest masks of area > 10000 px (at a 307200 px image" in report
    if pixels == 0:
        assert "warning: image 0: " in report and texts.get(seg, "").startswith("warning: image 0: ")
    else:
        assert "warning" not in report


def test_segment_refuses_a_factor_the_model_lacks_before_encoding(run_graph, images):
    graph = segment_graph(images["small"], variant="GS", factor=2, image_size=128)
    out = run_graph(graph)
    assert not out.ok
    message = out.error()
    SEEN["RefDiffSegment GS at factor 2 on the test UNet"] = message
    assert "factor: no cross-attention layer matches factor=2" in message
    assert "this MODEL has cross-attention at factor(s) [4]" in message and "set factor to one of [4]" in message


def test_flux_widgets_are_checked_when_queued_and_refused_on_a_unet(comfy, run_graph, images):
    """A malformed dit_blocks is refused at POST /prompt on both nodes; a Flux / SD 3 widget changed on an SD
    MODEL is refused by name when the node runs, before anything is encoded."""
    graph = segment_graph(images["small"], dit_blocks="1,x")
    message = refused(comfy, graph, find(graph, "RefDiffSegment"), "malformed dit_blocks (Segment)")
    assert "dit_blocks: blocks '1,x': give 'last4', 'all' or indices" in message
    graph = for_tests(load_api("ref-diff-G"), images["small"])
    capture = find(graph, "RefDiffCaptureAttention")
    graph[capture]["inputs"]["dit_blocks"] = "last0"
    assert "dit_blocks:" in refused(comfy, graph, capture, "malformed dit_blocks (CaptureAttention)")
    out = run_graph(segment_graph(images["small"], variant="GS", map_kind="concept", image_size=128))
    assert not out.ok
    message = out.error()
    SEEN["RefDiffSegment map_kind concept on the SD 1.5 test MODEL"] = message
    assert "map_kind: Flux / SD 3 inputs, but this MODEL is SD1.x" in message
