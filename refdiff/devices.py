"""Device and dtype resolution, in one place: names -> torch.device / torch.dtype, the defaults (cuda when
available; fp16 on cuda, fp32 elsewhere), device comparison and where a model's weights live.

Every loader, the offload helpers and ``RefDiff`` resolve devices and dtypes here, so a name means the same
thing everywhere and a bad one raises the same InputError.
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import InputError

# Names accepted for a dtype (lower case, without a "torch." prefix).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
# Dtypes model weights may be loaded in (resolve_dtype).
WEIGHT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """A torch.device from a name such as "cuda:0" (None stays None); InputError naming the value otherwise."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(str(device).strip())
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc


def as_device(device: str | torch.device) -> torch.device:
    """``parse_device`` for a device that must be named (InputError for None)."""
    parsed = parse_device(device)
    if parsed is None:
        raise InputError("device is None here; name one: 'cpu', 'cuda' or 'cuda:N'")
    return parsed


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: the given one (InputError if it is cuda and CUDA is absent), else the default."""
    dev = default_device() if device is None else as_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available here; use device='cpu'")
    return dev


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Whether two devices are the same place ("cuda" and "cuda:0" count as one when CUDA's current is 0)."""
    a, b = as_device(a), as_device(b)
    if a.type != b.type:
        return False
    if a.index == b.index:
        return True
    current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a dtype or a name of DTYPE_NAMES ("fp16", " BF16 ", "torch.float32"); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r}; use 'fp16', 'bf16' or 'fp32'")
    return DTYPE_NAMES[key]


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> torch.dtype:
    """The weight dtype: the given one (fp16, bf16 or fp32), else fp16 on cuda and fp32 elsewhere (``device``
    None: the default device)."""
    if dtype is None:
        dev = default_device() if device is None else as_device(device)
        return torch.float16 if dev.type == "cuda" else torch.float32
    parsed = parse_dtype(dtype)
    if parsed not in WEIGHT_DTYPES:
        raise InputError(f"unsupported dtype {dtype}; use fp16, bf16 or fp32")
    return parsed


def module_device(model: Any) -> torch.device | None:
    """Where a model's weights live: its ``device`` attribute if it has one, else its first parameter or buffer."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None


__all__ = ["DTYPE_NAMES", "WEIGHT_DTYPES", "parse_device", "as_device", "default_device", "resolve_device",
           "same_device", "parse_dtype", "resolve_dtype", "module_device"]
