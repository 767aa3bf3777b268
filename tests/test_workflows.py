"""The reference workflows (workflows/*.json, UI format; workflows/api/*.json, API format) without ComfyUI:
valid JSON, every node type and input known (RefDiff nodes and core nodes, from the node definitions recorded
in tests/comfyui/object_info.json, which the ComfyUI tests keep equal to the running pack), links typed
correctly, UI and API twins in agreement, thumbnails present, and the files equal to what
tests/comfyui/build_workflows.py writes."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
OBJECT_INFO = json.loads((REPO / "tests" / "comfyui" / "object_info.json").read_text(encoding="utf-8"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODEL_LISTS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"), ("RefDiffSAMLoader", "sam_name"),
               ("RefDiffCLIPLoader", "clip_name")}
EXPECTED = {"ref-diff", "ref-diff-G", "ref-diff-GS", "ref-diff-DS", "sam-clip", "ref-diff-inpainting",
            "ref-diff-G-refine", "ref-diff-clusters"}


def _builder():
    spec = importlib.util.spec_from_file_location("refdiff_build_workflows",
                                                  REPO / "tests" / "comfyui" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def spec_of(class_type: str, name: str) -> tuple[str, dict, bool]:
    """(type, options, required) of an input of a recorded node."""
    info = OBJECT_INFO[class_type]
    for group in ("required", "optional"):
        if name in info["input"].get(group, {}):
            spec = info["input"][group][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            options = dict(spec[1]) if len(spec) > 1 else {}
            if isinstance(spec[0], list):
                options["options"] = spec[0]
            return kind, options, group == "required"
    raise KeyError(f"{class_type} has no input {name!r}")


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def test_every_reference_workflow_is_there():
    assert set(names()) == EXPECTED
    for name in EXPECTED:
        assert (WORKFLOWS / "api" / f"{name}.json").is_file(), name
        from PIL import Image

        with Image.open(WORKFLOWS / f"{name}.jpg") as im:
            assert im.format == "JPEG" and im.width >= 256 and im.height >= 100


def test_node_definitions_cover_every_pack_node():
    """The recorded definitions list exactly the node ids the pack's modules declare."""
    declared = set()
    for path in (REPO / "nodes").glob("*.py"):
        declared |= set(re.findall(r'node_id="(RefDiff\w+)"', path.read_text(encoding="utf-8")))
    assert declared == {n for n in OBJECT_INFO if n.startswith("RefDiff")}
    for name in declared:
        assert OBJECT_INFO[name]["category"] == "RefDiff"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_api_graph_uses_known_nodes_and_inputs(name):
    graph = load(WORKFLOWS / "api" / f"{name}.json")
    assert any(OBJECT_INFO[n["class_type"]].get("output_node") for n in graph.values()), "no output node"
    for node_id, node in graph.items():
        class_type = node["class_type"]
        assert class_type in OBJECT_INFO, f"{name}: unknown node {class_type}"
        info = OBJECT_INFO[class_type]
        known = set(info["input"].get("required", {})) | set(info["input"].get("optional", {}))
        assert set(node["inputs"]) <= known, f"{name} #{node_id}: unknown inputs {set(node['inputs']) - known}"
        missing = set(info["input"].get("required", {})) - set(node["inputs"])
        assert not missing, f"{name} #{node_id} {class_type}: missing required inputs {missing}"
        for input_name, value in node["inputs"].items():
            kind, options, _ = spec_of(class_type, input_name)
            if is_link(value):
                source = graph[value[0]]["class_type"]
                out_type = OBJECT_INFO[source]["output"][value[1]]
                assert kind in (out_type, "*"), f"{name} #{node_id}.{input_name}: {out_type} into {kind}"
            elif kind == "COMBO" and (class_type, input_name) not in MODEL_LISTS:
                assert value in options["options"], f"{name} #{node_id}.{input_name}: {value!r}"
            elif kind in ("INT", "FLOAT"):
                assert options.get("min", -1e30) <= value <= options.get("max", 1e30), (name, node_id, input_name)
            elif kind not in WIDGET_TYPES:
                raise AssertionError(f"{name} #{node_id}.{input_name}: a {kind} input needs a link")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ui_and_api_twins_agree(name):
    ui = load(WORKFLOWS / f"{name}.json")
    api = load(WORKFLOWS / "api" / f"{name}.json")
    assert ui["version"] == 0.4 and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(nodes) == set(api)
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"]) == ui["last_link_id"]
    for node_id, node in nodes.items():
        assert node["type"] == api[node_id]["class_type"]
        api_links = {k: v for k, v in api[node_id]["inputs"].items() if is_link(v)}
        ui_links = {}
        for slot, entry in enumerate(node["inputs"]):
            if entry["link"] is None:
                continue
            link_id, src, src_slot, dst, dst_slot, kind = links[entry["link"]]
            assert (dst, dst_slot) == (int(node_id), slot)
            assert kind == nodes[str(src)]["outputs"][src_slot]["type"]
            assert link_id in nodes[str(src)]["outputs"][src_slot]["links"]
            ui_links[entry["name"]] = [str(src), src_slot]
        assert ui_links == api_links, f"{name} #{node_id}"
        widgets = []
        info = OBJECT_INFO[node["type"]]
        for input_name in info["input_order"].get("required", []) + info["input_order"].get("optional", []):
            kind, options, _ = spec_of(node["type"], input_name)
            if kind in WIDGET_TYPES and input_name in api[node_id]["inputs"] and not is_link(api[node_id]["inputs"][input_name]):
                widgets.append(api[node_id]["inputs"][input_name])
                if options.get("control_after_generate"):
                    widgets.append("fixed")
                if options.get("image_upload"):
                    widgets.append("image")
        assert node["widgets_values"] == widgets, f"{name} #{node_id}"


