"""refdiff: zero-shot referring image segmentation with generative models (Ref-Diff)."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import OFFICIAL, PAPER, Preset, get_preset, get_variant  # noqa: E402
from .errors import DependencyError, InputError, ModelLoadError, RefDiffError  # noqa: E402

__all__ = ["__version__", "Preset", "OFFICIAL", "PAPER", "get_preset", "get_variant", "RefDiffError",
           "InputError", "ModelLoadError", "DependencyError"]
