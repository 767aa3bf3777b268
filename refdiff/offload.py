"""Model placement for small GPUs: models idle on the CPU and visit the compute device only for their stage.

``on_device`` moves a model (a torch module, or anything with ``.to(device=...)`` such as a ClipScorer) to
the compute device for a block and back afterwards, even when the block raises. ``offload_sd`` keeps
``SDComponents.device`` at the compute device (stage code places its inputs there) while the UNet, VAE and
text encoder sit on the offload device; ``sd_on_device`` brings the named parts over for one stage.
Every move goes through ``move_to``, the one place that changes where a model lives; device names are
resolved by ``refdiff.devices``.
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from .devices import as_device, same_device
from .errors import InputError

SD_PARTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "text_encoder_2")
OFFLOAD_DEVICE = torch.device("cpu")


def sd_part(sd: Any, name: str) -> Any:
    """The model of a part name; "unet" is a diffusion transformer's ``transformer`` (refdiff.dit.FluxComponents)."""
    model = getattr(sd, name, None)
    return getattr(sd, "transformer", None) if model is None and name == "unet" else model


def move_to(model: Any, device: torch.device) -> None:
    """Move a model's weights to ``device`` in place (torch modules and ClipScorer both move in place)."""
    model.to(device=device)


def release_cache(device: torch.device) -> None:
    """Give the CUDA caching allocator's free blocks back after a model left ``device`` (no-op elsewhere)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def on_device(model: Any, device: str | torch.device,
              offload_device: str | torch.device = OFFLOAD_DEVICE) -> Iterator[torch.device]:
    """Move ``model`` to ``device`` for the block, then back to ``offload_device`` (also on exceptions).

    Nothing moves when the two devices are the same. Yields the compute device.
    """
    device, offload_device = as_device(device), as_device(offload_device)
    if same_device(device, offload_device):
        yield device
        return
    move_to(model, device)
    try:
        yield device
    finally:
        move_to(model, offload_device)
        release_cache(device)


@contextmanager
def all_on_device(models: Sequence[Any], device: str | torch.device,
                  offload_device: str | torch.device = OFFLOAD_DEVICE) -> Iterator[torch.device]:
    """``on_device`` for several models at once: in the listed order, back in reverse order."""
    with ExitStack() as stack:
        for model in models:
            stack.enter_context(on_device(model, device, offload_device))
        yield as_device(device)


def _check_parts(parts: Sequence[str]) -> None:
    unknown = [p for p in parts if p not in SD_PARTS]
    if unknown:
        raise InputError(f"unknown Stable Diffusion part(s) {unknown}; choose from {SD_PARTS}")


def offload_sd(sd: Any, device: str | torch.device, offload_device: str | torch.device = OFFLOAD_DEVICE) -> Any:
    """A copy of ``sd`` (SDComponents) whose ``device`` field is the compute ``device``, its models moved to
    ``offload_device``: inputs of every stage go to the compute device, idle weights stay off it."""
    device, offload_device = as_device(device), as_device(offload_device)
    for name in SD_PARTS:
        if sd_part(sd, name) is not None:  # text_encoder_2: SDXL and Flux only
            move_to(sd_part(sd, name), offload_device)
    release_cache(device)
    if dataclasses.is_dataclass(sd) and not isinstance(sd, type):
        return dataclasses.replace(sd, device=device)
    sd.device = device
    return sd


@contextmanager
def sd_on_device(sd: Any, parts: Sequence[str], offload_device: str | torch.device = OFFLOAD_DEVICE
                 ) -> Iterator[torch.device]:
    """Bring the named parts of an offloaded ``sd`` (e.g. ("unet", "text_encoder")) to ``sd.device`` for the
    block, then back to ``offload_device``."""
    _check_parts(parts)
    names = list(parts) + (["text_encoder_2"] if "text_encoder" in parts and "text_encoder_2" not in parts else [])
    models = [sd_part(sd, name) for name in names]
    with all_on_device([m for m in models if m is not None], sd.device, offload_device) as device:
        yield device


class OnDemand:
    """Context manager that moves a model to the compute device on the first ``need()`` inside the block, and
    back on exit only if it moved: a stage whose results are all cached moves nothing."""

    def __init__(self, model: Any, device: str | torch.device,
                 offload_device: str | torch.device = OFFLOAD_DEVICE) -> None:
        self.model, self.device, self.offload_device = model, as_device(device), as_device(offload_device)
        self._active = self._moved = False

    def need(self) -> None:
        """Make sure the model is on the compute device until the block ends."""
        if not self._active:
            raise InputError("OnDemand.need() was called outside its with-block")
        if not self._moved and not same_device(self.device, self.offload_device):
            move_to(self.model, self.device)
            self._moved = True

    def __enter__(self) -> Callable[[], None]:
        self._active, self._moved = True, False
        return self.need

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        if self._moved:
            self._moved = False
            move_to(self.model, self.offload_device)
            release_cache(self.device)


__all__ = ["SD_PARTS", "OFFLOAD_DEVICE", "move_to", "release_cache", "on_device", "all_on_device", "offload_sd",
           "sd_part", "sd_on_device", "OnDemand"]
