"""Device and dtype resolution (refdiff.devices): names, defaults, comparisons, and that every caller uses it."""
from __future__ import annotations

import pytest
import torch

from refdiff import devices
from refdiff.errors import InputError


def test_resolve_dtype_strings_and_defaults() -> None:
    assert devices.resolve_dtype("fp16") is torch.float16
    assert devices.resolve_dtype(" BF16 ") is torch.bfloat16
    assert devices.resolve_dtype("float32") is torch.float32
    assert devices.resolve_dtype("torch.float16") is torch.float16
    assert devices.resolve_dtype(torch.float16) is torch.float16
    assert devices.resolve_dtype(None, "cuda") is torch.float16
    assert devices.resolve_dtype(None, "cuda:1") is torch.float16
    assert devices.resolve_dtype(None, "cpu") is torch.float32
    for bad in ("fp8", "int8", "", torch.int64):
        with pytest.raises(InputError, match="dtype"):
            devices.resolve_dtype(bad)


def test_parse_dtype_keeps_none_and_any_torch_dtype() -> None:
    assert devices.parse_dtype(None) is None
    assert devices.parse_dtype(torch.float64) is torch.float64  # CLIP may run in float64; SD weights may not
    assert devices.parse_dtype("half") is torch.float16
    with pytest.raises(InputError, match="int7"):
        devices.parse_dtype("int7")
    with pytest.raises(InputError, match="unsupported dtype"):
        devices.resolve_dtype(torch.float64)


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device(None) == torch.device("cuda")
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_dtype(None, None) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device(None) == torch.device("cpu")
    assert devices.resolve_dtype(None, None) is torch.float32
    with pytest.raises(InputError, match="CUDA is not available"):
        devices.resolve_device("cuda")
    with pytest.raises(InputError, match="gpu0"):
        devices.resolve_device("gpu0")


def test_parse_and_compare_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.parse_device(None) is None
    assert devices.parse_device(" cuda:2 ") == torch.device("cuda", 2)
    with pytest.raises(InputError, match="device is None"):
        devices.as_device(None)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="'tpu9'"):
        devices.as_device("tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.same_device("cuda", "cuda:0") and devices.same_device("cpu", torch.device("cpu"))
    assert not devices.same_device("cuda:1", "cuda") and not devices.same_device("cpu", "cuda")


def test_module_device() -> None:
    assert devices.module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert devices.module_device(torch.nn.Identity()) is None
    assert devices.module_device(object()) is None


def test_entry_points_resolve_names_through_devices() -> None:
    """A bad device name raises the same InputError from the SD loader and from RefDiff."""
    from refdiff import sd
    from refdiff.pipeline import RefDiff

    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        sd.load_sd("nowhere", device="gpu0")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        RefDiff(offload=True, device="gpu0")
