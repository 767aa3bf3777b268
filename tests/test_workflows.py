"""The reference workflows (workflows/*.json, UI format; workflows/api/*.json, API format) without ComfyUI:
valid JSON, every node type and input known (RefDiff nodes and core nodes, from the node definitions recorded
in tests/comfyui/object_info.json, which the ComfyUI tests keep equal to the running pack), links typed
correctly, UI and API twins in agreement, thumbnails present, the files equal to what
tests/comfyui/build_workflows.py writes, a layout without overlaps, a note saying what each workflow is, and
the example image they load shipped with the pack (and copied into an input folder without overwriting)."""
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
MODEL_LISTS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"), ("RefDiffSAMLoader", "sam_name"), ("RefDiffSAM3Loader", "sam3_name"),
               ("RefDiffCLIPLoader", "clip_name"), ("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"),
               ("DualCLIPLoader", "clip_name2"), ("VAELoader", "vae_name")}
EXPECTED = {"ref-diff", "ref-diff-G", "ref-diff-GS", "ref-diff-DS", "sam-clip", "ref-diff-inpainting",
            "ref-diff-G-refine", "ref-diff-clusters", "ref-diff-prompted", "ref-diff-external-masks",
            "ref-diff-spatial", "ref-diff-sam3", "ref-diff-flux", "ref-diff-sdxl"}
NOTE = "MarkdownNote"  # a note of the frontend: in the UI workflow only, never sent to the server
EXAMPLE = REPO / "assets" / "refdiff-example.png"


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
    nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] != NOTE}
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
    uis = builder.ui_workflows(OBJECT_INFO)
    for name, graph in builder.graphs().items():
        assert load(WORKFLOWS / "api" / f"{name}.json") == graph, f"rebuild {name}: python {builder.__file__}"
        assert load(WORKFLOWS / f"{name}.json") == uis[name], f"rebuild {name}: python {builder.__file__}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nodes_do_not_overlap(name):
    """Frames (title bar included, 30 px above pos) of the saved layout are disjoint, with a gap."""
    boxes = [(n["title"], n["pos"][0], n["pos"][1] - 30, n["size"][0], n["size"][1] + 30)
             for n in load(WORKFLOWS / f"{name}.json")["nodes"]]
    for i, (ta, xa, ya, wa, ha) in enumerate(boxes):
        for tb, xb, yb, wb, hb in boxes[i + 1:]:
            apart = xa + wa + 20 <= xb or xb + wb + 20 <= xa or ya + ha + 20 <= yb or yb + hb + 20 <= ya
            assert apart, f"{name}: {ta!r} and {tb!r} overlap"


def test_previews_and_text_boxes_have_room():
    """Nodes that show an image or a multi-line text after a run are taller than their widgets alone need: the
    full graph's preview of the selected mask, its score table, the text box of the expression."""
    nodes = {n["title"]: n for n in load(WORKFLOWS / "ref-diff.json")["nodes"]}
    preview = nodes["Selected mask over the image"]["size"]
    assert preview[1] >= 20 + 0.75 * preview[0]  # the 4:3 example image at the node's width
    assert nodes["Ranked proposals"]["size"][1] >= 200 and nodes["Ranked proposals"]["size"][0] >= 500
    parse = nodes["Parse the referring expression"]
    assert parse["size"][1] >= 2 * 20 + 6 + 3 * 24 + 80  # 2 slot rows, 3 one-line widgets, the text box


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_workflow_opens_with_a_note_saying_what_it_is(name):
    builder = _builder()
    template = builder.TEMPLATES[name]
    notes = [n for n in load(WORKFLOWS / f"{name}.json")["nodes"] if n["type"] == NOTE]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert template.title in text and template.description in text and "refdiff-example.png" in text
    assert name.replace("-", " ") not in template.description  # a sentence, not the file name again


def test_node_reference_lists_each_workflows_description():
    doc = (REPO / "docs" / "NODES.md").read_text(encoding="utf-8")
    for name, template in _builder().TEMPLATES.items():
        assert f"| `{name}` | {template.description} |" in doc, name


def test_ablation_notes_name_the_wire_the_graph_lacks():
    """Where a description says which FuseSelect input was cut, the graph has no link into that input, and
    the full graph has both."""
    builder = _builder()
    for name in EXPECTED:
        fuse = [n for n in load(WORKFLOWS / "api" / f"{name}.json").values() if n["class_type"] == "RefDiffFuseSelect"]
        description = builder.TEMPLATES[name].description
        for wire in ("generative", "discriminative"):
            if f"{wire} score wire" in description or f"score wire into FuseSelect's {wire}" in description:
                assert fuse and wire not in fuse[0]["inputs"], (name, wire)
    full = next(n for n in load(WORKFLOWS / "api" / "ref-diff.json").values() if n["class_type"] == "RefDiffFuseSelect")
    assert {"generative", "discriminative"} <= set(full["inputs"])
    cut = {name for name in EXPECTED if "Cut from the full graph" in builder.TEMPLATES[name].description}
    assert cut == EXPECTED - {"ref-diff", "ref-diff-inpainting", "ref-diff-flux", "ref-diff-sdxl"}


