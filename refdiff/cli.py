"""Command line: ``refdiff segment`` (one image, one expression) and ``refdiff eval`` (RefCOCO benchmarks)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import PRESETS, VARIANT_HELP, VARIANTS
from .errors import RefDiffError



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to an option's help unless the help already states its default or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads models."""
    g = parser.add_argument_group("models (default: the published weights, downloaded once to the libraries' caches)")
    g.add_argument("--sd", metavar="PATH_OR_ID", default=None,
                   help="Stable Diffusion 1.x/2.x: a diffusers folder, a hub id, or a single .safetensors/.ckpt "
                        "checkpoint (e.g. ComfyUI's models/checkpoints/v1-5-pruned-emaonly.safetensors). "
                        "Default: stable-diffusion-v1-5/stable-diffusion-v1-5")
    g.add_argument("--sd-config", metavar="NAME_OR_DIR", default=None,
                   help="configuration for a single-file checkpoint: sd1, sd2, sd2-v, or a diffusers-layout folder "
                        "(default: detected from the weights)")
    g.add_argument("--sam", metavar="FILE", default=None,
                   help="SAM checkpoint (sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth). "
                        "Default: vit_h, downloaded to the cache")
    g.add_argument("--clip", metavar="TAG_OR_FILE", default=None,
                   help="CLIP scorer: an open_clip MODEL/TAG such as ViT-B-16/openai, or a local weights file. "
                        "Default: ViT-B-16/openai")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                   help="model precision (default: fp16 on CUDA, fp32 on the CPU)")


def add_offload_argument(parser: argparse.ArgumentParser) -> None:
    """--offload: models wait on the CPU and visit --device only for their stage (RefDiff(offload=True))."""
    parser.add_argument("--offload", action="store_true",
                        help="keep the models in CPU memory and move each one to --device only while its stage "
                             "runs (SD ~2 GB, SAM vit_h 2.5 GB, CLIP 0.6 GB): for 6-8 GB GPUs; every stage that is "
                             "not cached pays a host-to-device copy of its model; same results")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Preset and speed options shared by segment and eval."""
    parser.add_argument("--preset", default="official", choices=sorted(PRESETS),
                        help="official: the authors' released code with its bugs fixed; paper: the equations as "
                             "written (default: official)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the VAE sample and the injected noise (default: 0)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side S of the square fed to Stable Diffusion (default: the preset's, 1024); "
                             "512 is about 4x faster and changes results")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refdiff", description="Zero-shot referring image segmentation (Ref-Diff).")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment the object a referring expression names in one image",
                         formatter_class=HelpFormatter)
    seg.add_argument("image", help="input image file (any format Pillow reads; grayscale/RGBA/16-bit converted)")
    seg.add_argument("text", help='referring expression, e.g. "the black horse jumping on the left"')
    seg.add_argument("-o", "--output", required=True, help="where to write the mask (PNG, white = selected)")
    seg.add_argument("--variant", default="full", type=str.lower, choices=sorted(VARIANTS),
                     help=VARIANT_HELP + " (case-insensitive)")
    add_method_arguments(seg)
    add_model_arguments(seg)
    add_offload_argument(seg)
    seg.add_argument("--overlay", metavar="OUT.png", default=None, help="also write the image with the mask overlaid")
    seg.add_argument("--json", metavar="SCORES.json", default=None,
                     help="also write root token, direction, every proposal's scores, the choice and timings")
    seg.add_argument("--quiet", action="store_true", help="print nothing but errors")

    try:
        from .evaluation.cli import add_eval_arguments
    except ImportError as exc:  # pragma: no cover - evaluation extras missing
        ev = sub.add_parser("eval", help=f"unavailable: {exc}")
        ev.set_defaults(eval_unavailable=str(exc))
    else:
        ev = sub.add_parser("eval", help="evaluate on RefCOCO / RefCOCO+ / RefCOCOg (the paper's tables)",
                            formatter_class=HelpFormatter)
        add_eval_arguments(ev)
    return parser


def overlay(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40),
            opacity: float = 0.5) -> np.ndarray:
    """The image with the mask tinted in ``color``."""
    out = rgb.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32)
    out[mask] = (1 - opacity) * out[mask] + opacity * tint
    return out.round().astype(np.uint8)


def segment_command(args: argparse.Namespace) -> int:
    from PIL import Image

    from .image import load_image
    from .pipeline import RefDiff

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    overrides = {} if args.image_size is None else {"image_size": args.image_size}
    rgb = load_image(args.image, name=f"image {args.image!r}")
    model = RefDiff.from_pretrained(sd=args.sd, sam=args.sam, clip=args.clip, preset=args.preset,
                                    device=args.device, dtype=args.dtype, sd_config=args.sd_config,
                                    offload=args.offload, progress=lambda stage: say(f"  {stage} ..."), **overrides)
    start = time.perf_counter()
    result = model(rgb, args.text, variant=args.variant, seed=args.seed)
    seconds = time.perf_counter() - start
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.mask.astype(np.uint8) * 255).save(args.output)
    if args.overlay:
        Image.fromarray(overlay(rgb, result.mask)).save(args.overlay)
    if args.json:
        Path(args.json).write_text(json.dumps(result_summary(result, args.text, seconds), indent=2))
    n = len(result.proposals)
    say(f"root token: {result.root_token!r}  direction: {', '.join(result.direction) or 'none'}  "
        f"proposals: {n}  chosen: {result.index}  ({seconds:.1f} s)")
    if result.index < 0:
        say("no proposal qualified: the mask is empty")
    return 0


def result_summary(result, text: str, seconds: float) -> dict:
    """A JSON-ready summary of a Result (everything but the pixel arrays)."""
    return {
        "text": text, "variant": result.variant, "preset": result.preset, "root_token": result.root_token,
        "root_position": result.root_position, "direction": list(result.direction), "chosen": result.index,
        "top_k": result.top_k, "proposal_areas": [int(m.sum()) for m in result.proposals],
        "scores": {k: (None if v is None else [float(x) for x in v]) for k, v in result.scores.items()},
        "mask_area": int(result.mask.sum()), "seconds": seconds, "timings": result.timings,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "segment":
            return segment_command(args)
        if getattr(args, "eval_unavailable", None):
            print(f"refdiff eval is unavailable: {args.eval_unavailable}", file=sys.stderr)
            return 2
        from .evaluation.cli import run_eval

        return run_eval(args)
    except RefDiffError as exc:
        print(f"refdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
