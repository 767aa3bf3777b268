"""refdiff: zero-shot referring image segmentation with generative models (Ref-Diff)."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .config import OFFICIAL, PAPER, Preset, get_preset, get_variant  # noqa: E402
from .errors import DependencyError, InputError, ModelLoadError, RefDiffError  # noqa: E402

# Loaded on first access, so that ``import refdiff`` stays cheap (no torch import for the presets alone).
_LAZY: dict[str, str] = {"RefDiff": "pipeline", "Result": "pipeline"}


def __getattr__(name: str) -> Any:
    """``refdiff.RefDiff`` / ``refdiff.Result`` (from refdiff.pipeline), imported on first use."""
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "Preset", "OFFICIAL", "PAPER", "get_preset", "get_variant", "RefDiffError",
           "InputError", "ModelLoadError", "DependencyError", "RefDiff", "Result"]
