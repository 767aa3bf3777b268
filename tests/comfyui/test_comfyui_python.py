"""The scripts the ComfyUI tests run with ComfyUI's Python (make_models.py, inprocess_checks.py) find the refdiff
library the way the pack does: in an environment with only ComfyUI's requirements (refdiff not installed,
no PYTHONPATH), the repository root is put on the import path."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from comfy_helpers import COMFYUI_PATH, HERE, REPO, child_env

# Run a script as `python SCRIPT ARGS` would, in an interpreter from which every installed copy of refdiff is
# hidden (the editable install's finder, path entries holding a refdiff package): what ComfyUI's own venv
# with only its requirements.txt sees.
WITHOUT_INSTALLED_REFDIFF = """
import importlib.util, os, runpy, sys
script, args = sys.argv[1], sys.argv[2:]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p
               and not os.path.isfile(os.path.join(p or ".", "refdiff", "__init__.py"))]
importlib.invalidate_caches()
assert importlib.util.find_spec("refdiff") is None, "refdiff is still importable"
sys.argv = [script, *args]
sys.path[0] = os.path.dirname(script)
runpy.run_path(script, run_name="__main__")
print("refdiff from", sys.modules["refdiff"].__file__)
"""


def test_make_models_finds_the_library_without_an_install(tmp_path):
    """Only the SAM and CLIP files need the library: the two others are present, so only those are written."""
    for folder, name in (("checkpoints", "refdiff_test_sd15.safetensors"),
                         ("diffusion_models", "refdiff_test_sd2_unet.safetensors")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"")
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_INSTALLED_REFDIFF, str(HERE / "make_models.py"),
                           str(tmp_path)], cwd=COMFYUI_PATH, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sams" / "refdiff_test_sam.pth").stat().st_size > 0
    assert (tmp_path / "open_clip" / "refdiff_test_clip.safetensors").stat().st_size > 0
    assert (tmp_path / "open_clip" / "refdiff_test_clip.json").is_file()
    used = Path(proc.stdout.strip().splitlines()[-1].split("refdiff from ", 1)[1])
    assert used == REPO / "refdiff" / "__init__.py"
