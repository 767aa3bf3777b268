"""Write the reference workflows: workflows/api/NAME.json (API format, what POST /prompt takes),
workflows/NAME.json (UI format, what ComfyUI's template browser and the canvas load) and workflows/NAME.jpg
(a thumbnail of the graph).

The graphs are defined once, below, in API form; the UI form is derived with the node definitions of
tests/comfyui/object_info.json (input order, which inputs are widgets). Run after changing a node's inputs
(and after refreshing object_info.json with the ComfyUI tests): python tests/comfyui/build_workflows.py
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
OBJECT_INFO = Path(__file__).resolve().parent / "object_info.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

CKPT = "v1-5-pruned-emaonly.safetensors"
SAM = "sam_vit_h_4b8939.pth"
CLIP = "ViT-B-16-openai.safetensors"
IMAGE = "example.png"
TEXT = "the horse on the left"


# ------------------------------------------------------------------------------------------ graph building
class Graph:
    """An API-format graph under construction; ``add`` returns the node id, ``out(id, slot)`` a link."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, title: str | None = None, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"inputs": inputs, "class_type": class_type, "_meta": {"title": title or class_type}}
        return node_id

    @staticmethod
    def out(node_id: str, slot: int = 0) -> list:
        return [node_id, slot]


def sd_front(g: Graph) -> tuple[str, str]:
    """Checkpoint + image nodes every generative workflow starts with."""
    ckpt = g.add("CheckpointLoaderSimple", "Load SD 1.5 checkpoint", ckpt_name=CKPT)
    image = g.add("LoadImage", "Image to segment", image=IMAGE)
    return ckpt, image


def parse_node(g: Graph, clip: list | None) -> str:
    inputs: dict[str, Any] = dict(text=TEXT, preset="official", root_rule="preset", root_word="")
    if clip is not None:
        inputs["clip"] = clip
    return g.add("RefDiffParseText", "Parse the referring expression", **inputs)


def generative_chain(g: Graph, ckpt: str, image: str, parse: str) -> str:
    """Prepare -> VAEEncode -> noise injection -> capture -> generative map; returns the map node."""
    square = g.add("RefDiffPrepareImage", "Pad to a square", image=g.out(image), size=1024, resize_filter="lanczos")
    latent = g.add("VAEEncode", pixels=g.out(square), vae=g.out(ckpt, 2))
    noised = g.add("RefDiffNoiseInjection", "Noise injection (Eq. 3)", latent=g.out(latent), seed=0,
                   schedule="preset", preset="official", strength=0.1, ddim_steps=20)
    capture = g.add("RefDiffCaptureAttention", "Capture cross-attention (Eq. 4)", model=g.out(ckpt, 0),
                    latent=g.out(noised), preset="official", kind="preset", guidance=9.0, use_cfg=True, factor=4,
                    blocks="down,mid,up", steps=0, text="", clip=g.out(ckpt, 1), parse=g.out(parse),
                    self_attention=False, self_max_tokens=4096)
    return g.add("RefDiffGenerativeMap", "Generative map c (Eq. 5)", attention=g.out(capture), parse=g.out(parse),
                 image=g.out(image), preset="official", resize="preset", token_override="")


def sam_chain(g: Graph, image: str) -> str:
    sam = g.add("RefDiffSAMLoader", "Load SAM", sam_name=SAM, model_type="auto")
    return g.add("RefDiffSAMProposals", "SAM proposals", sam=g.out(sam), image=g.out(image), preset="official",
                 points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88, stability_score_thresh=0.95,
                 box_nms_thresh=0.7, crop_n_layers=0, min_mask_region_area=0, post_filter="preset",
                 keep_largest=10, min_area=10000)


def clip_score(g: Graph, image: str, proposals: str, parse: str, mode: str) -> str:
    loader = g.add("RefDiffCLIPLoader", "Load CLIP ViT-B/16", clip_name=CLIP, model_name="ViT-B-16",
                   quick_gelu="auto", precision="fp32")
    return g.add("RefDiffCLIPScore", "Discriminative score s_D" if mode == "ref-diff" else "SAM-CLIP score",
                 clip_scorer=g.out(loader), image=g.out(image), proposals=g.out(proposals), parse=g.out(parse),
                 preset="official", mode=mode, positional_bias=mode == "ref-diff", crop_weight=-1.0,
                 mask_weight=-1.0)


