"""Command line: ``refdiff segment`` (one image, one expression) and ``refdiff eval`` (RefCOCO benchmarks)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .eval import add_eval_arguments, run_eval
from .options import HelpFormatter
from .segment import add_segment_arguments, run_segment

COMMANDS = {"segment": run_segment, "eval": run_eval}


def build_parser() -> argparse.ArgumentParser:
    """The `refdiff` parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="refdiff", description="Zero-shot referring image segmentation (Ref-Diff).")
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment the object a referring expression names in one image",
                         formatter_class=HelpFormatter)
    add_segment_arguments(seg)
    ev = sub.add_parser("eval", help="evaluate on RefCOCO / RefCOCO+ / RefCOCOg (the paper's tables)",
                        formatter_class=HelpFormatter)
    add_eval_arguments(ev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `refdiff`: parse, run the subcommand, return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("refdiff: interrupted", file=sys.stderr)
        return 130
