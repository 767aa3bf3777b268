"""RefDiffSpatial between scoring and selection, on ComfyUI's Python objects; run in a subprocess with ComfyUI's
folder as working directory (each node's execute() called as ComfyUI calls it, wired as a graph wires them).

Usage: python spatial_checks.py MODELS_DIR REPO_DIR spatial   -> prints one JSON object on the last line.

The graph: RefDiffParseText, RefDiffPrepareImage -> VAEEncode -> RefDiffNoiseInjection -> RefDiffCaptureAttention ->
RefDiffGenerativeMap, RefDiffSAMProposals (the planted boxes after SAM's own masks, as equivalence_checks does),
RefDiffGenerativeScore and RefDiffCLIPScore, then RefDiffFuseSelect fed directly (the ablation) and through
RefDiffSpatial (every term off; the defaults), for an ordinal text and a relation text. Then, on a text naming
another noun, variants full, G and GS with a CLIP connected everywhere through the staged graph with RefDiffSpatial,
RefDiffSegment (preset plus, automatic SAM) and refdiff.RefDiff on the same files: the same scores and selection,
the negative term in full only. The report holds what the test asserts on.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import types
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import equivalence_checks as eq  # noqa: E402  (ComfyUI set up on import: --cpu, the library on the path)

import torch  # noqa: E402

ORDINAL_TEXT = "the second box from the left"
RELATION_TEXT = "the box next to the blue box"
PRESET = "official"
TERMS = ("position", "middle", "ordinals", "size", "relations", "negatives")
NEGATIVES_TEXT = "the red box without the blue square"  # another noun ('square'), no frame term, no relation
NEGATIVES_VARIANTS = ("full", "G", "GS")


def execute(cls: Any, **given: Any) -> Any:
    """One node execution's NodeOutput (outputs and ui)."""
    return cls.execute(**eq.node_inputs(cls, given))


