"""Masks from another node against the pack's own SAM path, on ComfyUI's Python objects; run in a subprocess with
ComfyUI's folder as working directory (the nodes' execute() called as ComfyUI calls them, as in
equivalence_checks.py, whose helpers and planted SAM masks this reuses).

Usage: python external_masks_checks.py MODELS_DIR REPO_DIR CHECK   -> prints one JSON object on the last line.

Check ``mask_batch_equals_sam``, for both presets: RefDiffSAMProposals' masks, turned into a ComfyUI MASK batch
(float32 [N, H, W]) and round-tripped through ComfyUI's core MaskToImage and ImageToMask nodes as a workflow
would, go through RefDiffMaskProposals into the same scoring and fusion nodes as the SAM node's own proposals:
- the proposals, every score, the ranking (fused scores sorted) and the selected mask of variants full, GS, DS and
  sam-clip, compared with the SAM path;
- the SAM node's unfiltered masks through RefDiffMaskProposals with post_filter 'preset' give the SAM node's
  post-filtered proposals;
- RefDiffSegment with the MASK batch wired to ``proposals`` (and no SAM connected) gives RefDiffSegment-with-SAM's
  selection.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import equivalence_checks as eq  # noqa: E402  (sets up ComfyUI's CPU mode and the library, same command line)
import numpy as np  # noqa: E402
import torch  # noqa: E402

CHECK = sys.argv[3]
VARIANTS = ("full", "GS", "DS", "sam-clip")
SCORE_TOL = 1e-6  # the same code on the same masks: measured 0


def as_comfy_mask(masks: torch.Tensor) -> torch.Tensor:
    """bool [N, H, W] proposals as a ComfyUI MASK batch, through the core MaskToImage and ImageToMask nodes."""
    from comfy_extras.nodes_mask import ImageToMask, MaskToImage

    batch = masks.float()  # a MASK: float32 [N, H, W] in [0, 1]
    image = MaskToImage().mask_to_image(batch)[0]
    return ImageToMask().image_to_mask(image, "red")[0]


def ranking(outcome: Any) -> list[int]:
    return [int(i) for i in np.argsort(-outcome.scores["fused"], kind="stable")]


def deviation(a: Any, b: Any) -> float | None:
    if a is None or b is None:
        return None if a is None and b is None else float("inf")
    return float(np.abs(np.asarray(a) - np.asarray(b)).max(initial=0.0))


def same_outcome(ref: Any, got: Any) -> dict[str, Any]:
    """What a test compares: proposals, score deviations, ranking, index and mask."""
    return {"n": int(len(ref.proposals)), "same_proposals": bool(np.array_equal(ref.proposals, got.proposals)),
            "score_dev": {k: deviation(ref.scores[k], got.scores[k]) for k in ("generative", "discriminative",
                                                                                "fused")},
            "ranking": ranking(ref), "ranking_external": ranking(got), "index": int(ref.index),
            "index_external": int(got.index), "same_mask": bool(np.array_equal(ref.mask, got.mask)),
            "mask_area": int(ref.mask.sum())}


def segment(m: Any, models: dict[str, Any], image: torch.Tensor, preset: str, variant: str,
            proposals: torch.Tensor | None) -> Any:
    """RefDiffSegment's outcome, with SAM connected or with ``proposals`` wired instead."""
    given = dict(proposals=proposals) if proposals is not None else dict(sam=models["sam"])
    with eq.recording(m.select_nodes, "fuse_select") as calls:
        mask, c, report = eq.run_node(
            m.segment_node.RefDiffSegment, model=models["model"], clip=models["clip"], vae=models["vae"],
            image=image, text=eq.TEXT, variant=variant, preset=preset, seed=eq.SEED, image_size=eq.IMAGE_SIZE,
            clip_scorer=models["clip_scorer"], **eq.SAM_NODE, **given)[:3]
    call = calls[-1]
    outcome = eq.outcome_of(mask, call["proposals"], call["generative"], call["discriminative"], call["result"],
                            None)
    return outcome, report


def check_mask_batch_equals_sam() -> dict:
    m = eq.pack_modules()
    pack = m.sam_nodes.__name__.rsplit(".", 1)[0]
    mask_nodes = importlib.import_module(pack + ".mask_proposals")
    eq.register_model_folders(m)
    models = eq.comfy_models(m)
    image = eq.as_image(eq.planted_image())
    out: dict[str, Any] = {"chain": {}, "post_filter": {}, "segment": {}, "info": {}, "mask_dtype": None}
    start = time.perf_counter()
    with eq.scratch_folders(), eq.sam_masks_then_planted(m):
        for preset in eq.PRESETS:
            chain = eq.Chain(m, models, image, preset)
            own = chain.sam_proposals
            batch = as_comfy_mask(own.masks[0])
            out["mask_dtype"] = [str(batch.dtype), list(batch.shape)]
            external, info = eq.run_node(mask_nodes.RefDiffMaskProposals, masks=batch, image=image)
            out["info"][preset] = info
            out[f"source_{preset}"] = external.source
            for variant in VARIANTS:
                out["chain"][f"{preset}/{variant}"] = same_outcome(chain.variant(variant),
                                                                  chain.variant(variant, proposals=external))
            raw = eq.run_node(m.sam_nodes.RefDiffSAMProposals, sam=models["sam"], image=image, preset=preset,
                              post_filter="none", **eq.SAM_NODE)[0]
            filtered = eq.run_node(mask_nodes.RefDiffMaskProposals, masks=as_comfy_mask(raw.masks[0]), image=image,
                                   preset=preset, post_filter="preset")[0]
            out["post_filter"][preset] = {"raw": int(raw.masks[0].shape[0]), "sam_node": int(own.masks[0].shape[0]),
                                          "external": int(filtered.masks[0].shape[0]),
                                          "same": bool(torch.equal(filtered.masks[0], own.masks[0]))}
            for variant in ("full", "DS"):
                ref, _ = segment(m, models, image, preset, variant, None)
                got, report = segment(m, models, image, preset, variant, batch)
                row = same_outcome(ref, got)
                row["report_names_external"] = "external masks:" in report
                out["segment"][f"{preset}/{variant}"] = row
    out["seconds"] = time.perf_counter() - start
    return out


CHECKS = {"mask_batch_equals_sam": check_mask_batch_equals_sam}

if __name__ == "__main__":
    torch.manual_seed(0)
    print(json.dumps(CHECKS[CHECK]()))