def outputs(g: Graph, select: str, name: str) -> None:
    """Save the selected mask, preview the overlay, show the score table."""
    mask_image = g.add("MaskToImage", mask=g.out(select, 0))
    g.add("SaveImage", "Save the mask", images=g.out(mask_image), filename_prefix=f"refdiff/{name}")
    g.add("PreviewImage", "Selected mask over the image", images=g.out(select, 3))
    g.add("PreviewAny", "Ranked proposals", source=g.out(select, 2))


def select_node(g: Graph, proposals: str, image: str, generative: str | None, discriminative: str | None) -> str:
    inputs: dict[str, Any] = dict(proposals=g.out(proposals), preset="official", gen_weight=-1.0, disc_weight=-1.0,
                                  top_k=5, pin_index=-1, image=g.out(image))
    if generative:
        inputs["generative"] = g.out(generative)
    if discriminative:
        inputs["discriminative"] = g.out(discriminative)
    return g.add("RefDiffFuseSelect", "Fuse scores and select (Eq. 1, 2)", **inputs)


def ref_diff() -> Graph:
    g = Graph()
    ckpt, image = sd_front(g)
    parse = parse_node(g, g.out(ckpt, 1))
    c = generative_chain(g, ckpt, image, parse)
    proposals = sam_chain(g, image)
    s_g = g.add("RefDiffGenerativeScore", "Generative score s_G (Eq. 9)", c=g.out(c), proposals=g.out(proposals),
                preset="official")
    s_d = clip_score(g, image, proposals, parse, "ref-diff")
    outputs(g, select_node(g, proposals, image, s_g, s_d), "ref-diff")
    return g


def threshold_graph(make_c, name: str) -> Graph:
    """Threshold proposals of c scored by s_G alone (Ref-Diff/G); ``make_c`` builds the chain giving c."""
    g = Graph()
    ckpt, image = sd_front(g)
    parse = parse_node(g, g.out(ckpt, 1))
    c = make_c(g, ckpt, image, parse)
    proposals = g.add("RefDiffThresholdProposals", "Threshold proposals (Eq. 8)", c=g.out(c), thresholds="preset",
                      preset="official")
    s_g = g.add("RefDiffGenerativeScore", "Generative score s_G (Eq. 9)", c=g.out(c), proposals=g.out(proposals),
                preset="official")
    outputs(g, select_node(g, proposals, image, s_g, None), name)
    return g


def ref_diff_g() -> Graph:
    return threshold_graph(generative_chain, "ref-diff-G")


def ref_diff_gs() -> Graph:
    g = Graph()
    ckpt, image = sd_front(g)
    parse = parse_node(g, g.out(ckpt, 1))
    c = generative_chain(g, ckpt, image, parse)
    proposals = sam_chain(g, image)
    s_g = g.add("RefDiffGenerativeScore", "Generative score s_G (Eq. 9)", c=g.out(c), proposals=g.out(proposals),
                preset="official")
    outputs(g, select_node(g, proposals, image, s_g, None), "ref-diff-GS")
    return g


def ref_diff_ds() -> Graph:
    g = Graph()
    image = g.add("LoadImage", "Image to segment", image=IMAGE)
    parse = parse_node(g, None)
    proposals = sam_chain(g, image)
    s_d = clip_score(g, image, proposals, parse, "ref-diff")
    outputs(g, select_node(g, proposals, image, None, s_d), "ref-diff-DS")
    return g


def sam_clip() -> Graph:
    g = Graph()
    image = g.add("LoadImage", "Image to segment", image=IMAGE)
    parse = parse_node(g, None)
    proposals = sam_chain(g, image)
    s_d = clip_score(g, image, proposals, parse, "sam-clip")
    outputs(g, select_node(g, proposals, image, None, s_d), "sam-clip")
    return g


