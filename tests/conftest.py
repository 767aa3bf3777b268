"""Test-wide settings: no network, no writes to the user's cache folder, deterministic torch."""
from __future__ import annotations

import os
import tempfile

# Set before any refdiff / hub library import reads them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "REFDIFF_CACHE_DIR" not in os.environ:
    os.environ["REFDIFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="refdiff-test-cache-")
