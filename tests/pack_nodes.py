"""Import the pack's ComfyUI-free node modules (nodes/wire_types.py, tensors.py, previews.py, ...) in tests without
ComfyUI."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

NODES_DIR = Path(__file__).resolve().parents[1] / "nodes"
PACKAGE = "refdiff_pack_nodes"


def load_node_module(name: str) -> ModuleType:
    """Import nodes/<name>.py as part of a package of its own (the pack's folder is not on sys.path)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, NODES_DIR / "__init__.py",
                                                      submodule_search_locations=[str(NODES_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.{name}")
