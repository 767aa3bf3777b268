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
CLIP_FOLDER = "open_clip"


def register_model_folders() -> None:
    """Add models/sams and models/open_clip to ComfyUI's model folders (keeping extra_model_paths entries)."""
    for name in (SAM_FOLDER, CLIP_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)


def weight_files(folder: str) -> list[str]:
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


__all__ = ["WEIGHT_SUFFIXES", "SAM_FOLDER", "CLIP_FOLDER", "register_model_folders", "weight_files", "folder_hint",
           "resolve_model_file", "missing_file_message"]
