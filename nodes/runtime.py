"""How the nodes run inside ComfyUI: the pack's log, the progress bar and Cancel, and where the pack's own
models (SAM, CLIP) and results are placed (ComfyUI's compute, offload and intermediate devices).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

import comfy.model_management as mm
import comfy.utils

LOG = logging.getLogger("refdiff")


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


__all__ = ["LOG", "Progress", "check_interrupt", "compute_device", "offload_device", "module_bytes",
           "on_compute_device", "intermediate"]
