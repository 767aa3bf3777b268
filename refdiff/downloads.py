"""Where refdiff keeps the published SAM checkpoint it downloads when none is named (torch-free, so the
command line's --help can state it): one wording for the loader's messages, the help and the docs."""
from __future__ import annotations

SAM_DIR_ENV = "REFDIFF_SAM_DIR"  # set: the folder SAM checkpoints are downloaded to and looked up in
SAM_DEFAULT_DIR = "~/.cache/torch/hub/checkpoints"  # torch hub's checkpoints folder when $TORCH_HOME is unset
SAM_DOWNLOAD_NOTE = (f"${SAM_DIR_ENV} if set, else torch hub's checkpoints folder ($TORCH_HOME/hub/checkpoints, "
                     f"by default {SAM_DEFAULT_DIR})")

__all__ = ["SAM_DIR_ENV", "SAM_DEFAULT_DIR", "SAM_DOWNLOAD_NOTE"]
