"""SAM 3 nodes: load a SAM 3 image model (models/sam3) and its concept proposals, every instance of the target noun
of the referring expression, through ``refdiff.sam3_models.concept_proposals`` (docs/METHOD.md section 17)."""
from __future__ import annotations

from typing import Any

import sam3  # noqa: F401  (without it these nodes are disabled, not broken)
import torch
from comfy_api.latest import io

from refdiff.config import Preset
from refdiff.errors import InputError, ModelLoadError
from refdiff.expression import parse_expression
from refdiff.sam3_models import (checkpoint_kind, concept_processor, concept_proposals, load_sam3,
                                 sam3_model_name)
from refdiff.text import parse_text

from . import model_files, runtime, sockets, tensors, text_inputs
from .wire_types import ParsedBatch, ProposalBatch, Sam3Handle, ScoreBatch, match_batch

SOURCE = "concept"  # ProposalBatch.source of SAM 3's instances
SAM3_WHERE = ("Meta's SAM 3 image model: sam3.pt from https://huggingface.co/facebook/sam3 (gated: accept the SAM "
              "License there), or a .safetensors of it, in models/sam3.")
KIND_NAMES = {"sam": "a SAM (v1, segment-anything) checkpoint", "sam2": "a SAM 2 / 2.1 checkpoint"}
CONCEPT_PROMPTS = ["preset", "noun", "phrase"]


# ------------------------------------------------------------------------------------------ stage functions
def sam3_file_problem(sam3_name: str) -> str | None:
    """What is wrong with a models/sam3 file before it loads: missing, or a SAM / SAM 2 checkpoint (read from its
    keys: a safetensors header, a torch file on the meta device); None when it may be a SAM 3 model."""
    try:
        path = model_files.resolve_model_file(model_files.SAM3_FOLDER, sam3_name, "SAM 3 checkpoint", SAM3_WHERE)
    except ModelLoadError as exc:
        return f"sam3_name: {exc}"
    kind = checkpoint_kind(path)
    if kind in KIND_NAMES:
        return (f"sam3_name: {sam3_name!r} is {KIND_NAMES[kind]}, not SAM 3; load it with RefDiff SAM Loader "
                f"(models/sams or models/sam2), and choose a SAM 3 model (sam3.pt) here")
    return None


def load_sam3_model(sam3_name: str) -> Sam3Handle:
    """Load a SAM 3 image model of models/sam3 strictly (refdiff.sam3_models.load_sam3) onto the offload device
    (moved to the GPU only while it runs)."""
    problem = sam3_file_problem(sam3_name)
    if problem:
        raise ModelLoadError(problem)
    path = model_files.resolve_model_file(model_files.SAM3_FOLDER, sam3_name, "SAM 3 checkpoint", SAM3_WHERE)
    try:
        model = load_sam3(path, device=runtime.offload_device())
    except ModelLoadError as exc:
        raise ModelLoadError(f"sam3_name: {exc}") from exc
    return Sam3Handle(model=model, name=sam3_model_name(model), path=path)


def concept_expressions(batch: int, parse: ParsedBatch | None, text: str, preset: Preset) -> list[Any]:
    """One parsed expression (refdiff.expression.Expression) per image: from RefDiff Parse Text's parse, or from
    the text (one line for all images or one per image), parsed with the preset's root rule."""
    has_text = isinstance(text, str) and bool(text.strip())
    if parse is None and not has_text:
        raise InputError("parse / text: connect RefDiff Parse Text's parse, or write the referring expression in "
                         "text, so SAM 3 knows which noun to look for")
    if parse is not None and has_text:
        raise InputError("parse / text: both are given; disconnect parse or empty text (one source of the words)")
    if parse is not None:
        parsed = [item.parsed for item in parse.for_batch(batch, "parse")]
    else:
        lines = match_batch(text_inputs.split_lines(text, "text"), batch, "text")
        parsed = [parse_text(line, root_rule=preset.root_rule) for line in lines]
    return [parse_expression(p.text, root_rule=preset.root_rule, parsed=p) for p in parsed]


