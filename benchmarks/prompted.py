"""Benchmark of the prompted proposal mode (SAM or SAM 2.1 prompted at the peaks of c) against the preset's
automatic generator (SAM vit_h, 32 x 32 points), in one run on the same image and models:

    python benchmarks/prompted.py [--mode short|full] [--sam sam2.1_tiny vit_h ...] [--size 512] [--threads N]
                                  [--fast] [--out prompted.json]

- The automatic generator runs once (SAM vit_h, the presets' choice): two sentences on one fresh RefDiff, the
  first on cold caches, the second with the image's work cached (SAM's masks, the VAE latent, CLIP's image
  features). Every prompted backend of ``--sam`` runs the same two sentences on its own fresh RefDiff with
  proposal_mode="prompted" (the second with SAM's image embedding cached).
- Proposal stage: ``Result.timings`` "sam" (automatic generator and post-filter) against "sam_prompted" (image
  embedding, prompts from c, predictor calls, NMS, post-filter); cold against cold, and second sentence against
  second sentence (cached against cached).
- End to end: the wall time of each call, cold against cold and second against second. SAM runs in full in both
  modes, but what it returns is replaced by the same fixed synthetic proposals (``benchmarks/ratios.py``'s
  ``fixed_sam_proposals`` and ``fixed_prompted_proposals`` below; random-weight masks are meaningless and their
  number differs between modes), so CLIP scores the same candidates in both; the counts SAM itself returned are
  recorded, and CLIP's time per candidate too.
- Before them, one untimed warm-up call (the fixed proposals given as external masks: no SAM), so that the first
  timed run does not carry the process's first-call costs (spaCy, kernels).
- ``--fast``: one more prompted row on the first backend of ``--sam`` with the speed options of FAST_SETTINGS
  (one conditional-only UNet step), end to end against the same automatic run.
Full mode: SD 1.5, SAM vit_h (and the backends) and CLIP ViT-B/16 with random weights; short: tiny models.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from refdiff import RefDiff
from refdiff import prompted as refdiff_prompted

from benchmarks.ratios import fixed_sam_proposals
from benchmarks.report import emit
from benchmarks.workload import MODES, SEED, SENTENCES, build_models, synthetic_image, synthetic_proposals

PROPOSAL_TARGET, END_TO_END_TARGET = 0.05, 0.25
FAST_END_TO_END_TARGET = 0.15
BACKENDS = ("vit_h", "vit_b", "sam2.1_tiny", "sam2.1_small", "sam2.1_base_plus", "sam2.1_large")
REFERENCE = "vit_h"  # the automatic generator of the presets
FAST_SETTINGS: dict[str, Any] = {"use_cfg": False, "max_steps": 1}  # the speed options of the fast row
SENTENCE_PAIR = (SENTENCES[0], SENTENCES[1])


def build_sam(name: str, tiny: bool) -> Any:
    """A random-weight SAM of ``name`` (full size), or the tiny test model of its kind (short mode)."""
    if name not in BACKENDS:
        raise SystemExit(f"--sam: unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name.startswith("sam2.1_"):
        from refdiff.sam2_models import Sam2Arch
        from refdiff.testing.sam2 import random_sam2, tiny_sam2

        return tiny_sam2(SEED) if tiny else random_sam2(Sam2Arch("2.1", name[len("sam2.1_"):]), SEED)
    from refdiff.testing.sam import random_sam, tiny_sam

    return tiny_sam(SEED) if tiny else random_sam(name, SEED)


@contextlib.contextmanager
def fixed_prompted_proposals(proposals: torch.Tensor) -> Iterator[list[int]]:
    """While active, ``refdiff.prompted.image_prompted_proposals`` runs in full (image embedding, prompts, the
    predictor calls, NMS), then returns the benchmark's fixed proposals instead of its masks, so that the prompted
    mode hands CLIP the same candidates as the automatic one under ``fixed_sam_proposals``. Yields a list that
    grows by one entry (the number of masks the predictor gave) per call."""
    original = refdiff_prompted.image_prompted_proposals
    calls: list[int] = []

    def run_then_fix(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        masks, prompts = original(*args, **kwargs)
        calls.append(int(masks.shape[0]))
        return proposals.clone(), prompts

    refdiff_prompted.image_prompted_proposals = run_then_fix  # type: ignore[assignment]
    try:
        yield calls
    finally:
        refdiff_prompted.image_prompted_proposals = original  # type: ignore[assignment]


def two_sentences(model: RefDiff, rgb: Any, stage: str) -> dict[str, Any]:
    """The two sentences on one RefDiff (the first on cold caches): wall time, proposal-stage time, CLIP's
    candidates and time, and every stage's time, per sentence."""
    record: dict[str, Any] = {}
    for label, sentence in zip(("cold", "second"), SENTENCE_PAIR):
        gc.collect()
        start = time.perf_counter()
        result = model(rgb, sentence, "full", seed=SEED)
        wall = time.perf_counter() - start
        clip_s = result.timings.get("clip_full", 0.0)
        candidates = int(result.proposals.shape[0])
        record[label] = {"sentence": sentence, "wall_s": wall, "proposals_s": result.timings[stage],
                         "clip_candidates": candidates, "clip_s": clip_s,
                         "clip_s_per_candidate": clip_s / candidates if candidates else None,
                         "timings": dict(result.timings), "load_average_after": os.getloadavg()[0]}
    return record