def run_text(m: Any, spatial_nodes: Any, models: dict[str, Any], image: torch.Tensor, text: str) -> dict:
    import nodes as comfy_nodes  # ComfyUI's core nodes (VAEEncode)

    parse = eq.run_node(m.text_nodes.RefDiffParseText, text=text, preset=PRESET, clip=models["clip"])[0]
    square = eq.run_node(m.diffusion_nodes.RefDiffPrepareImage, image=image, size=eq.IMAGE_SIZE)[0]
    latent = comfy_nodes.VAEEncode().encode(models["vae"], square)[0]
    noised = eq.run_node(m.diffusion_nodes.RefDiffNoiseInjection, latent=latent, seed=eq.SEED, preset=PRESET)[0]
    attention = eq.run_node(m.diffusion_nodes.RefDiffCaptureAttention, model=models["model"], latent=noised,
                            preset=PRESET, clip=models["clip"], parse=parse)[0]
    c = eq.run_node(m.map_nodes.RefDiffGenerativeMap, attention=attention, parse=parse, image=image,
                    preset=PRESET)[0]
    proposals = eq.run_node(m.sam_nodes.RefDiffSAMProposals, sam=models["sam"], image=image, preset=PRESET,
                            **eq.SAM_NODE)[0]
    s_g = eq.run_node(m.map_nodes.RefDiffGenerativeScore, c=c, proposals=proposals, preset=PRESET)[0]
    s_d = eq.run_node(m.clip_nodes.RefDiffCLIPScore, clip_scorer=models["clip_scorer"], image=image,
                      proposals=proposals, parse=parse, preset=PRESET)[0]
    direct = execute(m.select_nodes.RefDiffFuseSelect, proposals=proposals, preset=PRESET, generative=s_g,
                     discriminative=s_d, image=image)
    wired = dict(proposals=proposals, parse=parse, generative=s_g, discriminative=s_d, attention=attention,
                 preset=PRESET)
    off_scores, off_info = execute(spatial_nodes.RefDiffSpatial, **wired, **{t: False for t in TERMS}).args
    off = execute(m.select_nodes.RefDiffFuseSelect, proposals=proposals, preset=PRESET, fused=off_scores,
                  image=image)
    on_scores, on_info = execute(spatial_nodes.RefDiffSpatial, **wired, clip=models["clip_scorer"],
                                 image=image).args
    on = execute(m.select_nodes.RefDiffFuseSelect, proposals=proposals, preset=PRESET, fused=on_scores, image=image)
    # RefDiffSegment under preset plus (SAM's automatic generator kept, as in the graph above) applies the same
    # terms: its selection is the staged graph's with RefDiffSpatial at its defaults.
    with eq.recording(m.select_nodes, "fuse_select") as calls:
        segment = eq.run_node(m.segment_node.RefDiffSegment, model=models["model"], clip=models["clip"],
                              vae=models["vae"], image=image, text=text, variant="full", preset="plus",
                              seed=eq.SEED, image_size=eq.IMAGE_SIZE, sam=models["sam"],
                              clip_scorer=models["clip_scorer"], proposal_mode="automatic", **eq.SAM_NODE)
    segment_fused = calls[-1].get("fused_scores")
    masks = proposals.masks[0]
    boxes = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append([int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1] if len(ys) else None)
    applied = on_scores.spatial[0]
    gallery = on.ui["refdiff_proposals"][0]
    return {
        "n": int(masks.shape[0]), "boxes": boxes,
        "direct_index": index_of(direct.args[0], masks), "off_index": index_of(off.args[0], masks),
        "on_index": index_of(on.args[0], masks),
        "direct_equals_off": bool(torch.equal(direct.args[0], off.args[0])),
        "off_total": off_scores.scores[0].tolist(), "on_total": on_scores.scores[0].tolist(),
        "base": applied.base.tolist(), "pool": list(applied.pool),
        "contributions": {k: v.tolist() for k, v in applied.contributions.items()},
        "mask_dtype": str(on.args[0].dtype), "mask_shape": list(on.args[0].shape),
        "table": on.args[2], "info": on_info, "off_info": off_info,
        "gallery_spatial": gallery.get("spatial"), "gallery_items": gallery["items"],
        "segment_index": index_of(segment[0], masks),
        "segment_total": segment_fused.scores[0].tolist() if segment_fused is not None else None,
        "segment_report": segment[2],
        "direct_gallery_has_terms": any("terms" in i for i in direct.ui["refdiff_proposals"][0]["items"]),
    }


def index_of(mask: torch.Tensor, masks: torch.Tensor) -> int:
    """The proposal a selected MASK [1, H, W] is (-1: none)."""
    chosen = mask[0] > 0.5
    hits = [i for i in range(masks.shape[0]) if torch.equal(masks[i], chosen)]
    return hits[0] if hits else -1


def staged_with_spatial(m: Any, spatial_nodes: Any, chain: Any, variant: str) -> tuple[Any, bool]:
    """The Outcome of the stage nodes of ``variant`` through RefDiffSpatial at its defaults (clip and image
    connected) and RefDiffFuseSelect, and whether the negative term was applied."""
    from refdiff.config import get_variant

    v = get_variant(variant)
    c = chain.c
    proposals = chain.threshold(c) if v.proposals == "threshold" else chain.sam_proposals
    s_g = (eq.run_node(m.map_nodes.RefDiffGenerativeScore, c=c, proposals=proposals, preset=PRESET)[0]
           if v.generative else None)
    s_d = (eq.run_node(m.clip_nodes.RefDiffCLIPScore, clip_scorer=chain.models["clip_scorer"], image=chain.image,
                       proposals=proposals, parse=chain.parse, preset=PRESET)[0] if v.discriminative else None)
    scores = execute(spatial_nodes.RefDiffSpatial, proposals=proposals, parse=chain.parse, generative=s_g,
                     discriminative=s_d, attention=chain._capture("CaptureAttention"),
                     clip=chain.models["clip_scorer"], image=chain.image, preset="plus").args[0]
    with eq.recording(m.select_nodes, "fuse_select") as calls:
        mask = eq.run_node(m.select_nodes.RefDiffFuseSelect, proposals=proposals, preset=PRESET, fused=scores,
                           image=chain.image)[0]
    outcome = eq.outcome_of(mask, proposals, s_g, s_d, calls[-1]["result"], c)
    return outcome, "negatives" in scores.spatial[0].contributions


