"""DiffSegmenter's node (docs/SIBLING_METHODS.md): the generative map refined with the UNet's self-attention,
a drop-in for RefDiff Generative Map's c."""
from __future__ import annotations

from comfy_api.latest import io, ui

from refdiff.errors import InputError
from refdiff.maps import RESIZE_MODES
from refdiff.refine import DIFFSEGMENTER_ITERATIONS

from . import runtime, sockets
from .attention_maps import refined_maps
from .map_nodes import preview_maps
from .text_inputs import FACTOR_WEIGHTS_EXAMPLE, format_factor_weights, parse_factor_weights


class RefDiffSelfAttentionRefine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffSelfAttentionRefine",
            display_name="RefDiff Self-Attention Refine",
            category=sockets.CATEGORY,
            description="DiffSegmenter's generative map: the root token's cross-attention fused over the UNet levels "
                        "with per-level weights, completed with the UNet's self-attention (map <- A map), then "
                        "resized and cropped like RefDiff Generative Map. A drop-in for its c output. Needs the "
                        "capture with self_attention on and factor 0 (every level).",
            inputs=[
                sockets.Attention.Input("attention", tooltip="From RefDiffCaptureAttention with self_attention on and "
                                                             "factor 0 (all levels)."),
                sockets.Parse.Input("parse", tooltip="The parse of the same text (gives the root token)."),
                io.Image.Input("image", tooltip="The ORIGINAL images (before RefDiffPrepareImage): c is cropped to "
                                                "their frame and size."),
                sockets.preset_input("Preset for 'resize: preset', 'factor_weights: preset' and the map epsilon."),
                io.Int.Input("iterations", default=DIFFSEGMENTER_ITERATIONS, min=0, max=100,
                             tooltip="How many times the map is multiplied by the self-attention (1 = DiffSegmenter's "
                                     "released code; more spreads further; 0 = fused cross-attention only)."),
                io.String.Input("factor_weights", default=FACTOR_WEIGHTS_EXAMPLE,
                                tooltip="Weight of each UNet level's cross-attention, as factor:weight pairs (factor = "
                                        "latent side / grid side); DiffSegmenter's 0.3/0.5/0.1/0.1 for the "
                                        "8/16/32/64 grids of a 512 image. 'preset' = the same."),
                io.Float.Input("eps", default=1e-8, min=0.0, max=0.01, step=1e-9, round=1e-12,
                               tooltip="Epsilon of the per-layer and per-level min-max normalisations."),
                io.Int.Input("self_factor", default=0, min=0, max=64,
                             tooltip="Which captured self-attention level to refine with (0 = the finest captured, "
                                     "DiffSegmenter's choice)."),
                io.Combo.Input("resize", options=["preset", *RESIZE_MODES], default="preset",
                               tooltip="Resize filter of the map: 'bilinear' (paper) or 'lanczos' (official)."),
            ],
            outputs=[
                io.Mask.Output(display_name="c", tooltip="Refined generative map per image, MASK [B, H, W] in [0, 1] "
                                                         "(feeds threshold proposals and generative scores)."),
                io.Image.Output(display_name="preview", tooltip="Heatmap of the refined c over the images."),
            ],
        )

    @classmethod
    def validate_inputs(cls, factor_weights) -> bool | str:
        if not isinstance(factor_weights, str):
            return True  # linked: checked when the node runs
        try:
            parse_factor_weights(factor_weights, default=sockets.preset("official").refine_factor_weights)
        except InputError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, attention, parse, image, preset, iterations, factor_weights, eps, self_factor,
                resize) -> io.NodeOutput:
        p = sockets.preset(preset)
        weights = parse_factor_weights(factor_weights, default=p.refine_factor_weights)
        runtime.check_interrupt()
        c = refined_maps(attention, parse, image, weights, iterations=iterations, eps=eps, self_factor=self_factor,
                         mode=p.map_resize if resize == "preset" else resize, map_eps=p.map_eps)
        runtime.LOG.info("[RefDiff] self-attention refine: weights %s, %d iteration(s)", format_factor_weights(weights),
                         iterations)
        preview = preview_maps(image, c)
        return io.NodeOutput(c, preview, ui=ui.PreviewImage(preview, cls=cls))


NODES = [RefDiffSelfAttentionRefine]
__all__ = ["NODES", "RefDiffSelfAttentionRefine"]