def inpainting() -> Graph:
    g = Graph()
    ckpt, image = sd_front(g)
    sam = g.add("RefDiffSAMLoader", "Load SAM", sam_name=SAM, model_type="auto")
    clip_loader = g.add("RefDiffCLIPLoader", "Load CLIP ViT-B/16", clip_name=CLIP, model_name="ViT-B-16",
                        quick_gelu="auto", precision="fp32")
    segment = g.add("RefDiffSegment", "Ref-Diff: the referred object", model=g.out(ckpt, 0), clip=g.out(ckpt, 1),
                    vae=g.out(ckpt, 2), image=g.out(image), text=TEXT, variant="full", preset="official", seed=0,
                    image_size=0, top_k=0, points_per_side=32, pred_iou_thresh=0.88, stability_score_thresh=0.95,
                    sam=g.out(sam), clip_scorer=g.out(clip_loader))
    positive = g.add("CLIPTextEncode", "What to paint there", text="a white horse, photo", clip=g.out(ckpt, 1))
    negative = g.add("CLIPTextEncode", "Negative prompt", text="blurry, low quality", clip=g.out(ckpt, 1))
    latent = g.add("VAEEncodeForInpaint", pixels=g.out(image), vae=g.out(ckpt, 2), mask=g.out(segment, 0),
                   grow_mask_by=6)
    sampled = g.add("KSampler", model=g.out(ckpt, 0), seed=0, steps=20, cfg=7.0, sampler_name="euler",
                    scheduler="normal", positive=g.out(positive), negative=g.out(negative), latent_image=g.out(latent),
                    denoise=1.0)
    decoded = g.add("VAEDecode", samples=g.out(sampled), vae=g.out(ckpt, 2))
    g.add("SaveImage", "Inpainted image", images=g.out(decoded), filename_prefix="refdiff/inpainted")
    g.add("PreviewImage", "Referring mask over the image", images=g.out(segment, 3))
    return g


def refine_chain(g: Graph, ckpt: str, image: str, parse: str) -> str:
    """Prepare -> VAEEncode -> noise injection -> capture (every level, with self-attention) -> DiffSegmenter's
    refined map; returns the refine node."""
    square = g.add("RefDiffPrepareImage", "Pad to a square", image=g.out(image), size=1024, resize_filter="lanczos")
    latent = g.add("VAEEncode", pixels=g.out(square), vae=g.out(ckpt, 2))
    noised = g.add("RefDiffNoiseInjection", "Noise injection (Eq. 3)", latent=g.out(latent), seed=0,
                   schedule="preset", preset="official", strength=0.1, ddim_steps=20)
    capture = g.add("RefDiffCaptureAttention", "Capture cross- and self-attention, every level", model=g.out(ckpt, 0),
                    latent=g.out(noised), preset="official", kind="preset", guidance=9.0, use_cfg=True, factor=0,
                    blocks="down,mid,up", steps=0, text="", clip=g.out(ckpt, 1), parse=g.out(parse),
                    self_attention=True, self_max_tokens=4096)
    return g.add("RefDiffSelfAttentionRefine", "Refined map c (DiffSegmenter)", attention=g.out(capture),
                 parse=g.out(parse), image=g.out(image), preset="official", iterations=1,
                 factor_weights="8:0.3,4:0.5,2:0.1,1:0.1", eps=1e-8, self_factor=0, resize="preset")


def ref_diff_g_refine() -> Graph:
    return threshold_graph(refine_chain, "ref-diff-G-refine")


def ref_diff_clusters() -> Graph:
    g = Graph()
    ckpt, image = sd_front(g)
    parse = parse_node(g, g.out(ckpt, 1))
    c = generative_chain(g, ckpt, image, parse)
    latent = next(k for k, v in g.nodes.items() if v["class_type"] == "VAEEncode")
    proposals = g.add("RefDiffFeatureClusterProposals", "Feature-cluster proposals (FreeSeg-Diff)",
                      model=g.out(ckpt, 0), latent=g.out(latent), image=g.out(image), clusters=4, features="queries",
                      feature_factor=4, cluster_factor=2, timestep=0, normalize=True, split_components=True,
                      min_area=0, seed=0, clip=g.out(ckpt, 1))
    s_g = g.add("RefDiffGenerativeScore", "Generative score s_G (Eq. 9)", c=g.out(c), proposals=g.out(proposals),
                preset="official")
    s_d = clip_score(g, image, proposals, parse, "ref-diff")
    outputs(g, select_node(g, proposals, image, s_g, s_d), "ref-diff-clusters")
    return g


