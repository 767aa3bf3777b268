"""The nodes take their devices from ComfyUI's model management (nodes/runtime.py), never from a device name
written in the code: every place a node module names a device ("cuda", "mps", "xpu", "cpu", .cuda(), .cpu(),
torch.device(...)) is listed here with the reason it is right (outputs and payloads that live on the CPU by
contract, CPU-side previews), and nothing else may name one."""
from __future__ import annotations

import ast
from pathlib import Path

NODES = Path(__file__).resolve().parents[1] / "nodes"
DEVICE_NAMES = {"cuda", "mps", "xpu", "cpu", "meta", "hip", "npu", "xla"}
DEVICE_METHODS = {"cuda", "cpu", "mps", "xpu"}

# (file, function) -> why naming the CPU there is right. Nothing here names a GPU.
ALLOWED = {
    ("runtime.py", "on_compute_device"): "compares ComfyUI's compute device with the CPU: memory is freed only off it",
    ("sam_nodes.py", "sam_proposal_batch"): "REFDIFF_PROPOSALS hold CPU masks (the wire type's contract)",
    ("sam_nodes.py", "prompted_proposal_batch"): "REFDIFF_PROPOSALS hold CPU masks (the wire type's contract)",
    ("sam3_nodes.py", "concept_proposal_batch"): "REFDIFF_PROPOSALS and REFDIFF_SCORES hold CPU masks and scores",
    ("clip_nodes.py", "clip_score_batch"): "REFDIFF_SCORES hold CPU scores (the wire type's contract)",
    ("spatial_scores.py", "spatial_score_batch"): "REFDIFF_SCORES hold CPU scores (the wire type's contract)",
    ("feature_clusters.py", "cluster_image"): "REFDIFF_PROPOSALS hold CPU masks",
    ("tensors.py", "images_to_rgb"): "the library's images are numpy uint8 arrays, which live on the CPU",
    ("tensors.py", "masks_to_output"): "a MASK output goes to the CPU",
    ("tensors.py", "mask_maps"): "maps read from a MASK input are brought to the CPU, where proposals live",
    ("previews.py", "heatmap"): "preview IMAGE outputs are drawn on the CPU",
    ("previews.py", "overlay"): "preview IMAGE outputs are drawn on the CPU",
    ("previews.py", "thumb_image"): "thumbnails are drawn on the CPU and saved as PNG",
    ("previews.py", "thumb_masks"): "thumbnails are drawn on the CPU and saved as PNG",
    ("previews.py", "heat_frames"): "preview IMAGE outputs are drawn on the CPU",
    ("previews.py", "mask_frames"): "preview IMAGE outputs are drawn on the CPU",
    ("previews.py", "save_thumbnails"): "thumbnails are written as PNG files from CPU pixels",
}


def device_mentions(path: Path) -> list[tuple[str, int, str]]:
    """(enclosing function, line, what) for every device name a module writes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.split(":")[0].lower() in DEVICE_NAMES:
                found.append((function, node.lineno, repr(node.value)))
        if isinstance(node, ast.Attribute) and node.attr in DEVICE_METHODS:
            found.append((function, node.lineno, f".{node.attr}"))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def all_mentions() -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for path in sorted(NODES.glob("*.py")):
        for function, line, what in device_mentions(path):
            out.setdefault((path.name, function), []).append(f"{path.name}:{line} {what}")
    return out


def test_scanner_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('import torch\n\ndef f(x):\n    return x.cuda(), x.to("mps"), torch.device("cuda:1")\n\n'
                      'def g(x):\n    return x.to(device="cpu"), x.cpu(), x.float()\n', encoding="utf-8")
    assert [(f, what) for f, _, what in device_mentions(sample)] == [
        ("f", ".cuda"), ("f", "'mps'"), ("f", "'cuda:1'"), ("g", "'cpu'"), ("g", ".cpu")]


def test_no_node_names_a_device_but_the_listed_cpu_outputs():
    mentions = all_mentions()
    unexplained = {key: where for key, where in mentions.items() if key not in ALLOWED}
    assert not unexplained, ("device names in nodes/ (take the device from nodes/runtime.py, or list the CPU "
                             f"output here with its reason): {unexplained}")
    gpu = [w for where in mentions.values() for w in where if "cpu" not in w.lower()]
    assert not gpu, f"a GPU device is named in nodes/: {gpu}"


def test_every_listed_reason_is_still_needed():
    mentions = all_mentions()
    assert [key for key in ALLOWED if key not in mentions] == []
