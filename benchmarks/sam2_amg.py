"""Benchmark of SAM 2.1's automatic mask generator (hiera tiny and large) against SAM vit_h's, at the preset's
automatic settings (32 x 32 points, batch 64, thresholds 0.88 / 0.95), on the same image, in one run:

    python benchmarks/sam2_amg.py [--mode short|full] [--repeats 1] [--threads N] [--out sam2.json]

Each model is built (random weights: the time of a network does not depend on its weights), timed on
``refdiff.proposals.make_mask_generator`` + ``sam_proposals`` (the pack's own path for both kinds) and freed
before the next, so the run holds one model at a time. Ratios are against vit_h. With random weights few masks
pass the thresholds, which shortens the post-processing of every model alike.
Full mode: SAM vit_h, SAM 2.1 hiera tiny and large at full size; short: the tiny test models, 4 x 4 points.
"""
from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from refdiff.config import sam_generator_kwargs
from refdiff.proposals import make_mask_generator, sam_proposals

from benchmarks.report import emit
from benchmarks.workload import MODES, SEED, synthetic_image


def builders(mode: str) -> dict[str, Callable[[], Any]]:
    """Model name -> builder, the reference (SAM vit_h) first."""
    from refdiff.sam2_models import Sam2Arch
    from refdiff.testing.sam import random_sam, tiny_sam
    from refdiff.testing.sam2 import random_sam2, tiny_sam2

    if mode == "short":
        return {"sam_tiny": lambda: tiny_sam(SEED), "sam2.1_tiny_test": lambda: tiny_sam2(SEED)}
    return {"sam_vit_h": lambda: random_sam("vit_h", SEED),
            "sam2.1_hiera_tiny": lambda: random_sam2(Sam2Arch("2.1", "tiny"), SEED),
            "sam2.1_hiera_large": lambda: random_sam2(Sam2Arch("2.1", "large"), SEED)}


def run(mode: str, repeats: int) -> dict:
    settings = MODES[mode]
    h, w = settings.image_hw
    rgb = synthetic_image(h, w)
    amg = sam_generator_kwargs(settings.preset(min(settings.sizes)))
    out: dict = {"mode": mode, "image_hw": [h, w], "amg": amg, "repeats": repeats,
                 "torch_threads": torch.get_num_threads(), "models": {}}
    for name, build in builders(mode).items():
        start = time.perf_counter()
        model = build()
        built = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        runs, counts = [], []
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                masks = sam_proposals(make_mask_generator(model, **amg), rgb)
                runs.append(time.perf_counter() - start)
                counts.append(int(masks.shape[0]))
        out["models"][name] = {"build_s": built, "parameters": params, "runs_s": runs,
                               "median_s": statistics.median(runs), "masks": counts,
                               "max_rss_gb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
        del model, masks
        gc.collect()
    names = list(out["models"])
    ref = out["models"][names[0]]["median_s"]
    out["reference"] = names[0]
    out["ratios"] = {n: out["models"][n]["median_s"] / ref for n in names[1:]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/sam2_amg.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.mode, args.repeats)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
