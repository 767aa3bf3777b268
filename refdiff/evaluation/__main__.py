"""``python -m refdiff.evaluation`` (also ``torchrun -m refdiff.evaluation``): the `refdiff eval` command."""
from __future__ import annotations

import sys


def main() -> int:
    """Run `refdiff eval` from the command-line package (imported here only, so the library never needs it)."""
    from ..cli.eval import main as eval_main

    return eval_main()


if __name__ == "__main__":
    sys.exit(main())
