"""Test-wide settings: no network, no writes to the user's cache folder, deterministic torch."""
from __future__ import annotations

import os
import tempfile

# Set before any refdiff / hub library import reads them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "REFDIFF_CACHE_DIR" not in os.environ:
    os.environ["REFDIFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="refdiff-test-cache-")


import numpy as np  # noqa: E402  (after the environment settings above)
import pytest  # noqa: E402

from tiny_runs import tiny_models, two_box_image  # noqa: E402


@pytest.fixture(scope="module")
def models() -> tuple:
    """Tiny random-weight SD, SAM and CLIP, built once per test module."""
    return tiny_models()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """The 45 x 67 two-box test image (red box on the left)."""
    return two_box_image()


@pytest.fixture()
def loud_loaders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model loader fails the test if called: an error must come before any model loads."""
    import refdiff.clip
    import refdiff.sam
    import refdiff.sd

    def loud(name: str):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} called before the bad input was reported")
        return fail

    for module, name in ((refdiff.sd, "load_sd"), (refdiff.sam, "load_sam"), (refdiff.clip, "load_clip")):
        monkeypatch.setattr(module, name, loud(name))
