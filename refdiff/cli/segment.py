"""``refdiff segment``: the mask of the object a referring expression names in one image."""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SPATIAL_TERMS, VARIANT_HELP, VARIANTS, get_variant
from ..errors import InputError, RefDiffError, RefDiffWarning
from ..text import DEFAULT_NO_NOUN, NO_NOUN_POLICIES
from .options import add_shared_arguments, check_model_options, preset_overrides, report_error

PROG = "refdiff segment"


def variant_name(text: str) -> str:
    """--variant's value, lower-cased, once get_variant knows it (a base variant, with spatial terms after '+')."""
    try:
        get_variant(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip().lower()


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `refdiff segment`."""
    parser.add_argument("image", help="input image file (any format Pillow reads; grayscale/RGBA/16-bit converted)")
    parser.add_argument("text", help='referring expression, e.g. "the black horse jumping on the left"')
    parser.add_argument("-o", "--output", required=True, help="where to write the mask (PNG, white = selected)")
    parser.add_argument("--variant", default="full", type=variant_name,
                        metavar="{" + ",".join(sorted(VARIANTS)) + "}[+TERM...]",
                        help=VARIANT_HELP + " (case-insensitive); spatial terms beyond the paper added after '+': "
                             f"{', '.join(SPATIAL_TERMS)}, or spatial for all (full+ordinals, full+size+middle, "
                             "full+spatial)")
    parser.add_argument("--overlay", metavar="OUT.png", default=None, help="also write the image with the mask overlaid")
    parser.add_argument("--json", metavar="SCORES.json", default=None,
                        help="also write root token, direction, every proposal's scores, the choice and timings")
    parser.add_argument("--no-noun", default=DEFAULT_NO_NOUN, choices=sorted(NO_NOUN_POLICIES), dest="no_noun",
                        help="a text that names no object ('the one on the right', 'leftmost'): 'warn' (default) "
                             "runs it with an open target class (the attention map follows the root word, the "
                             "spatial terms rank all whole-object candidates) and prints the warning; 'error' stops "
                             "before any model loads and says what to add. An empty or punctuation-only text is "
                             "always refused")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")
    g = parser.add_argument_group("masks from another segmenter (instead of SAM's proposals)")
    g.add_argument("--proposals", metavar="MASKS", default=None,
                   help="score and choose among these masks of the image instead of SAM's: an .npz (its only array, "
                        "or the one named 'masks') or .npy file of masks [N, H, W] (bool, 0/1, 0/255, or floats in "
                        "[0, 1], inside where >= 0.5), or a folder of PNG masks (white = inside; read in natural "
                        "order, mask_2 before mask_10). Made by any segmenter (SAM 2, SAM 3, GroundingDINO + SAM, "
                        "a drawing); empty masks are left out with a warning. Variants full, GS, DS and sam-clip; no "
                        "SAM checkpoint is needed")
    g.add_argument("--proposals-resize", choices=("error", "nearest"), default="error",
                   help="masks of another size than the image: 'error' (default) stops and names both sizes; "
                        "'nearest' resizes them (nearest-neighbour) when the aspect ratio agrees")
    g.add_argument("--proposals-post-filter", action="store_true",
                   help="apply the preset's SAM post-filter (official: the 10 largest masks above an area) to the "
                        "given masks too (default: every given mask is a proposal)")
    add_shared_arguments(parser)


def check_outputs(args: argparse.Namespace) -> None:
    """Fail before the run on an output path that could not be written at its end (a folder, an unknown
    image extension)."""
    from PIL import Image

    Image.init()
    for option, path in (("-o/--output", args.output), ("--overlay", args.overlay), ("--json", args.json)):
        if path is None:
            continue
        if Path(path).is_dir():
            raise InputError(f"{option} {path}: is a folder; give a file name such as "
                             f"{'scores.json' if option == '--json' else 'mask.png'}")
        if option == "--json":
            continue
        ext = Path(path).suffix.lower()
        if Image.registered_extensions().get(ext) not in Image.SAVE:
            raise InputError(f"{option} {path}: cannot write an image with the extension {ext or '(none)'!r}; "
                             "end the name with .png")


def check_text(text: str, preset: str, overrides: dict[str, Any], no_noun: str) -> None:
    """Parse the expression with the preset's root rule and apply the no-noun policy before any model loads (an
    empty or punctuation-only text is refused here)."""
    from ..config import get_preset
    from ..text import check_root, parse_text

    rule = overrides.get("root_rule", get_preset(preset).root_rule)
    with warnings.catch_warnings():  # the run itself warns once; here only the error matters
        warnings.simplefilter("ignore")
        check_root(parse_text(text, root_rule=rule), no_noun)


def overlay(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40),
            opacity: float = 0.5) -> np.ndarray:
    """The image with the mask tinted in ``color``."""
    out = rgb.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32)
    out[mask] = (1 - opacity) * out[mask] + opacity * tint
    return out.round().astype(np.uint8)


def check_proposals(args: argparse.Namespace, rgb: np.ndarray) -> tuple[Any, list[int] | None]:
    """The masks of ``--proposals`` (None without it), read and checked against the image before any model
    loads; with the index in the file of each mask that becomes a proposal (empty ones are left out)."""
    if args.proposals is None:
        return None, None
    from ..config import get_variant
    from ..external import external_proposals, load_proposal_files

    variant = get_variant(args.variant)
    if variant.proposals != "sam":
        raise InputError(f"--proposals {args.proposals}: variant {variant.name} makes its own proposals "
                         "(thresholds of c, feature clusters or SAM prompts); choose --variant full, GS, DS or "
                         "sam-clip")
    masks = load_proposal_files(args.proposals, "--proposals")
    given = external_proposals(masks, rgb.shape[0], rgb.shape[1], resize=args.proposals_resize,
                               name=f"--proposals {args.proposals}")
    return masks, given.kept


def result_summary(result: Any, text: str, seconds: float) -> dict[str, Any]:
    """A JSON-ready summary of a Result (everything but the pixel arrays)."""
    return {
        "text": text, "variant": result.variant, "preset": result.preset, "root_token": result.root_token,
        "root_position": result.root_position, "direction": list(result.direction), "chosen": result.index,
        "top_k": result.top_k, "proposal_areas": [int(m.sum()) for m in result.proposals],
        "scores": {k: (None if v is None else [float(x) for x in v]) for k, v in result.scores.items()},
        "mask_area": int(result.mask.sum()), "seconds": seconds, "timings": result.timings,
    }


def run_segment(args: argparse.Namespace) -> int:
    """Run `refdiff segment` with parsed arguments; returns the exit status (2 on a bad input or file)."""
    try:
        return _segment(args)
    except RefDiffError as exc:
        return report_error(PROG, exc)


def _segment(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..image import load_image
    from ..pipeline import RefDiff

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    overrides = preset_overrides(args)
    rgb = load_image(args.image, name=f"image {args.image!r}")
    check_text(args.text, args.preset, overrides, args.no_noun)
    masks, kept = check_proposals(args, rgb)
    check_model_options(args)
    check_outputs(args)
    model = RefDiff.from_pretrained(sd=args.sd, sam=args.sam, clip=args.clip, preset=args.preset, sam3=args.sam3,
                                    device=args.device, dtype=args.dtype, sd_config=args.sd_config, sd_vae=args.vae,
                                    offload=args.offload, no_noun=args.no_noun, progress=lambda stage: say(f"  {stage} ..."), **overrides)
    start = time.perf_counter()
    with warnings.catch_warnings():  # printed once below, as the user should read them
        warnings.simplefilter("ignore", RefDiffWarning)
        result = model(rgb, args.text, variant=args.variant, seed=args.seed, proposals=masks,
                       proposals_resize=args.proposals_resize, proposals_post_filter=args.proposals_post_filter)
    seconds = time.perf_counter() - start
    for path in (args.output, args.overlay, args.json):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.mask.astype(np.uint8) * 255).save(args.output)
    if args.overlay:
        Image.fromarray(overlay(rgb, result.mask)).save(args.overlay)
    if args.json:
        summary = result_summary(result, args.text, seconds)
        if masks is not None:
            summary["proposals_file"] = str(args.proposals)
            # which mask of the file each proposal is (post-filtered runs: see the warnings)
            summary["file_indices"] = None if args.proposals_post_filter else kept
        Path(args.json).write_text(json.dumps(summary, indent=2))
    n = len(result.proposals)
    say(f"root token: {result.root_token!r}  direction: {', '.join(result.direction) or 'none'}  "
        f"proposals: {n}  chosen: {result.index}  ({seconds:.1f} s)")
    for note in result.warnings:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    if result.index < 0:
        say("no proposal qualified: the mask is empty")
    return 0


__all__ = ["add_segment_arguments", "run_segment", "check_outputs", "check_text", "overlay", "result_summary",
           "check_proposals"]