def test_files_are_what_the_builder_writes():
    builder = _builder()
    for name, graph in builder.graphs().items():
        assert load(WORKFLOWS / "api" / f"{name}.json") == graph, f"rebuild {name}: python {builder.__file__}"
        assert load(WORKFLOWS / f"{name}.json") == builder.to_ui(graph, OBJECT_INFO), name


def test_ablations_differ_only_where_docs_say():
    """G swaps SAM for threshold proposals and drops s_D; GS drops s_D; DS drops the generative chain."""
    kinds = {name: sorted(n["class_type"] for n in load(WORKFLOWS / "api" / f"{name}.json").values())
             for name in EXPECTED}
    full = set(kinds["ref-diff"])
    assert "RefDiffThresholdProposals" in kinds["ref-diff-G"] and "RefDiffSAMProposals" not in kinds["ref-diff-G"]
    assert "RefDiffCLIPScore" not in kinds["ref-diff-GS"] and "RefDiffGenerativeScore" in kinds["ref-diff-GS"]
    assert "RefDiffCaptureAttention" not in kinds["ref-diff-DS"] and "RefDiffCLIPScore" in kinds["ref-diff-DS"]
    assert set(kinds["ref-diff-GS"]) < full and set(kinds["ref-diff-DS"]) < full
    sam_clip = load(WORKFLOWS / "api" / "sam-clip.json")
    scorer = next(n for n in sam_clip.values() if n["class_type"] == "RefDiffCLIPScore")
    assert scorer["inputs"]["mode"] == "sam-clip"


def test_sibling_workflows_swap_only_their_stage():
    """G-refine is G with the refined map (capture at every level, with self-attention); clusters is the full
    graph with feature-cluster proposals in place of SAM's, feeding s_G, s_D and the fusion."""
    kinds = {name: sorted(n["class_type"] for n in load(WORKFLOWS / "api" / f"{name}.json").values())
             for name in EXPECTED}
    refine = load(WORKFLOWS / "api" / "ref-diff-G-refine.json")
    assert "RefDiffSelfAttentionRefine" in kinds["ref-diff-G-refine"]
    assert not {"RefDiffGenerativeMap", "RefDiffCLIPScore"} & set(kinds["ref-diff-G-refine"])
    capture = next(n for n in refine.values() if n["class_type"] == "RefDiffCaptureAttention")
    assert capture["inputs"]["factor"] == 0 and capture["inputs"]["self_attention"] is True
    refined = next(k for k, n in refine.items() if n["class_type"] == "RefDiffSelfAttentionRefine")
    for consumer in ("RefDiffThresholdProposals", "RefDiffGenerativeScore"):
        node = next(n for n in refine.values() if n["class_type"] == consumer)
        assert node["inputs"]["c"] == [refined, 0], consumer
    clusters = load(WORKFLOWS / "api" / "ref-diff-clusters.json")
    assert "RefDiffSAMProposals" not in kinds["ref-diff-clusters"]
    assert set(kinds["ref-diff-clusters"]) - {"RefDiffFeatureClusterProposals"} < set(kinds["ref-diff"])
    source = next(k for k, n in clusters.items() if n["class_type"] == "RefDiffFeatureClusterProposals")
    for consumer in ("RefDiffGenerativeScore", "RefDiffCLIPScore", "RefDiffFuseSelect"):
        node = next(n for n in clusters.values() if n["class_type"] == consumer)
        assert node["inputs"]["proposals"] == [source, 0], consumer


def test_node_reference_documents_every_node_and_input():
    doc = (REPO / "docs" / "NODES.md").read_text(encoding="utf-8")
    for name, info in OBJECT_INFO.items():
        if not name.startswith("RefDiff"):
            continue
        section = doc.split(f"### {name}", 1)
        assert len(section) == 2, f"docs/NODES.md has no section for {name}"
        body = section[1].split("\n### ", 1)[0]
        for input_name in info["input_order"].get("required", []) + info["input_order"].get("optional", []):
            assert f"`{input_name}`" in body, f"docs/NODES.md: {name} does not mention input {input_name}"
