"""``python -m refdiff.cli``: the `refdiff` command."""
import sys

from . import main

sys.exit(main())