def concept_proposal_batch(sam3: Sam3Handle, image: torch.Tensor, expressions: list[Any], preset: Preset
                           ) -> tuple[ProposalBatch, ScoreBatch, list[str]]:
    """SAM 3's instances of each image's target noun (refdiff.sam3_models.concept_proposals: the preset's
    concept_prompt, concept_threshold, concept_max) as proposals, with SAM 3's scores of them (kind "concept"),
    and one info line per image. An image with no instance (or a text naming no object) gets zero proposals and
    a note saying why."""
    if not isinstance(sam3, Sam3Handle):
        raise InputError(f"sam3: expected a SAM 3 model from RefDiff SAM 3 Loader, got {type(sam3).__name__}")
    rgbs = tensors.images_to_rgb(image)
    if len(expressions) != len(rgbs):
        raise InputError(f"parse / text: {len(expressions)} expression(s) for {len(rgbs)} image(s)")
    masks, scores, notes, info = [], [], {}, []
    progress = runtime.Progress(len(rgbs))
    with runtime.on_compute_device(sam3.model):
        processor = concept_processor(sam3.model)
        for i, (rgb, expr) in enumerate(zip(rgbs, expressions)):
            runtime.check_interrupt()
            got = concept_proposals(sam3.model, rgb, expr, preset, processor=processor)
            if got.masks is None:
                h, w = rgb.shape[:2]
                masks.append(torch.zeros(0, h, w, dtype=torch.bool))
                scores.append(torch.zeros(0))
                notes[i] = f"{got.reason}, so this image has no proposal ({got.fix})"
                info.append(f"image {i}: 0 proposals ({got.reason})")
            else:
                masks.append(got.masks.cpu())
                scores.append(got.scores.cpu().float())
                listed = ", ".join(f"{s:.3f}" for s in got.scores.tolist())
                info.append(f"image {i}: {got.masks.shape[0]} instance(s) of {got.prompt!r} (of {got.found} above "
                            f"{preset.concept_threshold}, at most {preset.concept_max}), SAM 3 scores [{listed}]")
            progress.step()
    batch = ProposalBatch(masks, source=SOURCE, notes=notes)
    runtime.warn(batch.warnings)
    return batch, ScoreBatch(scores, kind="concept", counts=[int(m.shape[0]) for m in masks]), info


def concept_preset(preset: Preset, concept_prompt: str = "preset", threshold: float = -1.0,
                   max_instances: int = 0) -> Preset:
    """The preset with the Concept Proposals node's inputs applied ('preset', -1 and 0 keep the preset's)."""
    if concept_prompt not in CONCEPT_PROMPTS:
        raise InputError(f"concept_prompt must be one of {CONCEPT_PROMPTS}, got {concept_prompt!r}")
    changes: dict[str, Any] = {}
    if concept_prompt != "preset":
        changes["concept_prompt"] = concept_prompt
    if threshold >= 0:
        if threshold >= 1:
            raise InputError(f"threshold must be below 1 (-1 = the preset's), got {threshold}")
        changes["concept_threshold"] = float(threshold)
    if max_instances > 0:
        changes["concept_max"] = int(max_instances)
    return preset.with_(**changes) if changes else preset


# ------------------------------------------------------------------------------------------ nodes
class RefDiffSAM3Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffSAM3Loader",
            display_name="RefDiff SAM 3 Loader",
            category=sockets.CATEGORY,
            description="Load a SAM 3 image model (Meta's sam3.pt, or a .safetensors of it) from ComfyUI/models/sam3, "
                        "strictly and without running pickled code; a SAM or SAM 2 file is refused by name when the "
                        "prompt is queued. For RefDiff Concept Proposals and RefDiff Segment's sam3 input.",
            inputs=[
                io.Combo.Input("sam3_name", options=model_files.weight_files(model_files.SAM3_FOLDER),
                               tooltip="SAM 3 checkpoint in ComfyUI/models/sam3 (sam3.pt from "
                                       "huggingface.co/facebook/sam3, or a .safetensors of it). SAM / SAM 2 files "
                                       "belong to RefDiff SAM Loader."),
            ],
            outputs=[sockets.Sam3Model.Output(display_name="sam3", tooltip="The loaded SAM 3 (REFDIFF_SAM3).")],
        )

    @classmethod
    def validate_inputs(cls, sam3_name) -> bool | str:
        return sam3_file_problem(sam3_name) or True

    @classmethod
    def execute(cls, sam3_name) -> io.NodeOutput:
        return io.NodeOutput(load_sam3_model(sam3_name))