def test_workflows_load_the_shipped_example_image():
    """Every LoadImage asks for assets/refdiff-example.png, the picture assets/make_example.py draws."""
    import numpy as np
    from PIL import Image

    for name in EXPECTED:
        for node in load(WORKFLOWS / "api" / f"{name}.json").values():
            if node["class_type"] == "LoadImage":
                assert node["inputs"]["image"] == EXAMPLE.name, name
    spec = importlib.util.spec_from_file_location("refdiff_make_example", REPO / "assets" / "make_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with Image.open(EXAMPLE) as im:
        shipped = np.asarray(im.convert("RGB"))
    assert np.array_equal(shipped, np.asarray(module.draw_example())), "rerun python assets/make_example.py"
    left, right = shipped[:, :256], shipped[:, 256:]
    brown = (shipped[..., 0] > 100) & (shipped[..., 0] < 150) & (shipped[..., 2] < 60)  # the brown coat
    assert brown[:, :256].sum() > 3000 and brown[:, 256:].sum() == 0  # the brown horse is the one on the left
    assert left.shape == right.shape


def _example_module():
    spec = importlib.util.spec_from_file_location("refdiff_example_image", REPO / "nodes" / "example_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_image_is_copied_once_and_never_over_a_users_file(tmp_path):
    example = _example_module()
    assert example.EXAMPLE_IMAGE == EXAMPLE.name and Path(example.EXAMPLE_SOURCE) == EXAMPLE
    written = example.install_example_image(str(tmp_path / "input"))
    assert written == str(tmp_path / "input" / EXAMPLE.name)
    assert Path(written).read_bytes() == EXAMPLE.read_bytes()
    assert example.install_example_image(str(tmp_path / "input")) is None  # already there
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / EXAMPLE.name).write_bytes(b"the user's own picture")
    assert example.install_example_image(str(mine)) is None
    assert (mine / EXAMPLE.name).read_bytes() == b"the user's own picture"
    assert sorted(p.name for p in mine.iterdir()) == [EXAMPLE.name]  # no partial file left


def test_no_other_folder_shadows_the_templates():
    """ComfyUI serves a pack's templates from the first of these folders it finds (app/custom_node_manager.py):
    any of them beside workflows/ would answer the template requests in its place."""
    for folder in ("example_workflows", "example", "examples", "workflow"):
        assert not (REPO / folder).exists(), f"{folder}/ would hide workflows/ from ComfyUI's template browser"


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


def test_prompted_workflow_feeds_c_to_prompted_sam():
    prompted = load(WORKFLOWS / "api" / "ref-diff-prompted.json")
    kinds = {n["class_type"] for n in prompted.values()}
    assert "RefDiffSAMProposals" not in kinds and "RefDiffPromptedSAM" in kinds
    source = next(k for k, n in prompted.items() if n["class_type"] == "RefDiffPromptedSAM")
    gen_map = next(k for k, n in prompted.items() if n["class_type"] == "RefDiffGenerativeMap")
    assert prompted[source]["inputs"]["c"] == [gen_map, 0]
    for consumer in ("RefDiffGenerativeScore", "RefDiffCLIPScore", "RefDiffFuseSelect"):
        node = next(n for n in prompted.values() if n["class_type"] == consumer)
        assert node["inputs"]["proposals"] == [source, 0], consumer


def test_flux_workflow_is_the_full_graph_on_flux_loaders():
    """ref-diff-flux: the full graph's nodes with the checkpoint loader replaced by Flux's three loaders, which
    feed the capture (MODEL, CLIP), the parse (CLIP) and VAEEncode (VAE); the capture reads joint attention."""
    flux = load(WORKFLOWS / "api" / "ref-diff-flux.json")
    full = load(WORKFLOWS / "api" / "ref-diff.json")
    kinds = sorted(n["class_type"] for n in flux.values())
    assert sorted(kinds) == sorted([n["class_type"] for n in full.values() if n["class_type"] != "CheckpointLoaderSimple"]
                                   + ["UNETLoader", "DualCLIPLoader", "VAELoader"])
    ids = {n["class_type"]: k for k, n in flux.items()}
    capture = flux[ids["RefDiffCaptureAttention"]]["inputs"]
    assert capture["model"] == [ids["UNETLoader"], 0] and capture["clip"] == [ids["DualCLIPLoader"], 0]
    assert flux[ids["RefDiffParseText"]]["inputs"]["clip"] == [ids["DualCLIPLoader"], 0]
    assert flux[ids["VAEEncode"]]["inputs"]["vae"] == [ids["VAELoader"], 0]
    assert flux[ids["DualCLIPLoader"]]["inputs"]["type"] == "flux"
    assert (capture["map_kind"], capture["dit_blocks"], capture["flow_t"]) == ("attention", "last4", 0.25)


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
