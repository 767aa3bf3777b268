"""What every node module shares inside ComfyUI: the custom socket types, preset choices, progress and
interrupts, device placement of the pack's own models (SAM, CLIP) and model folders.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from refdiff.config import PRESETS, Preset, get_preset
from refdiff.errors import ModelLoadError

from . import payloads

LOG = logging.getLogger("refdiff")
CATEGORY = "RefDiff"
PRESET_NAMES = list(PRESETS)  # ["official", "paper"]
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")

# Custom socket types (see docs/NODES.md for what each carries).
Attention = io.Custom(payloads.ATTENTION)
Parse = io.Custom(payloads.PARSE)
Proposals = io.Custom(payloads.PROPOSALS)
Scores = io.Custom(payloads.SCORES)
SamModel = io.Custom(payloads.SAM_MODEL)
ClipModel = io.Custom(payloads.CLIP_MODEL)

# Model folders of the pack: ComfyUI/models/sams (shared with other SAM packs) and ComfyUI/models/open_clip.
SAM_FOLDER = "sams"
CLIP_FOLDER = "open_clip"


def register_model_folders() -> None:
    """Add models/sams and models/open_clip to ComfyUI's model folders (keeping extra_model_paths entries)."""
    for name in (SAM_FOLDER, CLIP_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)


def model_files(folder: str) -> list[str]:
    """Weight files in a registered model folder (sub-folders included), for a combo."""
    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    return [n for n in names if n.lower().endswith(WEIGHT_SUFFIXES)]


def folder_hint(folder: str) -> str:
    """The folders ComfyUI searches for ``folder`` models, for error messages."""
    try:
        paths = folder_paths.get_folder_paths(folder)
    except KeyError:
        paths = [os.path.join(folder_paths.models_dir, folder)]
    return " or ".join(repr(p) for p in paths)


def resolve_model_file(folder: str, name: str, what: str, where_to_get: str) -> str:
    """Full path of a model file of a folder; ModelLoadError naming the file and where to put it."""
    path = folder_paths.get_full_path(folder, name) if name else None
    if path is None or not os.path.isfile(path):
        raise ModelLoadError(f"{what} file {name!r} not found; put it in {folder_hint(folder)} "
                             f"(then press R in ComfyUI to refresh the list). {where_to_get}")
    return path


def missing_file_message(folder: str, name: str, what: str, where_to_get: str) -> str | bool:
    """For validate_inputs: True when the file exists, else the message naming it and where to put it."""
    try:
        resolve_model_file(folder, name, what, where_to_get)
    except ModelLoadError as exc:
        return str(exc)
    return True


def preset_input(tooltip: str = "Which constants of the method to use: 'official' = the authors' released "
                               "code (bugs fixed), 'paper' = the equations as published.") -> Any:
    """The preset combo every node shares (official / paper)."""
    return io.Combo.Input("preset", options=PRESET_NAMES, default="official", tooltip=tooltip)


def preset(name: str) -> Preset:
    """The Preset of a combo value."""
    return get_preset(name)


# -------------------------------------------------------------------------------- progress/interrupts
class Progress:
    """ComfyUI's progress bar over a known number of units; each update also honours an interrupt."""

    def __init__(self, total: int) -> None:
        self.bar = comfy.utils.ProgressBar(max(1, int(total)))

    def step(self, n: int = 1) -> None:
        mm.throw_exception_if_processing_interrupted()
        self.bar.update(n)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


# -------------------------------------------------------------------------------- device placement
def compute_device() -> torch.device:
    """The device ComfyUI runs models on."""
    return mm.get_torch_device()


def offload_device() -> torch.device:
    """Where idle models wait (CPU unless ComfyUI keeps everything on the GPU)."""
    return mm.unet_offload_device()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (to free that much room before moving it)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@contextmanager
def on_compute_device(module: torch.nn.Module) -> Iterator[torch.device]:
    """Move a pack model to ComfyUI's compute device for the block (freeing room first), then offload it."""
    device = compute_device()
    if device.type != "cpu":
        mm.free_memory(int(module_bytes(module) * 1.3) + 256 * 1024 ** 2, device)
    module.to(device)
    try:
        yield device
    finally:
        module.to(offload_device())
        if device.type != "cpu":
            mm.soft_empty_cache()


def intermediate(x: torch.Tensor) -> torch.Tensor:
    """A result tensor on ComfyUI's intermediate device (the CPU by default)."""
    return x.to(mm.intermediate_device())


__all__ = ["LOG", "CATEGORY", "PRESET_NAMES", "Attention", "Parse", "Proposals", "Scores", "SamModel", "ClipModel",
           "SAM_FOLDER", "CLIP_FOLDER", "register_model_folders", "model_files", "folder_hint",
           "resolve_model_file", "missing_file_message", "preset_input", "preset", "Progress", "check_interrupt",
           "compute_device", "offload_device", "module_bytes", "on_compute_device", "intermediate"]
