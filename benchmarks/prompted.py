"""Benchmark of the prompted proposal mode (SAM prompted at the peaks of c) against the preset's automatic generator,
in one run on the same image and models:

    python benchmarks/prompted.py [--mode short|full] [--size 512] [--threads N] [--out prompted.json]

- proposal stage: ``Result.timings`` of RefDiff's SAM stage, "sam" (automatic generator, 32 x 32 points, and the
  post-filter) against "sam_prompted" (image embedding, prompts from c, predictor calls, NMS, post-filter) on a
  cold cache, and "sam_prompted" again for a second sentence on the same image (embedding cached);
- end to end: ``RefDiff(...)(image, sentence, "full")`` on a fresh RefDiff (cold caches) with the preset, and with
  proposal_mode="prompted".
Full mode: SD 1.5, SAM vit_h and CLIP ViT-B/16 with random weights (benchmarks/workload.py); short: tiny models.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from refdiff import RefDiff

from benchmarks.report import emit
from benchmarks.workload import MODES, SENTENCE, SENTENCES, build_models, synthetic_image

PROPOSAL_TARGET, END_TO_END_TARGET = 0.05, 0.25


def run(mode: str, size: int | None) -> dict:
    settings = MODES[mode]
    settings = dataclasses.replace(settings, sam_types=(settings.sam_type,))
    size = size or min(settings.sizes)
    models = build_models(settings, torch.device("cpu"), torch.float32)
    sam = models.sams[settings.sam_type]
    preset = settings.preset(size)
    rgb = synthetic_image(*settings.image_hw)

    def fresh(**overrides) -> RefDiff:
        return RefDiff(sd=models.sd, sam=sam, clip=models.clip, preset=preset, **overrides)

    out: dict = {"mode": mode, "size": size, "image_hw": list(settings.image_hw), "sam": settings.sam_type,
                 "sentence": SENTENCE, "torch_threads": torch.get_num_threads()}
    start = time.perf_counter()
    auto = fresh()(rgb, SENTENCE, "full")
    out["end_to_end_automatic_s"] = time.perf_counter() - start
    fast_model = fresh(proposal_mode="prompted")
    start = time.perf_counter()
    fast = fast_model(rgb, SENTENCE, "full")
    out["end_to_end_prompted_s"] = time.perf_counter() - start
    second = fast_model(rgb, SENTENCES[1] if len(SENTENCES) > 1 else SENTENCE + " again", "full")
    out.update(proposals_automatic_s=auto.timings["sam"], proposals_prompted_cold_s=fast.timings["sam_prompted"],
               proposals_prompted_cached_s=second.timings["sam_prompted"],
               n_automatic=int(auto.proposals.shape[0]), n_prompted=int(fast.proposals.shape[0]),
               timings_automatic=auto.timings, timings_prompted=fast.timings)
    out["proposal_ratio_cold"] = out["proposals_prompted_cold_s"] / out["proposals_automatic_s"]
    out["proposal_ratio_cached"] = out["proposals_prompted_cached_s"] / out["proposals_automatic_s"]
    out["end_to_end_ratio"] = out["end_to_end_prompted_s"] / out["end_to_end_automatic_s"]
    out["targets"] = {"proposal": PROPOSAL_TARGET, "end_to_end": END_TO_END_TARGET}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/prompted.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--size", type=int, default=None, help="S (default: the mode's smallest, 512 in full mode)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.mode, args.size)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