WORKFLOWS_DEFS = {"ref-diff": ref_diff, "ref-diff-G": ref_diff_g, "ref-diff-GS": ref_diff_gs,
                  "ref-diff-DS": ref_diff_ds, "sam-clip": sam_clip, "ref-diff-inpainting": inpainting,
                  "ref-diff-G-refine": ref_diff_g_refine, "ref-diff-clusters": ref_diff_clusters}


# ------------------------------------------------------------------------------------------ UI conversion
def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def input_spec(info: dict, name: str) -> tuple[str, dict]:
    """(type, options) of a node input; type "COMBO" for both combo spellings."""
    for group in ("required", "optional"):
        if name in info["input"].get(group, {}):
            spec = info["input"][group][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            return kind, (spec[1] if len(spec) > 1 else {})
    raise KeyError(f"{info['name']} has no input {name!r}")


def ordered_inputs(info: dict) -> list[str]:
    order = info.get("input_order", {})
    return list(order.get("required", [])) + list(order.get("optional", []))


def widget_values(info: dict, inputs: dict) -> list:
    """widgets_values of a UI node: widget inputs in order, with the extra values the frontend stores."""
    values: list = []
    for name in ordered_inputs(info):
        kind, options = input_spec(info, name)
        if kind not in WIDGET_TYPES or options.get("forceInput") or is_link(inputs.get(name)):
            continue
        values.append(inputs.get(name, options.get("default")))
        if options.get("control_after_generate"):
            values.append("fixed")
        if options.get("image_upload"):
            values.append("image")
    return values


def depth(graph: dict) -> dict[str, int]:
    """Column of each node: the longest chain of links leading to it."""
    memo: dict[str, int] = {}

    def d(node_id: str) -> int:
        if node_id not in memo:
            sources = [v[0] for v in graph[node_id]["inputs"].values() if is_link(v)]
            memo[node_id] = 1 + max((d(s) for s in sources), default=-1)
        return memo[node_id]

    for node_id in graph:
        d(node_id)
    return memo


def to_ui(graph: dict, object_info: dict) -> dict:
    """The UI-format (LiteGraph) workflow of an API graph."""
    links: list[list] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    ui_inputs: dict[str, list[dict]] = {}
    for node_id, node in graph.items():
        info = object_info[node["class_type"]]
        entries: list[dict] = []
        for name in ordered_inputs(info):
            kind, options = input_spec(info, name)
            value = node["inputs"].get(name)
            if kind in WIDGET_TYPES and not is_link(value):
                continue
            entry: dict[str, Any] = {"name": name, "type": kind, "link": None}
            if kind in WIDGET_TYPES:
                entry["widget"] = {"name": name}
            if name in info["input"].get("optional", {}):
                entry["shape"] = 7
            if is_link(value):
                link_type = object_info[graph[value[0]]["class_type"]]["output"][value[1]]
                entry["link"] = len(links) + 1
                links.append([entry["link"], int(value[0]), value[1], int(node_id), len(entries), link_type])
                out_links.setdefault((value[0], value[1]), []).append(entry["link"])
            entries.append(entry)
        ui_inputs[node_id] = entries
    cols = depth(graph)
    rows: dict[int, int] = {}
    nodes = []
    for order, (node_id, node) in enumerate(sorted(graph.items(), key=lambda kv: (cols[kv[0]], int(kv[0])))):
        info = object_info[node["class_type"]]
        outputs_ui = [{"name": out_name, "type": out_type, "links": out_links.get((node_id, slot), []),
                       "slot_index": slot}
                      for slot, (out_name, out_type) in enumerate(zip(info["output_name"], info["output"]))]
        widgets = widget_values(info, node["inputs"])
        height = 46 + 22 * max(len(ui_inputs[node_id]), len(outputs_ui)) + 26 * len(widgets)
        col, row = cols[node_id], rows.get(cols[node_id], 0)
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [40 + 360 * col, 40 + row],
                      "size": [320, height], "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs[node_id],
                      "outputs": outputs_ui, "title": node["_meta"]["title"],
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
        rows[col] = row + height + 50
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(graph, sort_keys=True))), "revision": 0,
            "last_node_id": max(int(k) for k in graph), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


