"""``python -m refdiff.evaluation`` (also ``torchrun -m refdiff.evaluation``): the `refdiff eval` command."""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