class RefDiffConceptProposals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = Preset(name="defaults")
        return io.Schema(
            node_id="RefDiffConceptProposals",
            display_name="RefDiff Concept Proposals",
            category=sockets.CATEGORY,
            description="SAM 3's instances of the target noun of the referring expression ('the second car from the "
                        "left' -> every car) as proposals, with SAM 3's score of each; Ref-Diff's scores and "
                        "spatial terms then pick the one the words describe (beyond the paper, docs/METHOD.md "
                        "section 17). An image with no instance gets zero proposals, named with the reason on the "
                        "node and in info.",
            inputs=[
                sockets.Sam3Model.Input("sam3", tooltip="SAM 3 from RefDiff SAM 3 Loader."),
                io.Image.Input("image", tooltip="The original images (one or a batch)."),
                sockets.Parse.Input("parse", optional=True,
                                    tooltip="RefDiff Parse Text's parse: its target noun is what SAM 3 looks for. "
                                            "Connect this or write text, not both."),
                io.String.Input("text", multiline=True, default="", optional=True,
                                tooltip="The referring expression when no parse is connected: one line for all "
                                        "images, or one line per image."),
                sockets.preset_input("Preset for the concept settings left at 'preset' / -1 / 0 and the root rule "
                                     "of text."),
                io.Combo.Input("concept_prompt", options=CONCEPT_PROMPTS, default="preset",
                               tooltip="What SAM 3 is prompted with: 'noun' = the target noun ('car'); 'phrase' = "
                                       "the noun with its attributes ('red car'); 'preset' = the preset's "
                                       f"({d.concept_prompt})."),
                io.Float.Input("threshold", default=-1.0, min=-1.0, max=0.99, step=0.01,
                               tooltip="Keep instances whose SAM 3 score (detection x presence) is above this; -1 = "
                                       f"the preset's ({d.concept_threshold}). Lower it when an image gets none."),
                io.Int.Input("max_instances", default=0, min=0, max=200,
                             tooltip=f"At most this many instances per image, the best scored first; 0 = the "
                                     f"preset's ({d.concept_max})."),
            ],
            outputs=[
                sockets.Proposals.Output(display_name="proposals", tooltip="SAM 3's instances per image "
                                                                           "(REFDIFF_PROPOSALS), best first."),
                sockets.Scores.Output(display_name="scores", tooltip="SAM 3's score of each proposal (REFDIFF_SCORES, "
                                                                     "kind 'concept'), for reports; Ref-Diff's own "
                                                                     "scores choose."),
                io.String.Output(display_name="info", tooltip="Per image: the prompt, how many instances, their SAM 3 "
                                                              "scores, and why an image has none."),
            ],
        )

    @classmethod
    def execute(cls, sam3, image, preset, concept_prompt, threshold, max_instances, parse=None,
                text="") -> io.NodeOutput:
        p = concept_preset(sockets.preset(preset), concept_prompt, threshold, max_instances)
        expressions = concept_expressions(int(image.shape[0]), parse, text, p)
        proposals, scores, lines = concept_proposal_batch(sam3, image, expressions, p)
        runtime.show_on_node(proposals.warnings)
        info = "\n".join([f"SAM 3 concept proposals ({sam3.name}): {proposals.describe()}", *lines,
                          *(f"warning: {w}" for w in proposals.warnings)])
        return io.NodeOutput(proposals, scores, info)


NODES = [RefDiffSAM3Loader, RefDiffConceptProposals]
__all__ = ["SOURCE", "SAM3_WHERE", "CONCEPT_PROMPTS", "sam3_file_problem", "load_sam3_model", "concept_expressions",
           "concept_proposal_batch", "concept_preset", "NODES", "RefDiffSAM3Loader", "RefDiffConceptProposals"]
