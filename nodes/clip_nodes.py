"""CLIP nodes: load an open_clip model from models/open_clip; discriminative scores s_D (docs/METHOD.md 8)."""
from __future__ import annotations

import json
import os

import open_clip  # noqa: F401  (without it these nodes are disabled, not broken)
import torch
from comfy_api.latest import io

from refdiff.clip import DEFAULT_CLIP_MODEL, load_clip
from refdiff.config import Preset
from refdiff.discriminative import proposal_scores
from refdiff.errors import InputError, ModelLoadError

from . import model_files, runtime, sockets, tensors
from .wire_types import ClipHandle, ParsedBatch, ProposalBatch, ScoreBatch

CLIP_WHERE = ("Ref-Diff uses OpenAI's CLIP ViT-B/16: download open_clip_model.safetensors from the Hugging Face "
              "repository timm/vit_base_patch16_clip_224.openai and rename it, e.g. ViT-B-16-openai.safetensors.")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ["ref-diff", "sam-clip"]


# ------------------------------------------------------------------------------------------ stage functions
def sidecar(path: str) -> dict:
    """Options stored next to a weight file as <name>.json: model_name, model_cfg, quick_gelu (all optional)."""
    side = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(side):
        return {}
    try:
        with open(side, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{side}: not a readable JSON file of open_clip options ({exc})") from exc
    unknown = sorted(set(data) - {"model_name", "model_cfg", "quick_gelu"})
    if not isinstance(data, dict) or unknown:
        raise ModelLoadError(f"{side}: expected keys model_name, model_cfg, quick_gelu; unknown {unknown}")
    return data


def load_clip_model(clip_name: str, model_name: str = DEFAULT_CLIP_MODEL, quick_gelu: str = "auto",
                    precision: str = "fp32") -> ClipHandle:
    """Load an open_clip weight file of models/open_clip onto the offload device.

    A <name>.json beside the file may give model_name / model_cfg / quick_gelu for other architectures.
    """
    path = model_files.resolve_model_file(model_files.CLIP_FOLDER, clip_name, "CLIP weight", CLIP_WHERE)
    options = sidecar(path)
    gelu = {"auto": None, "on": True, "off": False}[quick_gelu]
    scorer = load_clip(path, device=runtime.offload_device(), dtype=PRECISIONS[precision],
                       model_name=options.get("model_name", model_name or DEFAULT_CLIP_MODEL),
                       quick_gelu=options.get("quick_gelu", gelu), model_cfg=options.get("model_cfg"))
    return ClipHandle(scorer=scorer, path=path)


def clip_score_batch(clip: ClipHandle, image: torch.Tensor, proposals: ProposalBatch, parse: ParsedBatch,
                     preset: Preset, mode: str = "ref-diff", use_bias: bool = True,
                     crop_weight: float | None = None, mask_weight: float | None = None) -> ScoreBatch:
    """s_D of every proposal of every image (Eq. 6, 7, 10), as the preset defines it: one
    refdiff.discriminative.proposal_scores call per image.

    ``mode="sam-clip"``: the baseline (crop branch only, final layer, no positional bias, sentence feature).
    ``crop_weight`` / ``mask_weight`` (None: the preset's) weigh the two branches.
    """
    rgbs = tensors.images_to_rgb(image)
    batch = len(rgbs)
    if len(proposals) != batch:
        raise InputError(f"proposals are for {len(proposals)} image(s) but image holds {batch}")
    items = parse.for_batch(batch, "parse")
    scorer = clip.scorer
    out = []
    progress = runtime.Progress(batch)
    with runtime.on_compute_device(scorer.model):
        for rgb, item, masks in zip(rgbs, items, proposals.masks):
            runtime.check_interrupt()
            s = proposal_scores(scorer, torch.from_numpy(rgb), masks, item.parsed.text, item.parsed.root,
                                item.parsed.directions, preset, mode=mode, use_bias=use_bias,
                                crop_weight=crop_weight, mask_weight=mask_weight)
            out.append(s.float().cpu())
            progress.step()
    return ScoreBatch(out, kind="discriminative", counts=[int(m.shape[0]) for m in proposals.masks])


# ------------------------------------------------------------------------------------------ nodes
class RefDiffCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffCLIPLoader",
            display_name="RefDiff CLIP Loader",
            category=sockets.CATEGORY,
            description="Load an open_clip CLIP (the method: OpenAI's ViT-B/16) from ComfyUI/models/open_clip for "
                        "discriminative scoring. Weights are read without running pickled code.",
            inputs=[
                io.Combo.Input("clip_name", options=model_files.weight_files(model_files.CLIP_FOLDER),
                               tooltip="Weight file in ComfyUI/models/open_clip (.safetensors preferred). A "
                                       "<name>.json beside it may name another architecture."),
                io.String.Input("model_name", default=DEFAULT_CLIP_MODEL,
                                tooltip="open_clip architecture of the file (ViT-B-16 for OpenAI's ViT-B/16)."),
                io.Combo.Input("quick_gelu", options=["auto", "on", "off"], default="auto",
                               tooltip="QuickGELU activations: 'auto' = on (OpenAI-trained weights need it); "
                                       "'off' for LAION/DataComp-trained files."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="fp32",
                               tooltip="Weight precision on the compute device (fp16/bf16 for GPUs only)."),
            ],
            outputs=[sockets.ClipModel.Output(display_name="clip_scorer",
                                              tooltip="The loaded CLIP scorer (REFDIFF_CLIP).")],
        )

    @classmethod
    def validate_inputs(cls, clip_name) -> bool | str:
        return model_files.missing_file_message(model_files.CLIP_FOLDER, clip_name, "CLIP weight", CLIP_WHERE)

    @classmethod
    def execute(cls, clip_name, model_name, quick_gelu, precision) -> io.NodeOutput:
        return io.NodeOutput(load_clip_model(clip_name, model_name, quick_gelu, precision))


class RefDiffCLIPScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffCLIPScore",
            display_name="RefDiff CLIP Score",
            category=sockets.CATEGORY,
            description="Discriminative matching s_D (Eq. 10): CLIP features of each proposal (crop branch and "
                        "masked-attention branch, one encoder pass for all proposals) against the sentence and "
                        "the root word, with the positional bias of direction words (Eq. 6).",
            inputs=[
                sockets.ClipModel.Input("clip_scorer", tooltip="CLIP from RefDiffCLIPLoader."),
                io.Image.Input("image", tooltip="The original images."),
                sockets.Proposals.Input("proposals", tooltip="Proposals of the same images."),
                sockets.Parse.Input("parse", tooltip="Parsed text: sentence, root word and direction clues."),
                sockets.preset_input("Preset: layer (final/penultimate), which branch gets the positional bias, "
                                     "text mixes and branch weights."),
                io.Combo.Input("mode", options=MODES, default="ref-diff",
                               tooltip="'ref-diff': both branches (Eq. 10); 'sam-clip': the baseline (crop branch "
                                       "only, no positional bias, sentence feature)."),
                io.Boolean.Input("positional_bias", default=True,
                                 tooltip="Weight pixels by the direction clues (left/right/top/bottom)."),
                io.Float.Input("crop_weight", default=-1.0, min=-1.0, max=10.0, step=0.05,
                               tooltip="Weight of the crop branch (1 - beta); -1 = the preset's (0.7)."),
                io.Float.Input("mask_weight", default=-1.0, min=-1.0, max=10.0, step=0.05,
                               tooltip="Weight of the masked-attention branch (beta); -1 = the preset's (0.3)."),
            ],
            outputs=[sockets.Scores.Output(display_name="scores", tooltip="s_D per proposal (REFDIFF_SCORES).")],
        )

    @classmethod
    def execute(cls, clip_scorer, image, proposals, parse, preset, mode, positional_bias, crop_weight,
                mask_weight) -> io.NodeOutput:
        scores = clip_score_batch(clip_scorer, image, proposals, parse, sockets.preset(preset), mode=mode,
                                  use_bias=positional_bias, crop_weight=None if crop_weight < 0 else crop_weight,
                                  mask_weight=None if mask_weight < 0 else mask_weight)
        return io.NodeOutput(scores)


NODES = [RefDiffCLIPLoader, RefDiffCLIPScore]
__all__ = ["sidecar", "load_clip_model", "clip_score_batch", "NODES", "RefDiffCLIPLoader", "RefDiffCLIPScore"]
