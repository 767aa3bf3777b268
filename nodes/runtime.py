"""How the nodes run inside ComfyUI: the pack's log, the progress bar and Cancel, warnings in the console and
on the node, and where the pack's own models (SAM, CLIP) and results are placed (ComfyUI's compute, offload and
intermediate devices).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

import comfy.model_management as mm
import comfy.utils
from comfy_execution.utils import get_executing_context

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


# -------------------------------------------------------------------------------- telling the user
def warn(messages: Sequence[str]) -> None:
    """Each message as a warning in ComfyUI's console (the pack's log)."""
    for message in messages:
        LOG.warning("[RefDiff] %s", message)


def show_on_node(messages: Sequence[str]) -> None:
    """Show the messages on the running node, in ComfyUI's own text preview under its widgets (as the core
    image-size node does); nothing when there are none or no node is running (a script, a test)."""
    context = get_executing_context()
    if not messages or context is None:
        return
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_progress_text("\n".join(f"warning: {m}" for m in messages), context.node_id)


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


__all__ = ["LOG", "Progress", "check_interrupt", "warn", "show_on_node", "compute_device", "offload_device",
           "module_bytes", "on_compute_device", "intermediate"]