# ------------------------------------------------------------------------------------------ node snapshot
CORE_NODES = ("CheckpointLoaderSimple", "LoadImage", "VAEEncode", "VAEDecode", "VAEEncodeForInpaint",
              "SetLatentNoiseMask", "KSampler", "KSamplerAdvanced", "CLIPTextEncode", "MaskToImage", "SaveImage",
              "PreviewImage", "PreviewAny", "ImageBatch", "SaveLatent", "EmptyLatentImage", "GrowMask")
MODEL_LISTS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"), ("RefDiffSAMLoader", "sam_name"),
               ("RefDiffCLIPLoader", "clip_name")}


def snapshot(object_info: dict) -> dict:
    """The definitions of the pack's nodes and the core nodes the workflows use, without the lists of files
    (models, input images) that differ between installations."""
    names = sorted(n for n in object_info if n.startswith("RefDiff")) + sorted(CORE_NODES)
    out = {}
    for name in names:
        info = json.loads(json.dumps(object_info[name]))
        for group in ("required", "optional"):
            for input_name, spec in info["input"].get(group, {}).items():
                if (name, input_name) in MODEL_LISTS:
                    if isinstance(spec[0], list):
                        spec[0] = []
                    elif len(spec) > 1 and "options" in spec[1]:
                        spec[1]["options"] = []
        out[name] = info
    return out


# ------------------------------------------------------------------------------------------ thumbnails
def thumbnail(ui: dict, path: Path, width: int = 1024) -> None:
    """Draw the UI graph (RefDiff nodes blue, core nodes grey, links as lines) into a JPEG."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)

    right = max(n["pos"][0] + n["size"][0] for n in ui["nodes"]) + 40
    bottom = max(n["pos"][1] + n["size"][1] for n in ui["nodes"]) + 40
    scale = width / right
    image = Image.new("RGB", (width, max(200, int(bottom * scale))), (32, 32, 36))
    draw = ImageDraw.Draw(image)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for _, src, src_slot, dst, dst_slot, _ in ui["links"]:
        a, b = by_id[src], by_id[dst]
        start = ((a["pos"][0] + a["size"][0]) * scale, (a["pos"][1] + 30 + 22 * src_slot) * scale)
        end = (b["pos"][0] * scale, (b["pos"][1] + 30 + 22 * (dst_slot or 0)) * scale)
        draw.line([start, end], fill=(150, 150, 110), width=2)
    for n in ui["nodes"]:
        x, y = n["pos"][0] * scale, n["pos"][1] * scale
        box = [x, y, x + n["size"][0] * scale, y + n["size"][1] * scale]
        ours = n["type"].startswith("RefDiff")
        draw.rounded_rectangle(box, radius=6, fill=(40, 70, 120) if ours else (70, 70, 74),
                               outline=(120, 170, 240) if ours else (140, 140, 140), width=2)
        title = n["title"]
        while title and draw.textlength(title, font=font) > box[2] - box[0] - 10:
            title = title[:-1]
        draw.text((x + 5, y + 4), title, fill=(240, 240, 240), font=font)
    image.save(path, "JPEG", quality=88)


def graphs() -> dict[str, dict]:
    """Every reference workflow's API graph, by name."""
    return {name: make().nodes for name, make in WORKFLOWS_DEFS.items()}


def write_all(names: Iterable[str] | None = None) -> None:
    object_info = json.loads(OBJECT_INFO.read_text(encoding="utf-8"))
    (WORKFLOWS / "api").mkdir(parents=True, exist_ok=True)
    for name, graph in graphs().items():
        if names and name not in names:
            continue
        ui = to_ui(graph, object_info)
        (WORKFLOWS / "api" / f"{name}.json").write_text(json.dumps(graph, indent=2) + "\n", encoding="utf-8")
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n", encoding="utf-8")
        thumbnail(ui, WORKFLOWS / f"{name}.jpg")
        print("wrote", name)


if __name__ == "__main__":
    write_all()
