"""The example image of the reference workflows (assets/refdiff-example.png), put into ComfyUI's input folder
so that LoadImage finds it. Imports no ComfyUI module: the caller passes the folder."""
from __future__ import annotations

import os
import shutil

EXAMPLE_IMAGE = "refdiff-example.png"
EXAMPLE_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", EXAMPLE_IMAGE)


def install_example_image(input_dir: str, source: str = EXAMPLE_SOURCE) -> str | None:
    """Copy the example image into ``input_dir`` unless a file of that name is there (never overwritten);
    returns the path written, or None when nothing was copied."""
    target = os.path.join(input_dir, os.path.basename(source))
    if os.path.exists(target):
        return None
    os.makedirs(input_dir, exist_ok=True)
    partial = target + ".partial"
    shutil.copyfile(source, partial)
    os.replace(partial, target)  # never a half-written image under the real name
    return target