def ratios(automatic: dict[str, Any], prompted: dict[str, Any]) -> dict[str, float]:
    """Prompted over automatic, each sentence against the same sentence: the proposal stage and end to end, cold
    against cold and second sentence against second sentence (both with the image's work cached)."""
    return {"proposal_cold": prompted["cold"]["proposals_s"] / automatic["cold"]["proposals_s"],
            "proposal_cached": prompted["second"]["proposals_s"] / automatic["second"]["proposals_s"],
            "end_to_end_cold": prompted["cold"]["wall_s"] / automatic["cold"]["wall_s"],
            "end_to_end_cached": prompted["second"]["wall_s"] / automatic["second"]["wall_s"]}


def run(mode: str, size: int | None, backends: list[str], fast: bool = False,
        save: Callable[[dict], None] | None = None) -> dict:
    settings = MODES[mode]
    settings = dataclasses.replace(settings, sam_types=(REFERENCE,), sam_type=REFERENCE)
    size = size or min(settings.sizes)
    models = build_models(settings, torch.device("cpu"), torch.float32)
    reference_sam = models.sams[REFERENCE]
    preset = settings.preset(size)
    h, w = settings.image_hw
    rgb = synthetic_image(h, w)
    fixed = synthetic_proposals(h, w, settings.proposals)

    def fresh(sam: Any, **overrides: Any) -> RefDiff:
        return RefDiff(sd=models.sd, sam=sam, clip=models.clip, preset=preset, **overrides)

    out: dict[str, Any] = {
        "mode": mode, "size": size, "image_hw": [h, w], "reference": f"{REFERENCE} automatic",
        "sentences": list(SENTENCE_PAIR), "fixed_proposals": int(fixed.shape[0]),
        "torch_threads": torch.get_num_threads(), "sam_points": settings.sam_points,
        "targets": {"proposal_cold": PROPOSAL_TARGET, "end_to_end_cold": END_TO_END_TARGET,
                    "fast_end_to_end_cold": FAST_END_TO_END_TARGET},
        "automatic": None, "prompted": {}}

    def checkpoint() -> None:
        out["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        if save is not None:
            save(out)

    # Warm-up, untimed: one call with the fixed proposals given as external masks (spaCy, the tokenizer, the VAE,
    # UNet and CLIP kernels; no SAM), so that the first timed run does not carry the process's first-call costs.
    start = time.perf_counter()
    fresh(reference_sam)(rgb, SENTENCES[2], "full", seed=SEED, proposals=fixed)
    out["warmup_s"] = time.perf_counter() - start
    if True:  # RefDiff sets its own grad mode, as in a user's call
        with fixed_sam_proposals(fixed) as sam_calls:
            auto = two_sentences(fresh(reference_sam), rgb, "sam")
        auto["sam_masks_returned"] = list(sam_calls)  # one entry: the second sentence reused the cached masks
        out["automatic"] = auto
        checkpoint()
        rows = [(name, name, {}) for name in backends]
        if fast and backends:
            rows.append((f"{backends[0]} fast", backends[0], FAST_SETTINGS))
        built: dict[str, Any] = {REFERENCE: reference_sam}
        for label, name, overrides in rows:
            if name not in built:
                built.clear()
                built[REFERENCE] = reference_sam
                gc.collect()
                start = time.perf_counter()
                built[name] = build_sam(name, settings.tiny)
                build_s = time.perf_counter() - start
            else:
                build_s = 0.0
            sam = built[name]
            with fixed_prompted_proposals(fixed) as prompted_calls:
                record = two_sentences(fresh(sam, proposal_mode="prompted", **overrides), rgb, "sam_prompted")
            record.update(backend=name, settings=dict(overrides), build_s=build_s,
                          parameters=sum(p.numel() for p in sam.parameters()),
                          prompted_masks_returned=list(prompted_calls), ratios=ratios(auto, record))
            out["prompted"][label] = record
            checkpoint()
    return out


def markdown(out: dict[str, Any]) -> str:
    """The table of a run: one row per prompted backend, ratios against the one automatic run."""
    auto = out["automatic"]
    lines = [f"Automatic reference (SAM {REFERENCE}, {out['sam_points']} x {out['sam_points']} points): proposal "
             f"stage {auto['cold']['proposals_s']:.2f} s cold, {auto['second']['proposals_s']:.3f} s for the second "
             f"sentence; end to end {auto['cold']['wall_s']:.1f} s cold, {auto['second']['wall_s']:.1f} s second; "
             f"CLIP scored {auto['cold']['clip_candidates']} candidates in {auto['cold']['clip_s']:.2f} s.", "",
             "| backend (prompted) | parameters | proposals cold (s) | ratio | proposals 2nd sentence (s) | ratio "
             "(cached vs cached) | end to end cold (s) | ratio | end to end 2nd (s) | ratio | CLIP candidates | "
             "CLIP s / candidate |",
             "|---" * 12 + "|"]
    for label, r in out["prompted"].items():
        q = r["ratios"]
        lines.append(
            f"| {label} | {r['parameters'] / 1e6:.1f} M | {r['cold']['proposals_s']:.2f} | {q['proposal_cold']:.3f} | "
            f"{r['second']['proposals_s']:.3f} | {q['proposal_cached']:.2f} | {r['cold']['wall_s']:.1f} | "
            f"{q['end_to_end_cold']:.3f} | {r['second']['wall_s']:.1f} | {q['end_to_end_cached']:.3f} | "
            f"{r['cold']['clip_candidates']} / {auto['cold']['clip_candidates']} | "
            f"{r['cold']['clip_s_per_candidate'] or 0:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/prompted.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--sam", nargs="+", choices=BACKENDS, default=["vit_h"],
                        help="the SAM backends of the prompted mode, each against the one vit_h automatic run "
                             "(default vit_h)")
    parser.add_argument("--size", type=int, default=None, help="S (default: the mode's smallest, 512 in full mode)")
    parser.add_argument("--fast", action="store_true",
                        help="also the first backend with " + ", ".join(f"{k}={v}" for k, v in FAST_SETTINGS.items()))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="write the table there too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def save(partial: dict) -> None:  # rewritten after every row, so a run cut short keeps what finished
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(partial, indent=1) + "\n", encoding="utf-8")

    result = run(args.mode, args.size, list(dict.fromkeys(args.sam)), fast=args.fast, save=save)
    emit(result, args.out)
    table = markdown(result)
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