def segment_with_spatial(m: Any, models: dict[str, Any], image: torch.Tensor, variant: str) -> tuple[Any, bool]:
    """The Outcome of RefDiffSegment under preset plus with SAM's automatic generator and the CLIP scorer connected,
    and whether the negative term was applied."""
    with eq.recording(m.select_nodes, "fuse_select") as calls:
        mask, c = eq.run_node(m.segment_node.RefDiffSegment, model=models["model"], clip=models["clip"],
                              vae=models["vae"], image=image, text=NEGATIVES_TEXT, variant=variant, preset="plus",
                              seed=eq.SEED, image_size=eq.IMAGE_SIZE, sam=models["sam"],
                              clip_scorer=models["clip_scorer"], proposal_mode="automatic", **eq.SAM_NODE)[:2]
    call = calls[-1]
    fused = call["fused_scores"]
    s_g, s_d = (None if fused.parts.get(k) is None else types.SimpleNamespace(scores=fused.parts[k])
                for k in ("generative", "discriminative"))  # what eq.outcome_of reads of a ScoreBatch
    outcome = eq.outcome_of(mask, call["proposals"], s_g, s_d, call["result"], c)
    return outcome, "negatives" in fused.spatial[0].contributions


def check_negatives(m: Any, spatial_nodes: Any, models: dict[str, Any], image: torch.Tensor) -> dict:
    """Variants full, G, GS on NEGATIVES_TEXT: the staged graph and RefDiffSegment against refdiff.RefDiff
    (preset plus, automatic SAM), each compared as equivalence_checks compares, and where negatives applied."""
    from refdiff.pipeline import RefDiff

    sd, sam, scorer = eq.library_models()
    library = RefDiff(sd=sd, sam=sam, clip=scorer, preset="plus", proposal_mode="automatic",
                      **eq.LIBRARY_SETTINGS)
    results = library.segment_variants(eq.planted_image(), NEGATIVES_TEXT, NEGATIVES_VARIANTS, seed=eq.SEED)
    chain = eq.Chain(m, models, image, PRESET, text=NEGATIVES_TEXT)
    rows = {}
    for variant in NEGATIVES_VARIANTS:
        ref = results[variant]
        for path, run in (("staged", lambda: staged_with_spatial(m, spatial_nodes, chain, variant)),
                          ("segment", lambda: segment_with_spatial(m, models, image, variant))):
            got, applied = run()
            name = f"{path}/{variant}"
            rows[name] = {**eq.compare(ref, got, variant, "plus", eq.MAP_TOL, eq.S_D_TOL, name),
                          "negatives": applied, "negatives_ref": "spatial_negatives" in ref.scores}
    return rows


def check_spatial() -> dict:
    m = eq.pack_modules()
    spatial_nodes = importlib.import_module(f"{m.select_nodes.__package__}.spatial_nodes")
    eq.register_model_folders(m)
    start = time.perf_counter()
    models = eq.comfy_models(m)
    image = eq.as_image(eq.planted_image())
    rows = {}
    with eq.scratch_folders(), eq.sam_masks_then_planted(m):
        for name, text in (("ordinal", ORDINAL_TEXT), ("relation", RELATION_TEXT)):
            rows[name] = run_text(m, spatial_nodes, models, image, text)
        negatives = check_negatives(m, spatial_nodes, models, image)
    return {"rows": rows, "negatives": negatives, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    print(json.dumps({"spatial": check_spatial}[eq.CHECK]()))
