"""Benchmark of SAM 3 concept proposals (proposal_mode="concept") against the preset's SAM vit_h automatic mask
generator, on the same image, in one run:

    python benchmarks/sam3_proposals.py [--mode short|full] [--threads N] [--out sam3.json]

- automatic: ``refdiff.proposals.make_mask_generator`` + ``sam_proposals`` at the preset's settings (32 x 32
  points, batch 64, thresholds 0.88 / 0.95) and the preset's post-filter: what RefDiff's "sam" stage runs;
- concept: SAM 3's image pass (``image_state``) and one noun prompt (``concept_instances`` at the preset's
  concept_threshold and concept_max), cold; then a second noun on the same image (image features reused).
Candidate counts: the proposals each mode hands to CLIP (the crop branch is linear in them). One model is held
at a time (built with random weights, freed before the next). Full mode: SAM vit_h and the released SAM 3 image
model, random weights; short: the tiny test models (SAM at 4 x 4 points).
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from refdiff.config import OFFICIAL, sam_generator_kwargs
from refdiff.proposals import make_mask_generator, sam_post_filter, sam_proposals

from benchmarks.report import emit
from benchmarks.workload import MODES, SEED, synthetic_image

NOUN, SECOND_NOUN = "horse", "disc"  # workload.SENTENCE's target noun, and another object of the image


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def run(mode: str) -> dict:
    from refdiff.sam3_models import concept_instances, concept_processor, image_state
    from refdiff.testing.sam import random_sam, tiny_sam
    from refdiff.testing.sam3 import full_sam3, tiny_sam3

    settings = MODES[mode]
    h, w = settings.image_hw
    rgb = synthetic_image(h, w)
    preset = OFFICIAL
    amg = sam_generator_kwargs(preset)
    if mode == "short":
        amg.update(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    out: dict = {"mode": mode, "image_hw": [h, w], "amg": amg, "concept_threshold": preset.concept_threshold,
                 "concept_max": preset.concept_max, "noun": NOUN, "torch_threads": torch.get_num_threads()}

    start = time.perf_counter()
    sam = tiny_sam(SEED) if mode == "short" else random_sam("vit_h", SEED)
    out["sam_build_s"] = time.perf_counter() - start
    with torch.inference_mode():
        start = time.perf_counter()
        raw = sam_proposals(make_mask_generator(sam, **amg), rgb)
        kept, _, note = sam_post_filter(raw, keep_largest=preset.sam_keep_largest, min_area=preset.sam_min_area,
                                        min_area_reference=preset.sam_min_area_reference)
        out["automatic_s"] = time.perf_counter() - start
    out.update(automatic_masks=int(raw.shape[0]), automatic_candidates=int(kept.shape[0]), automatic_note=note,
               sam_parameters=sum(p.numel() for p in sam.parameters()), max_rss_gb_after_sam=_rss_gb())
    del sam, raw, kept
    gc.collect()

    start = time.perf_counter()
    sam3 = tiny_sam3(SEED) if mode == "short" else full_sam3(SEED)
    out["sam3_build_s"] = time.perf_counter() - start
    processor = concept_processor(sam3)
    start = time.perf_counter()
    state = image_state(processor, rgb)
    out["concept_image_s"] = time.perf_counter() - start
    start = time.perf_counter()
    found = concept_instances(processor, state, NOUN, preset.concept_threshold, preset.concept_max)
    out["concept_prompt_s"] = time.perf_counter() - start
    start = time.perf_counter()
    second = concept_instances(processor, state, SECOND_NOUN, preset.concept_threshold, preset.concept_max)
    out["concept_second_prompt_s"] = time.perf_counter() - start
    out.update(concept_found=found.found, concept_candidates=int(found.masks.shape[0]),
               concept_second_candidates=int(second.masks.shape[0]),
               sam3_parameters=sum(p.numel() for p in sam3.parameters()), max_rss_gb=_rss_gb())
    out["concept_cold_s"] = out["concept_image_s"] + out["concept_prompt_s"]
    out["ratio_cold"] = out["concept_cold_s"] / out["automatic_s"]
    out["ratio_cached_image"] = out["concept_second_prompt_s"] / out["automatic_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/sam3_proposals.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    emit(run(args.mode), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
