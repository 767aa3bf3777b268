"""Benchmark of scoring and selection over N external proposals (masks from another segmenter, e.g. SEGS), in one
run on the same image and models:

    python benchmarks/external_scoring.py [--mode short|full] [--size 512] [--counts 1 10 50 200] [--repeats 2]
                                          [--threads N] [--out external.json]

One RefDiff runs ``RefDiff(...)(image, sentence, "full", proposals=masks)``; a first call fills the per-image caches
(the generative map c, the text features), so each measured call costs what N masks add: reading them
(refdiff.external), the generative scores, CLIP's crop branch (N crops) and masked branch (one pass with N mask
tokens), fusion and selection. Every repeat gets a new set of N masks (the CLIP image features are cached per
proposal set). Reported: the median time per N, the ratio to N = 1 and the time per added mask; and, once per N,
CLIP's two branches alone on the same masks (``ClipScorer.crop_features``: N crops; ``masked_features``: one
pass with N mask tokens; no positional bias), to show which one grows with N.
Full mode: SD 1.5 and CLIP ViT-B/16 with random weights (benchmarks/workload.py); short: tiny models.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from refdiff import RefDiff

from benchmarks.report import emit
from benchmarks.workload import MODES, SEED, SENTENCE, build_models, synthetic_image, synthetic_proposals

COUNTS = (1, 10, 50, 200)
STAGES = ("external", "generative_score", "clip_full", "spatial")


def run(mode: str, size: int | None, counts: tuple[int, ...], repeats: int) -> dict:
    settings = dataclasses.replace(MODES[mode], sam_types=())
    size = size or min(settings.sizes)
    models = build_models(settings, torch.device("cpu"), torch.float32)
    h, w = settings.image_hw
    rgb = synthetic_image(h, w)
    model = RefDiff(sd=models.sd, sam=None, clip=models.clip, preset=settings.preset(size))
    out: dict = {"mode": mode, "size": size, "image_hw": [h, w], "sentence": SENTENCE, "variant": "full",
                 "repeats": repeats, "torch_threads": torch.get_num_threads(), "build_s": models.build_s}
    start = time.perf_counter()
    model(rgb, SENTENCE, "full", proposals=synthetic_proposals(h, w, 10, seed=SEED + 999))
    out["warm_up_s"] = time.perf_counter() - start  # the generative map and text features, once
    rows = []
    for n in counts:
        runs, stages = [], []
        for r in range(repeats):
            masks = synthetic_proposals(h, w, n, seed=SEED + 100 * r)
            start = time.perf_counter()
            result = model(rgb, SENTENCE, "full", proposals=masks)
            runs.append(time.perf_counter() - start)
            stages.append({k: result.timings.get(k, 0.0) for k in STAGES})
            assert result.proposals.shape[0] == n, (result.proposals.shape, n)
        branches = {}
        for branch in ("crop_features", "masked_features"):
            start = time.perf_counter()
            getattr(models.clip, branch)(torch.from_numpy(rgb), masks)
            branches[branch] = time.perf_counter() - start
        rows.append({"n": n, "runs_s": runs, "median_s": statistics.median(runs),
                     "stages_median_s": {k: statistics.median(s[k] for s in stages) for k in STAGES},
                     "branches_s": branches})
    base = rows[0]["median_s"]
    for row in rows:
        row["ratio_to_first"] = row["median_s"] / base
        added = row["n"] - rows[0]["n"]
        row["per_added_mask_s"] = (row["median_s"] - base) / added if added else None
        row["branches_per_added_mask_s"] = ({k: (v - rows[0]["branches_s"][k]) / added
                                             for k, v in row["branches_s"].items()} if added else None)
    out["rows"] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/external_scoring.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--size", type=int, default=None, help="S (default: the mode's smallest, 512 in full mode)")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.mode, args.size, tuple(args.counts), args.repeats)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
