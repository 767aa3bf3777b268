"""The pack's model folders in ComfyUI (models/sams, models/open_clip): registering them, listing their weight
files for a combo, resolving a chosen file, and the message naming a missing one and where to put it.
"""
from __future__ import annotations

import os

import folder_paths

from refdiff.errors import ModelLoadError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")

# Model folders of the pack: ComfyUI/models/sams (shared with other SAM packs) and ComfyUI/models/open_clip.
SAM_FOLDER = "sams"
SAM2_FOLDER = "sam2"  # SAM 2 / 2.1 checkpoints, where ComfyUI-segment-anything-2 keeps them
CLIP_FOLDER = "open_clip"
SAM3_FOLDER = "sam3"  # SAM 3 image models (Meta's sam3.pt or a .safetensors of it)


def register_model_folders() -> None:
    """Add models/sams, models/sam2, models/sam3 and models/open_clip to ComfyUI's model folders (keeping
    extra_model_paths entries)."""
    for name in (SAM_FOLDER, SAM2_FOLDER, SAM3_FOLDER, CLIP_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)


def weight_files(folder: str) -> list[str]:
    """Weight files in a registered model folder (sub-folders included), for a combo."""
    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    return [n for n in names if n.lower().endswith(WEIGHT_SUFFIXES)]


def sam_files() -> list[str]:
    """SAM checkpoints of models/sams, then those of models/sam2 not already listed (same name: sams wins)."""
    names = weight_files(SAM_FOLDER)
    return names + [n for n in weight_files(SAM2_FOLDER) if n not in names]


def resolve_sam_file(name: str, what: str, where_to_get: str) -> str:
    """Full path of a SAM checkpoint in models/sams or models/sam2; ModelLoadError naming both folders."""
    for folder in (SAM_FOLDER, SAM2_FOLDER):
        try:
            path = folder_paths.get_full_path(folder, name) if name else None
        except KeyError:
            path = None
        if path is not None and os.path.isfile(path):
            return path
    raise ModelLoadError(f"{what} file {name!r} not found; put it in {folder_hint(SAM_FOLDER)} (SAM) or "
                         f"{folder_hint(SAM2_FOLDER)} (SAM 2 / 2.1), then press R in ComfyUI to refresh the list. "
                         f"{where_to_get}")


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


__all__ = ["WEIGHT_SUFFIXES", "SAM_FOLDER", "SAM2_FOLDER", "SAM3_FOLDER", "CLIP_FOLDER", "sam_files", "resolve_sam_file", "register_model_folders", "weight_files", "folder_hint",
           "resolve_model_file", "missing_file_message"]
